"""nginx's own access log as the source, end to end: real viewers -> private nginx writing the
shipped sfive format (nginx/sfive-log.conf, buffer=64k flush=1s) -> the service with --file ->
a real unix datagram hub; nginx's JSON truth log alongside.

During one run: a logrotate-style rename plus USR1, a copytruncate, and a service restart
(without a state dir: the intervals it was down for are filled with sfive-ngxlua-replay
--from/--until over the rotated files). Every full interval's datasets must equal the truth,
none missing, none twice.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
import pytest_twisted
from helpers.chain import lost_lines
from support import wait_for
from test_e2e_nginx import (
    FILES,
    by_interval,
    expected_from_access_log,
    hubs,  # noqa: F401 (fixture)
    interval_of,
    services,  # noqa: F401 (fixture)
    viewers,
)
from twisted.internet import defer

from lab.nginx import SOURCE_DIR
from sfive_ngxlua.datasets import start_time
from sfive_ngxlua.follow import FileFollowService
from sfive_ngxlua.service import makeService
from sfive_ngxlua.settings import Options

pytestmark = pytest.mark.timeout(60)

REPLAY = str(Path(sys.executable).parent / "sfive-ngxlua-replay")
STREAMER_ARGS = ["-S", "foo,bar/hls,dash/high,low", "-n", "edge1", "-t", "e2e", "-d", "1"]
FLUSH = 1.0
GRACE = "2.5"  # flush=1s plus room for a loaded machine (the reporter's wall-clock rule)


def nginx_logging(nginx_factory, tmp_path):
    """nginx writing its access log in the sfive format as shipped (flush=1s), and the log's
    path (in a directory of its own, as logrotate has it)."""
    logs = tmp_path / "sfive"
    logs.mkdir()
    log = logs / "sfive.log"
    nginx = nginx_factory(files=FILES, extra_http=(
        f"    include {SOURCE_DIR}/sfive-log.conf;\n"
        f"    access_log {log} sfive buffer=64k flush=1s;\n"))
    return nginx, log


def start_service(path, hub):
    """The service as twistd builds it, following the access log."""
    options = Options()
    options.parseOptions([*STREAMER_ARGS, "--file", str(path), "-s", hub.path,
                          "--grace", GRACE, "--flush-period", str(FLUSH)])
    service = makeService(options)
    service.startService()
    return service


def source(service) -> FileFollowService:
    return service.getServiceNamed("fetch")


def truth(nginx):
    return [e for e in nginx.access_log() if e["uri"] != "/sfive"]


def at_end(service, log):
    """The follower has read every open file to its end."""
    follower = source(service)
    f = follower.current
    return (f is not None and f.line_end == os.path.getsize(log)
            and all(r.line_end == os.fstat(r.fd).st_size for r in follower.rotated))


@defer.inlineCallbacks
def flushed_and_read(service, log):
    """Wait out nginx's flush period (every buffered line is then in the file), then until the
    service has read everything."""
    since = time.time()
    yield wait_for(lambda: time.time() >= since + FLUSH + 0.5, what="nginx's flush period")
    yield wait_for(lambda: at_end(service, log), timeout=10, what="the service to read it all")


@defer.inlineCallbacks
def next_second():
    second = int(time.time())
    yield wait_for(lambda: time.time() >= second + 1, what="the next interval")


@pytest_twisted.inlineCallbacks
def test_rotations_restart_and_backfill_give_exactly_the_truth(nginx_factory, hubs,  # noqa: F811
                                                               services, tmp_path):  # noqa: F811
    nginx, log = nginx_logging(nginx_factory, tmp_path)
    hub = hubs()
    a = start_service(log, hub)
    services.append(a)
    yield wait_for(lambda: source(a).current is not None, what="the service to open the log")
    yield wait_for(lambda: time.time() >= a.model.first * a.model.duration,
                   what="the first interval")

    yield viewers(nginx, "r0")
    yield next_second()
    # logrotate's default: rename, then USR1; each worker flushes its buffer into the old file
    # when it reopens, one after another
    os.rename(log, str(log) + ".1")
    os.kill(nginx.process.pid, signal.SIGUSR1)
    yield viewers(nginx, "r1")
    yield wait_for(lambda: log.exists(), what="nginx to reopen its log")
    yield next_second()
    yield viewers(nginx, "r2")
    yield flushed_and_read(a, log)
    assert os.path.getsize(log) > 0
    # copytruncate, as logrotate does it: copy, then truncate in place
    shutil.copyfile(log, str(log) + ".c")
    os.truncate(log, 0)
    copied_at = time.time()
    yield viewers(nginx, "r3")
    yield flushed_and_read(a, log)
    assert a.stats.file_truncations == 1 and a.stats.file_rotations == 1
    assert not source(a).rotated, "the renamed file is let go once quiet"
    yield a.stopService()

    yield next_second()
    yield viewers(nginx, "down")  # nobody follows the log: replay fills these intervals
    yield next_second()
    b = start_service(log, hub)
    services.append(b)
    yield wait_for(lambda: time.time() >= b.model.first * b.model.duration,
                   what="B's first interval")
    yield viewers(nginx, "r4")
    yield next_second()
    yield viewers(nginx, "r5")
    yield next_second()
    yield next_second()
    yield viewers(nginx, "r6")  # the input then reaches past the hole by more than --grace
    yield flushed_and_read(b, log)
    last = max(map(interval_of, truth(nginx)))
    yield wait_for(lambda: any(d["start-time"] == start_time(last) for d in hub.read()), timeout=10,
                   what="the last interval reported")
    yield b.stopService()

    datasets = hub.read()
    full = [d for d in datasets if d["duration-ms"] == 1000]
    partial = [d for d in datasets if d["duration-ms"] < 1000]
    hole = (a.model.reported + 1, b.model.first)  # A's last interval was cut short at its stop
    assert hole[0] < hole[1]
    result = subprocess.run(
        [REPLAY, *STREAMER_ARGS, "--grace", "2", "--from", start_time(hole[0]),
         "--until", start_time(hole[1]), str(log) + ".1", str(log) + ".c", str(log)],
        capture_output=True, timeout=30)
    assert result.returncode == 0, result.stderr
    replayed = [json.loads(raw) for raw in result.stdout.splitlines()]
    assert {_start(d) for d in replayed} == set(range(*hole))
    assert any(d["data"]["clients"] for d in replayed), "the hole had viewers"

    got = by_interval(full + replayed)  # raises on two datasets for one interval and streamer
    expected = expected_from_access_log(truth(nginx))
    lossy = window_intervals(nginx, log)  # copytruncate's window (empty unless a flush hit it)
    assert all(abs(k - copied_at) < 3 for k in lossy), lossy
    cut = {_start(d) for d in partial}
    for key, clients in expected.items():
        if key[0] >= a.model.first and key[0] not in lossy | cut:
            assert got.get(key) == dict(clients), key
    for key, clients in got.items():
        if key[0] not in lossy:
            assert clients == dict(expected.get(key, {})), key
    for key, clients in by_interval(partial).items():  # cut short at a stop: part of the truth
        for client, sent in clients.items():
            assert sent <= expected[key][client]
    assert a.stats.late == b.stats.late == 0
    assert a.stats.rejected["status"] > 0 and a.stats.rejected.get("invalid-json", 0) == 0


def _start(d):
    return int(datetime.strptime(d["start-time"], "%Y-%m-%dT%H:%M:%SZ")
               .replace(tzinfo=timezone.utc).timestamp())


def window_intervals(nginx, log):
    """Intervals with lines that copytruncate's window lost: in the truth, in no file."""
    names = (str(log) + ".1", str(log) + ".c", str(log))
    return {interval_of(e) for e in lost_lines(truth(nginx), names)}


