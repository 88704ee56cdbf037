"""sfive-ngxlua-replay: the service's rules on recorded input, through the same sinks."""

import gzip
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytest_twisted
from helpers.faults import iso
from support import DatagramHub, Exporter, line, wait_for
from twisted.internet import reactor, task

from sfive_ngxlua.replay import Progress, Replay
from sfive_ngxlua.service import build
from sfive_ngxlua.settings import Settings
from sfive_ngxlua.sinks import CallableSink
from sfive_ngxlua.stats import Stats

T0 = 1795856400
STREAMERS = (("C1", "hls", "high"), ("C1", "dash", "low"))
REPLAY = str(Path(sys.executable).parent / "sfive-ngxlua-replay")
ARGS = ["-S", "C1/hls/high", "-S", "C1/dash/low", "-n", "edge1", "-d", "10", "-t", "backfill"]




def recorded(n=300):
    """Lines over ~30 s: two streams, several clients, some rejects, mild reordering."""
    out = []
    for i in range(n):
        t = T0 + i // 10
        url = "/live/hls/C1-high/s.ts" if i % 3 else "/live/dash/C1-low/s.m4s"
        out.append(line(iso(t, ms=(i * 37) % 1000), url=url, client=f"10.0.0.{i % 7}",
                        ua=f"ua{i % 3}", sent=i, status=404 if i % 17 == 0 else 200, seq=i))
        if i % 50 == 0:
            out.append(b"not json\n")
    return out


def settings(**kw):
    return Settings(streamers=STREAMERS, hostname="edge1", duration=10, tags=("backfill",), **kw)


