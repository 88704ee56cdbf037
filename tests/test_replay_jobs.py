"""sfive-ngxlua-replay --jobs: the datasets and the summary of one process, byte for byte, on
many files and on one large one cut into byte ranges, with the rules that depend on order
exercised at the cuts (late records, folding at --max-clients, far-future records, records
before the first interval, --from/--until coverage), to standard output and to a hub."""

import gzip
import io
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytest_twisted
from helpers.faults import iso
from support import DatagramHub, heartbeat, line, wait_for

from sfive_ngxlua import parallel
from sfive_ngxlua.replay import run
from sfive_ngxlua.settings import Settings
from sfive_ngxlua.stats import Stats

T0 = 1795856400
REPLAY = str(Path(sys.executable).parent / "sfive-ngxlua-replay")
ARGS = ["-S", "C1/hls/high", "-S", "C1/dash/low", "-n", "edge1", "-d", "10", "--max-clients",
        "6"]


def settings(**kw):
    return Settings(streamers=(("C1", "hls", "high"), ("C1", "dash", "low")), hostname="edge1",
                    duration=10, max_clients=kw.pop("max_clients", 6), **kw)




def traffic(seconds=600, per_second=12, seed=1, future=None, clients=9):
    """Lines in time order with mild reordering (up to 3 s), some late records (20-40 s
    behind), more clients than --max-clients in some intervals, rejects, gaps, heartbeats and
    (``future``: at these line numbers) a record a day ahead."""
    rng = random.Random(seed)
    out = []
    n = 0
    for s in range(seconds):
        for _ in range(per_second):
            n += 1
            t = T0 + s - (rng.random() < 0.2) * rng.randrange(0, 4)
            if rng.random() < 0.01:
                t -= rng.randrange(20, 40)  # late: its interval is already reported
            if future and n in future:
                t = T0 + 86400
            many = clients * (4 if (s // 10) % 5 == 0 else 1)  # every fifth interval: folding
            url = "/live/hls/C1-high/s.ts" if rng.random() < 0.7 else "/live/dash/C1-low/s.m4s"
            out.append(line(iso(t, ms=rng.randrange(1000)), url=url,
                            client=f"10.0.0.{rng.randrange(many)}", ua=f"ua{rng.randrange(2)}",
                            sent=rng.randrange(1, 5000), status=rng.choice((200, 200, 404)),
                            seq=n))
            if rng.random() < 0.005:
                out.append(b"not json\n")
        if s % 50 == 0:
            out.append(heartbeat(n, T0 + s))
        if s % 97 == 0:
            out.append(b'{"seq":%d,"lost":3}\n' % (n + 1))
    return out


def one_and_many(files, jobs=2, unit_bytes=4096, window=None, **kw):
    """(stdout, stderr) of --jobs 1 and of --jobs ``jobs``."""
    got = []
    for n in (1, jobs):
        out, err = io.BytesIO(), io.StringIO()
        assert run(settings(**kw), [str(f) for f in files], out=out, err=err, jobs=n,
                   unit_bytes=unit_bytes, window=window) == 0
        got.append((out.getvalue(), err.getvalue()))
    return got


def spread(files, jobs=2, unit_bytes=4096, window=None, **kw):
    """The leader of a --jobs ``jobs`` replay: how many units it merged, replayed itself."""
    return parallel.run_jobs(settings(**kw), [str(f) for f in files], jobs, io.BytesIO(),
                             _NoProgress(), Stats(), unit_bytes=unit_bytes, window=window)


def test_many_files_byte_for_byte(tmp_path):
    lines = traffic()
    files = []
    for i in range(0, len(lines), 700):  # rotated logs, oldest first; some compressed
        path = tmp_path / f"access.log.{i}"
        data = b"".join(lines[i:i + 700])
        if i % 2100 == 0:
            path = path.with_suffix(".gz")
            path.write_bytes(gzip.compress(data))
        else:
            path.write_bytes(data)
        files.append(path)
    (one, one_err), (many, many_err) = one_and_many(files, unit_bytes=1 << 30)
    assert many == one and many_err == one_err
    assert b"(other clients beyond --max-clients)" in one
    assert " late, " in one_err and ", 0 late" not in one_err
    assert ", 0 folded" not in one_err


def test_one_large_file_cut_in_byte_ranges(tmp_path):
    big = tmp_path / "access.log"
    big.write_bytes(b"".join(traffic(seed=2)))
    (one, one_err), (many, many_err) = one_and_many([big], jobs=3, unit_bytes=20_000)
    assert many == one and many_err == one_err
    assert len(parallel.units([str(big)], 3, 20_000)) > 30


def test_the_cuts_are_replayed_by_workers_and_only_unmergeable_ones_in_order(tmp_path):
    """Most units merge; a unit whose boundary interval folds clients is replayed in order."""
    big = tmp_path / "access.log"
    big.write_bytes(b"".join(traffic(seed=3)))
    leaders = {}
    for cap in (6, 1000):
        out = io.BytesIO()
        leaders[cap] = parallel.run_jobs(settings(max_clients=cap), [str(big)], 2, out,
                                         _NoProgress(), Stats(), unit_bytes=20_000)
    n = len(parallel.units([str(big)], 2, 20_000))
    assert leaders[1000].in_order == 0  # no folding: every unit merged
    assert 0 < leaders[6].in_order < n


def test_far_future_and_early_records_at_the_cuts(tmp_path):
    """A record a day ahead makes everything after it late (into one interval, folding at
    --max-clients): every unit after it is replayed in order, with the same result. A file
    that starts before the first record's interval drops those records the same way."""
    lines = traffic(seconds=300, future={1500, 2900})
    early = [line(iso(T0 - 30), client="10.9.9.9", seq=0)]
    big = tmp_path / "a.log"
    big.write_bytes(b"".join(lines[:2000]))
    rest = tmp_path / "b.log"
    rest.write_bytes(b"".join(early + lines[2000:]))
    (one, one_err), (many, many_err) = one_and_many([big, rest], unit_bytes=15_000)
    assert many == one and many_err == one_err
    assert ", 0 before the first interval" not in one_err
    assert one.count(b"\n") > 17000  # the empty intervals up to the far-future record


LINE = 200
"""Every line of ``at_the_cuts`` has this many bytes, so that the cuts fall where it says."""


def at_the_cuts(per_unit, units=12, per_second=10):
    """(lines, unit_bytes): lines of LINE bytes in time order, cut (``parallel.units``) every
    ``per_unit`` lines, with the previous unit's last line 2 s ahead, the next unit's first
    two 1 and 3 s behind, and its third 25 s behind (late) at every cut."""
    n = per_unit * units
    times = [T0 + i // per_second for i in range(n)]
    for cut in range(per_unit, n, per_unit):
        times[cut - 1] += 2
        times[cut] -= 1
        times[cut + 1] -= 3
        times[cut + 2] -= 25
    out = []
    for i, t in enumerate(times):
        raw = line(iso(t), url="/live/hls/C1-high/s.ts" if i % 3 else "/live/dash/C1-low/s.m4s",
                   client=f"10.0.0.{i % 3}", ua="u", sent=100 + i, seq=i)
        raw = raw.replace(b'"ua":"u"', b'"ua":"' + b"u" * (1 + LINE - len(raw)) + b'"')
        assert len(raw) == LINE
        out.append(raw)
    # units() cuts at multiples of unit_bytes and then reads on to the end of that line
    return out, (per_unit - 1) * LINE


@pytest.mark.parametrize("window", [None, (T0 + 20, T0 + 150)])
def test_out_of_order_records_at_every_cut(tmp_path, window):
    lines, unit_bytes = at_the_cuts(per_unit=150)
    big = tmp_path / "access.log"
    big.write_bytes(b"".join(lines))
    cuts = [u.start for u in parallel.units([str(big)], 2, unit_bytes)]
    assert cuts == [i * 150 * LINE for i in range(12)]
    (one, one_err), (many, many_err) = one_and_many([big], unit_bytes=unit_bytes,
                                                    window=window)
    assert many == one and many_err == one_err
    assert ", 0 late" not in one_err
    leader = spread([big], unit_bytes=unit_bytes, window=window)
    assert (leader.merged, leader.in_order) == (12, 0)


@pytest.mark.parametrize("head_records, head_seconds, merged", [
    (5, 2.0, False),  # every worker gives up on its head: the leader replays each unit
    (100_000, 1e9, True),  # every unit is all head: the leader adds its records in order
])
def test_heads_too_long_and_units_all_head(tmp_path, monkeypatch, head_records, head_seconds,
                                           merged):
    """(The workers are forked: they see the limits patched here.)"""
    monkeypatch.setattr(parallel, "HEAD_RECORDS", head_records)
    monkeypatch.setattr(parallel, "HEAD_SECONDS", head_seconds)
    big = tmp_path / "access.log"
    big.write_bytes(b"".join(traffic(seed=16, clients=2)))
    window = (T0 + 100, T0 + 500)
    (one, one_err), (many, many_err) = one_and_many([big], unit_bytes=20_000, window=window)
    assert many == one and many_err == one_err
    leader = spread([big], unit_bytes=20_000, window=window)
    n = len(parallel.units([str(big)], 2, 20_000))
    if merged:
        assert (leader.merged, leader.in_order) == (1, 0)  # the first unit, and heads
    else:  # (a unit that begins with a late record has a head of one record)
        assert leader.in_order > n * 3 // 4


@pytest.mark.parametrize("overlap", [3, 9, 10, 11, 12, 13, 15, 19, 21, 25, 40])
def test_files_that_overlap_in_time(tmp_path, overlap):
    """Each file starts ``overlap`` seconds before the one before it ends (two servers' logs
    given in turn, or a clock stepped back): what a head cannot absorb is found and replayed
    in order."""
    files = []
    for i in range(4):
        lines = traffic(seconds=60, seed=10 + i)
        path = tmp_path / f"f{i}.log"
        shift = i * (60 - overlap)
        text = b"".join(lines).decode()
        for s in range(59, -45, -1):  # shift every time by ``shift`` seconds, latest first
            text = text.replace(iso(T0 + s)[:19], iso(T0 + s + shift)[:19])
        path.write_text(text)
        files.append(path)
    (one, one_err), (many, many_err) = one_and_many(files, unit_bytes=1 << 30)
    assert many == one and many_err == one_err
    assert ", 0 late" not in one_err


@pytest.mark.parametrize("a_ends, b_starts, b_then, late", [(21, 9, 15, 12), (20, 8, 20, 2)])
def test_a_previous_file_ahead_by_less_than_an_interval(tmp_path, a_ends, b_starts, b_then,
                                                       late):
    """The narrow cases: the file before ends (at ``a_ends``) one interval past where the
    next one's body assumes (its first record, at 11 s after the file's first, lies within
    --grace of an interval's start), or has an interval open beyond the body's first; a
    record after it (at ``b_then``) falls into that interval."""
    a = [line(iso(T0 + s), client=f"10.0.0.{s % 3}") for s in range(a_ends + 1)]
    b = [line(iso(T0 + s), client="10.0.1.1") for s in range(b_starts, b_starts + 11)]
    b += [line(iso(T0 + b_starts + 11), client="10.0.1.2"),
          line(iso(T0 + b_then), client="10.0.1.3")]
    b += [line(iso(T0 + s), client="10.0.1.4") for s in range(21, 40)]
    files = [tmp_path / "a.log", tmp_path / "b.log"]
    files[0].write_bytes(b"".join(a))
    files[1].write_bytes(b"".join(b))
    (one, one_err), (many, many_err) = one_and_many(files, unit_bytes=1 << 30)
    assert many == one and many_err == one_err
    assert f", {late} late" in one_err


def test_cli_default_jobs_many_files_equals_one_job(tmp_path):
    lines = traffic(seconds=200, seed=4)
    files = []
    for i in range(0, len(lines), 500):
        path = tmp_path / f"f{i:05d}.log"
        path.write_bytes(b"".join(lines[i:i + 500]))
        files.append(str(path))
    one = subprocess.run([REPLAY, *ARGS, "--jobs", "1", *files], capture_output=True,
                         check=True)
    many = subprocess.run([REPLAY, *ARGS, *files], capture_output=True, check=True)
    assert many.stdout == one.stdout and many.stderr == one.stderr
    assert one.stdout.count(b"\n") == 2 * 20


def test_cli_bad_jobs_and_a_failing_unit(tmp_path):
    bad = subprocess.run([REPLAY, *ARGS, "--jobs", "0"], capture_output=True, text=True)
    assert bad.returncode == 64 and "--jobs must be a positive integer" in bad.stderr
    good = tmp_path / "a.log"
    good.write_bytes(b"".join(traffic(seconds=100)))
    corrupt = tmp_path / "b.log.gz"
    corrupt.write_bytes(gzip.compress(b"".join(traffic(seconds=100, seed=5)))[:-40])
    done = subprocess.run([REPLAY, *ARGS, "--jobs", "2", str(good), str(corrupt)],
                          capture_output=True, text=True)
    assert done.returncode == 1
    assert f"error reading {corrupt}" in done.stderr
    assert "Traceback" not in done.stderr


def test_cli_interrupted_ends_the_workers(tmp_path):
    big = tmp_path / "big.log"
    big.write_bytes(b"".join(traffic(seconds=3000, per_second=20)) * 3)
    proc = subprocess.Popen([REPLAY, *ARGS, "--jobs", "2", str(big)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(_children(proc.pid)) < 2:
        time.sleep(0.05)
    workers = _children(proc.pid)
    assert len(workers) >= 2, "the workers did not start"
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole group
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err.strip().splitlines() == ["sfive-ngxlua-replay: interrupted"]
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()
                and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]]


def test_cli_a_worker_killed_is_one_line_and_status_1(tmp_path):
    big = tmp_path / "big.log"
    big.write_bytes(b"".join(traffic(seconds=3000, per_second=20)) * 3)
    proc = subprocess.Popen([REPLAY, *ARGS, "--jobs", "2", str(big)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(_children(proc.pid)) < 2:
        time.sleep(0.05)
    workers = _children(proc.pid)
    assert workers, "the workers did not start"
    os.kill(workers[0], signal.SIGKILL)  # as the OOM killer would
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert err.strip().splitlines() == [
        f"sfive-ngxlua-replay: a worker process died while replaying {big}"]


def _children(pid):
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


class _NoProgress:
    def update(self, done, stats, force=False):
        pass


@pytest.mark.parametrize("cut", [0, 1, 2, 3])
def test_units_cover_the_file_on_line_boundaries(tmp_path, cut):
    path = tmp_path / "x.log"
    data = b"".join(traffic(seconds=20, seed=cut)) + b"no newline at the end" * cut
    path.write_bytes(data)
    pieces = parallel.units([str(path)], 2, 1000 + cut)
    assert b"".join(b"".join(parallel.read_unit(u)) for u in pieces) == data
    assert all(data[u.start - 1:u.start] == b"\n" for u in pieces if u.start)


# -- --from/--until ------------------------------------------------------------------------

WINDOWS = [
    (T0 + 100, T0 + 400),  # inside the input
    (T0 - 50, T0 + 300),  # from before the input: its first intervals are not covered
    (T0 + 200, T0 + 1000),  # until after the input: its last intervals are not covered
    (T0 + 250, None),
    (None, T0 + 350),
    (T0 + 700, T0 + 800),  # after the input: nothing to emit
]


def rotated(tmp_path, lines, per=700):
    """``lines`` as rotated logs, oldest first; every third one compressed."""
    files = []
    for i in range(0, len(lines), per):
        data = b"".join(lines[i:i + per])
        if i % (3 * per) == 0:
            path = tmp_path / f"access.log.{i:06d}.gz"
            path.write_bytes(gzip.compress(data))
        else:
            path = tmp_path / f"access.log.{i:06d}"
            path.write_bytes(data)
        files.append(path)
    return files


@pytest.mark.parametrize("window", WINDOWS)
def test_a_window_of_many_files_byte_for_byte(tmp_path, window):
    files = rotated(tmp_path, traffic(seed=11, clients=2))
    (one, one_err), (many, many_err) = one_and_many(files, unit_bytes=1 << 30, window=window)
    assert many == one and many_err == one_err
    assert " outside --from/--until (" in one_err
    if window[0] == T0 - 50:
        assert "; the input begins at " in one_err
    if window[1] in (T0 + 1000, T0 + 800):
        assert "; the input ends at " in one_err
    assert spread(files, unit_bytes=1 << 30, window=window).merged > 0


@pytest.mark.parametrize("window", WINDOWS)
def test_a_window_of_one_large_file_cut_in_byte_ranges(tmp_path, window):
    """Out-of-order records (by up to 3 s, late ones by 20-40 s) and intervals that fold clients
    at --max-clients (every fifth: those cuts are replayed in order) lie at many of the
    cuts."""
    big = tmp_path / "access.log"
    big.write_bytes(b"".join(traffic(seed=12, clients=2)))
    (one, one_err), (many, many_err) = one_and_many([big], jobs=3, unit_bytes=20_000,
                                                    window=window)
    assert many == one and many_err == one_err
    assert ", 0 folded" not in one_err or window[0] == T0 + 700
    leader = spread([big], jobs=3, unit_bytes=20_000, window=window)
    assert leader.merged > len(parallel.units([str(big)], 3, 20_000)) // 2


def test_a_window_with_far_future_records(tmp_path):
    """A record a day ahead lies after the window: it makes the window's intervals due, and
    the records after it late (one process's rules, kept)."""
    big = tmp_path / "access.log"
    big.write_bytes(b"".join(traffic(seconds=300, future={1500, 2900})))
    window = (T0 + 50, T0 + 250)
    (one, one_err), (many, many_err) = one_and_many([big], unit_bytes=15_000, window=window)
    assert many == one and many_err == one_err
    assert ", 0 late" not in one_err
    leader = spread([big], unit_bytes=15_000, window=window)
    assert leader.merged > 1 and leader.in_order > 1  # before the first far-future record, after


@pytest.mark.parametrize("overlap", [3, 11, 21, 40])
def test_a_window_over_files_that_overlap_in_time(tmp_path, overlap):
    files = []
    for i in range(4):
        path = tmp_path / f"f{i}.log"
        shift = i * (60 - overlap)
        text = b"".join(traffic(seconds=60, seed=20 + i)).decode()
        for s in range(59, -45, -1):
            text = text.replace(iso(T0 + s)[:19], iso(T0 + s + shift)[:19])
        path.write_text(text)
        files.append(path)
    window = (T0 + 40, T0 + 150)
    (one, one_err), (many, many_err) = one_and_many(files, unit_bytes=1 << 30, window=window)
    assert many == one and many_err == one_err
    leader = spread(files, unit_bytes=1 << 30, window=window)
    assert leader.merged + leader.in_order == 4 and leader.merged >= 1


class _Tty(io.StringIO):
    """A stand-in for a terminal: the real one needs a pty, and only isatty matters."""

    def isatty(self):
        return True


def test_one_progress_line_and_the_same_summary(tmp_path):
    big = tmp_path / "access.log"
    big.write_bytes(b"".join(traffic(seed=13)))
    got = []
    for jobs in (1, 2):
        err = _Tty()
        assert run(settings(), [str(big)], out=io.BytesIO(), err=err, jobs=jobs,
                   unit_bytes=20_000, window=(T0 + 100, T0 + 400)) == 0
        progress, summary, rest = err.getvalue().split("\n")
        assert rest == "" and progress.startswith("\r") and "100.0%" in progress.split("\r")[-1]
        got.append(summary)
    assert got[0] == got[1] and got[0].startswith("sfive-ngxlua-replay: ")


# -- to the hub ----------------------------------------------------------------------------


class _SenderHub(DatagramHub):
    """The datagram hub, noting each datagram's sender (its pid, from SO_PASSCRED)."""

    def open(self):
        super().open()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        return self

    def take(self):
        n = 0
        while self.sock is not None:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4 << 20, socket.CMSG_SPACE(12))
            except BlockingIOError:
                break
            for level, kind, cdata in ancillary:
                if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS):
                    self.senders.add(struct.unpack("iII", cdata[:12])[0])
            self.datagrams.append(data)
            n += 1
        return n

    senders: set


@pytest_twisted.inlineCallbacks
def test_to_the_hub_many_files_with_a_window_from_the_main_process_only(tmp_path):
    """The hub gets the datagrams of one process, in order, waiting for a queue of 5; with
    --jobs the workers ran (they are the main process's children) and never sent one."""
    files = [str(f) for f in rotated(tmp_path, traffic(seconds=300, seed=14), per=300)]
    got = {}
    for jobs in ("1", "2"):
        hub = _SenderHub(str(tmp_path / f"hub{jobs}.sock"))
        hub.senders = set()
        proc = subprocess.Popen([REPLAY, *ARGS, "--jobs", jobs, "--queue-limit", "5", "-s",
                                 hub.path, "--from", iso(T0 + 30), "--until", iso(T0 + 250),
                                 *files], stderr=subprocess.PIPE, text=True)
        children = set()

        def ended(proc=proc, hub=hub, children=children):
            hub.take()
            children.update(_children(proc.pid))
            return proc.poll() is not None

        try:
            yield wait_for(ended, timeout=120, step=0.002, what="the replay's end")
        finally:
            hub.take()
            hub.close()
        assert proc.returncode == 0
        got[jobs] = (hub.datagrams, proc.stderr.read(), hub.senders, proc.pid, children)
    (one, one_err, _, _, _), (many, many_err, senders, pid, children) = got["1"], got["2"]
    assert many == one and many_err == one_err
    assert len(one) == 2 * 22 and "outside --from/--until" in one_err
    assert senders == {pid} and len(children) >= 2


@pytest.mark.parametrize("cuts", ["too large", "out of order"])
@pytest_twisted.inlineCallbacks
def test_to_the_hub_one_large_file_cut_in_byte_ranges(tmp_path, capsys, monkeypatch, cuts):
    """Byte ranges of one file to the hub, in this process's reactor, with a window: with
    records out of order at every cut; or with one interval's datasets, which a worker
    finishes, too large for a datagram (trimmed, as one process trims them)."""
    from twisted.internet import reactor, task
    from twisted.internet.defer import ensureDeferred

    from sfive_ngxlua.replay import _to_hub

    taken = []
    take = parallel.Leader.take
    monkeypatch.setattr(parallel.Leader, "take", lambda self, unit, result: (
        taken.append(result.body), take(self, unit, result))[1])

    if cuts == "out of order":
        lines, unit_bytes = at_the_cuts(per_unit=150)
    else:  # the first unit holds the crowd's interval whole
        lines, unit_bytes = traffic(seconds=300, seed=15), 1_100_000
        crowd = [line(iso(T0 + 48), client=f"10.{i >> 8}.{i & 255}.9", ua=f"player/{i}",
                      seq=0) for i in range(5000)]
        lines = lines[:600] + crowd + lines[600:]
    big = tmp_path / "access.log"
    big.write_bytes(b"".join(lines))
    got = []
    for jobs in (1, 2):
        hub = DatagramHub(str(tmp_path / f"hub{jobs}.sock"))
        reading = task.LoopingCall(hub.take)
        reading.start(0.002)
        status = []
        try:
            yield ensureDeferred(_to_hub(
                reactor, settings(max_clients=50000, socket=hub.path, queue_limit=5),
                [str(big)], False, status, (T0 + 20, T0 + 150), jobs, unit_bytes))
        finally:
            reading.stop()
            hub.take()
            hub.close()
        assert status == [0]
        got.append((hub.datagrams, capsys.readouterr().err))
    assert got[1] == got[0]
    assert len(got[0][0]) == 2 * 13 and "outside --from/--until" in got[0][1]
    assert len(taken) == len(parallel.units([str(big)], 2, unit_bytes)) and any(taken)
    if cuts == "too large":
        trimmed = [d for d in map(json.loads, got[0][0])
                   if len(d["data"]["clients"]) < d["data"]["client-count"]]
        assert trimmed and all(d["data"]["client-count"] > 5000 for d in trimmed)