TWISTD = str(Path(sys.executable).parent / "twistd")


@pytest_twisted.inlineCallbacks
def test_twistd_with_a_state_dir_resumes_exactly_after_restart_and_sigkill(
        nginx_factory, hubs, tmp_path):  # noqa: F811
    """The real twistd with --file and --state-dir: rename+USR1, a SIGTERM restart, a
    copytruncate, a SIGKILL; every interval from the first to the last exactly once, equal to
    the truth (the state store keeps model and position in one checkpoint)."""
    nginx, log = nginx_logging(nginx_factory, tmp_path)
    hub = hubs()
    runs = []

    def twistd():
        proc = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "-l", str(tmp_path / f"twistd{len(runs)}.log"),
             "sfive-ngxlua", *STREAMER_ARGS, "--file", str(log), "-s", hub.path,
             "--grace", GRACE, "--state-dir", str(tmp_path / "state")], cwd=tmp_path)
        runs.append(proc)
        return proc

    def logged(text, run=None):
        names = tmp_path.glob("twistd*.log") if run is None else [tmp_path / f"twistd{run}.log"]
        return any(p.exists() and text in p.read_text() for p in names)

    @defer.inlineCallbacks
    def stopped(proc, sig):
        proc.send_signal(sig)
        yield wait_for(lambda: proc.poll() is not None, timeout=20, what="twistd to end")

    try:
        proc = twistd()
        yield wait_for(lambda: logged("following"), timeout=30, what="twistd to follow the log")
        yield wait_for(lambda: hub.read(), timeout=10, what="the first datasets")
        first = min(_start(d) for d in hub.read())
        yield viewers(nginx, "r0")
        yield next_second()
        os.rename(log, str(log) + ".1")
        os.kill(nginx.process.pid, signal.SIGUSR1)
        yield viewers(nginx, "r1")
        yield stopped(proc, signal.SIGTERM)  # a service restart: the state is saved
        yield viewers(nginx, "while-stopped")
        proc = twistd()
        yield wait_for(lambda: logged("resuming", 1), timeout=30, what="twistd to resume")
        yield viewers(nginx, "r2")
        yield wait_for(lambda: os.path.getsize(log) > 0, timeout=5, what="lines in the log")
        shutil.copyfile(log, str(log) + ".c")
        os.truncate(log, 0)
        copied_at = time.time()
        yield viewers(nginx, "r3")
        yield next_second()
        yield next_second()  # a checkpoint (every second) has the copytruncate behind it
        yield stopped(proc, signal.SIGKILL)  # a crash
        yield viewers(nginx, "while-dead")
        proc = twistd()
        yield wait_for(lambda: logged("resuming", 2), timeout=30,
                       what="twistd to resume after the crash")
        yield viewers(nginx, "r4")
        yield next_second()
        yield next_second()
        yield viewers(nginx, "r5")
        last = max(map(interval_of, truth(nginx)))
        yield wait_for(lambda: any(_start(d) > last + 1 for d in hub.read()), timeout=15,
                       what="the intervals after the last request reported")
        yield stopped(proc, signal.SIGTERM)
    finally:
        for p in runs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    datasets = [d for d in hub.read() if first <= _start(d) <= last]
    assert all(d["duration-ms"] == 1000 for d in datasets), "a state dir reports no part"
    # a SIGKILL between a dataset's sending and its deletion from the queue sends it again
    # after the restart, identical (README: crash): one dataset at most, since each is deleted
    # before the next goes out
    unique = list({json.dumps(d, sort_keys=True): d for d in datasets}.values())
    assert len(datasets) - len(unique) <= 1, "more than the dataset in flight at the kill twice"
    got = by_interval(unique)  # raises on two different datasets for one interval and streamer
    expected = expected_from_access_log(truth(nginx))
    lossy = window_intervals(nginx, log)
    assert all(abs(k - copied_at) < 3 for k in lossy), lossy
    for key, clients in expected.items():
        if first <= key[0] <= last and key[0] not in lossy:
            assert got.get(key) == dict(clients), key
    for key, clients in got.items():
        if key[0] not in lossy:
            assert clients == dict(expected.get(key, {})), key
    assert logged("truncated in place")
    assert not logged("Traceback")