@pytest_twisted.inlineCallbacks
def test_replay_equals_the_live_service_for_the_same_records():
    lines = recorded()
    exporter = Exporter().listen()
    clock = task.Clock()
    clock.advance(T0)
    live, stats = [], Stats()
    service = build(settings(url=exporter.url()), reactor, sink=CallableSink(live.append, stats),
                    clock=clock, stats=stats)
    service.startService()
    try:
        yield wait_for(lambda: exporter.streams)
        for n, data in enumerate(lines, 1):
            exporter.send(data)
            yield wait_for(lambda n=n: stats.lines == n, step=0.001)
            now = json.loads(data)["time"] if data.startswith(b"{") else None
            if now is not None:
                clock.advance(max(0, T0 + (n // 11) - clock.seconds()))
        clock.advance(T0 + 41 - clock.seconds())
    finally:
        yield service.stopService()
        yield exporter.stop()
    replayed = []
    replay = Replay(settings(), CallableSink(replayed.append))
    for data in lines:
        replay.feed(data[:5])
        replay.feed(data[5:])
    replay.finish()
    assert replayed == live[:6]
    assert len(replayed) == 6
    assert replay.stats.accepted == stats.accepted
    assert dict(replay.stats.rejected) == dict(stats.rejected)


def test_late_and_out_of_order_records_follow_the_service_rules():
    got = []
    replay = Replay(settings(), CallableSink(got.append))
    replay.feed(line(iso(T0 + 1), sent=1) + line(iso(T0 + 10), sent=2)
                + line(iso(T0 + 9), sent=4)         # within grace: its own interval
                + line(iso(T0 + 11), sent=8)        # makes T0 due (10 + grace 1)
                + line(iso(T0 + 5), sent=16))       # late: goes to the oldest open one
    replay.finish()
    assert [(d["start-time"], d["data"]["bytes-sent"]) for d in got[::2]] == [
        ("2026-11-28T09:00:00Z", 5), ("2026-11-28T09:00:10Z", 26)]
    assert replay.stats.late == 1


def write_inputs(tmp_path):
    lines = b"".join(recorded())
    plain = tmp_path / "rec.log"
    plain.write_bytes(lines[:-1])  # no final newline: the last line still counts
    with gzip.open(tmp_path / "rec.log.1.gz", "wb") as f:
        f.write(lines)
    return plain, tmp_path / "rec.log.1.gz"


def test_cli_plain_gzip_and_stdin_agree(tmp_path):
    plain, gz = write_inputs(tmp_path)
    a = subprocess.run([REPLAY, *ARGS, str(plain)], capture_output=True, check=True)
    b = subprocess.run([REPLAY, *ARGS, str(gz)], capture_output=True, check=True)
    c = subprocess.run([REPLAY, *ARGS, "-"], input=plain.read_bytes(), capture_output=True,
                       check=True)
    assert a.stdout == b.stdout == c.stdout
    datasets = [json.loads(x) for x in a.stdout.splitlines()]
    assert len(datasets) == 6
    assert [d["start-time"] for d in datasets[::2]] == [
        "2026-11-28T09:00:00Z", "2026-11-28T09:00:10Z", "2026-11-28T09:00:20Z"]
    assert all(d["tags"] == ["backfill"] and d["hostname"] == "edge1" for d in datasets)
    expected = sum(i for i in range(300) if i % 17)
    assert sum(d["data"]["bytes-sent"] for d in datasets) == expected
    assert a.stderr.decode().strip() == (
        "sfive-ngxlua-replay: 306 lines, 282 accepted, 24 rejected (invalid-json=6, "
        "status=18), 0 late, 0 before the first interval, 0 folded into overflow, "
        "0 lost in exporter gaps, 6 datasets")


def test_cli_unreadable_file_is_named_and_fails(tmp_path):
    plain, _ = write_inputs(tmp_path)
    bad = subprocess.run([REPLAY, *ARGS, str(plain), str(tmp_path / "missing.log")],
                         capture_output=True)
    assert bad.returncode == 2
    assert bad.stdout == b""
    assert b"cannot read " + str(tmp_path / "missing.log").encode() in bad.stderr
    assert b"Traceback" not in bad.stderr
    corrupt = tmp_path / "corrupt.gz"
    corrupt.write_bytes(gzip.compress(b"".join(recorded()))[:-40])
    broken = subprocess.run([REPLAY, *ARGS, str(corrupt)], capture_output=True)
    assert broken.returncode == 1
    assert b"error reading " + str(corrupt).encode() in broken.stderr
    assert b"Traceback" not in broken.stderr


def test_cli_bad_options_exit_64(tmp_path):
    done = subprocess.run([REPLAY, "-S", "a/b"], capture_output=True, text=True)
    assert done.returncode == 64
    assert "must be three parts" in done.stderr


@pytest.mark.parametrize("limit", [["--queue-limit", "20"], ["--queue-bytes", "2K"]])
@pytest_twisted.inlineCallbacks
def test_cli_to_a_real_hub_socket_without_losing_datasets(tmp_path, limit):
    """More datasets than the hub's queue holds (by count or by bytes) and than the kernel's
    datagram queue: replay waits for the hub instead of dropping any."""
    hub = DatagramHub(str(tmp_path / "hub.sock"))
    lines = b"".join(line(iso(T0 + s), sent=1) for s in range(0, 500))
    (tmp_path / "long.log").write_bytes(lines)
    proc = subprocess.Popen([REPLAY, *ARGS, "-d", "1", *limit, "-s", hub.path,
                             str(tmp_path / "long.log")], stderr=subprocess.PIPE)
    try:
        yield wait_for(lambda: [hub.read(), proc.poll()][1] is not None, timeout=60, step=0.002)
    finally:
        hub.read()
        hub.close()
    assert proc.returncode == 0, proc.stderr.read()
    datasets = [json.loads(d) for d in hub.datagrams]
    assert len(datasets) == 1000
    assert [d["start-time"] for d in datasets[::2]] == [
        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(T0 + s)) for s in range(500)]


def test_progress_line_only_on_a_terminal():
    class Tty(io.StringIO):
        """A stand-in for a terminal: the real one needs a pty, and only isatty matters."""

        def isatty(self):
            return True

    stats = Stats(lines=1234)
    tty, pipe = Tty(), io.StringIO()
    for stream in (tty, pipe):
        p = Progress(stream, 1000, enabled=True)
        p.update(500, stats, force=True)
        p.done()
    assert "50.0%" in tty.getvalue() and "1,234 lines" in tty.getvalue()
    assert pipe.getvalue() == ""
