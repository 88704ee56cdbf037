"""sfive-ngxlua-replay --from/--until: exactly the window's intervals, complete, from rotated
access logs (oldest first, .gz too); lines outside are counted, not kept."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from helpers.faults import iso
from support import line
from twisted.python import usage

from sfive_ngxlua.replay import Replay, ReplayOptions
from sfive_ngxlua.settings import Settings
from sfive_ngxlua.sinks import CallableSink

T0 = 1795856400  # on a 10 s boundary
REPLAY = str(Path(sys.executable).parent / "sfive-ngxlua-replay")
ARGS = ["-S", "C1/hls/high", "-n", "edge1", "-d", "10", "--grace", "2"]


def access_log(start, seconds, per_second=4):
    """Lines as nginx writes the sfive log: seconds only, two workers out of order by a second."""
    out = []
    for s in range(seconds):
        for i in range(per_second):
            t = start + s - (1 if i % 2 and s else 0)
            out.append(line(iso(t), url="/live/hls/C1-high/s.ts", client=f"10.0.0.{i}",
                            sent=t - T0 + 100))
    return out


def truth(lines, lo, hi):
    """interval start -> bytes per client, for the window."""
    out = {}
    for raw in lines:
        obj = json.loads(raw)
        t = int(time.mktime(time.strptime(obj["time"][:19], "%Y-%m-%dT%H:%M:%S"))) - time.timezone
        if lo <= t < hi:
            k = t - t % 10
            out.setdefault(k, Counter())[obj["client"]] += obj["bytes-sent"]
    return out


def got(stdout):
    out = {}
    for raw in stdout.splitlines():
        d = json.loads(raw)
        start = int(time.mktime(time.strptime(d["start-time"], "%Y-%m-%dT%H:%M:%SZ"))) - \
            time.timezone
        assert start not in out, f"two datasets for {d['start-time']}"
        assert d["duration-ms"] == 10000
        out[start] = Counter({c["ip"]: c["bytes-sent"] for c in d["data"]["clients"]})
    return out


def test_the_window_of_rotated_logs_is_exact_and_nothing_else(tmp_path):
    lines = access_log(T0 - 40, 120)
    parts = [lines[:150], lines[150:330], lines[330:]]
    with gzip.open(tmp_path / "sfive.log.2.gz", "wb") as f:
        f.writelines(parts[0])
    (tmp_path / "sfive.log.1").write_bytes(b"".join(parts[1]))
    (tmp_path / "sfive.log").write_bytes(b"".join(parts[2]))
    lo, hi = T0, T0 + 50
    result = subprocess.run(
        [REPLAY, *ARGS, "--from", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(lo)),
         "--until", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(hi)),
         str(tmp_path / "sfive.log.2.gz"), str(tmp_path / "sfive.log.1"),
         str(tmp_path / "sfive.log")], capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert got(result.stdout) == truth(lines, lo, hi)
    assert sorted(got(result.stdout)) == list(range(lo, hi, 10))
    inside = sum(1 for raw in lines if lo <= _t(raw) < hi)
    summary = result.stderr.decode()
    assert f"{inside} accepted" in summary
    assert f"{len(lines) - inside} outside --from/--until" in summary


def _t(raw):
    return int(time.mktime(time.strptime(json.loads(raw)["time"][:19],
                                         "%Y-%m-%dT%H:%M:%S"))) - time.timezone


def replay(lines, lo, hi):
    options = ReplayOptions()
    args = [*ARGS]
    if lo is not None:
        args += ["--from", iso(lo)]
    if hi is not None:
        args += ["--until", iso(hi)]
    options.parseOptions(args)
    out = []
    r = Replay(options.settings(), CallableSink(out.append), window=options.window)
    for raw in lines:
        r.feed(raw)
    r.finish()
    return out, r


def test_intervals_the_input_does_not_cover_are_not_emitted():
    lines = access_log(T0 + 3, 30)  # starts inside the first interval, ends before --until
    out, r = replay(lines, T0, T0 + 100)
    starts = sorted({d["start-time"] for d in out})
    assert starts == [time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(T0 + k))
                      for k in (10, 20)]  # T0 is partial, T0+30 not complete by the input's end
    phrases = r.model.uncovered()
    assert len(phrases) == 2 and "begins at" in phrases[0] and "ends at" in phrases[1]


def test_only_from_or_only_until():
    lines = access_log(T0 - 20, 60)
    out, _ = replay(lines, T0, None)
    assert min(d["start-time"] for d in out) == time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                              time.gmtime(T0))
    out, _ = replay(lines, None, T0)
    assert max(d["start-time"] for d in out) == time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                              time.gmtime(T0 - 10))


@pytest.mark.parametrize("args, message", [
    (["--from", "yesterday"], "not an ISO 8601 time"),
    (["--from", "2026-11-27T20:00:00"], "not an ISO 8601 time"),
    (["--from", "2026-11-27T20:00:05Z"], "not on an interval boundary"),
    (["--from", "2026-11-27T20:00:00Z", "--until", "2026-11-27T20:00:00Z"], "is not before"),
])
def test_bad_windows_are_refused_clearly(args, message):
    with pytest.raises(usage.UsageError, match=message):
        ReplayOptions().parseOptions([*ARGS, *args])


def test_settings_are_unchanged_by_a_window():
    options = ReplayOptions()
    options.parseOptions([*ARGS, "--from", "2026-11-27T20:00:00Z"])
    assert isinstance(options.settings(), Settings)


def test_the_window_to_the_hub(tmp_path):
    from support import DatagramHub

    lines = access_log(T0 - 20, 60)
    (tmp_path / "sfive.log").write_bytes(b"".join(lines))
    hub = DatagramHub(str(tmp_path / "hub.sock"))
    try:
        result = subprocess.run(
            [REPLAY, *ARGS, "-s", hub.path, "--from", iso(T0), "--until", iso(T0 + 20),
             str(tmp_path / "sfive.log")], capture_output=True, timeout=60)
        assert result.returncode == 0, result.stderr
        received = hub.read()
    finally:
        hub.close()
    assert got(b"\n".join(json.dumps(d).encode() for d in received)) == truth(lines, T0, T0 + 20)
    assert "outside --from/--until" in result.stderr.decode()


def test_the_window_holds_with_change_tracking_on():
    """Tracking changes (``take_changes``) once swapped ``add`` on the instance and so skipped
    the window's own ``add``: a record outside the window was counted."""
    from sfive_ngxlua.records import Record
    from sfive_ngxlua.replay import WindowModel
    from sfive_ngxlua.stats import Stats

    options = ReplayOptions()
    options.parseOptions([*ARGS, "--from", iso(T0), "--until", iso(T0 + 20)])
    stats = Stats()
    model = WindowModel(options.settings(), stats, T0, T0 + 20)
    streamer = ("C1", "hls", "high")
    model.take_changes()
    assert not model.add(Record(T0 - 5, streamer, "c", "ua", 9)), "before the window"
    assert model.add(Record(T0 + 1, streamer, "a", "ua", 5))
    assert not model.add(Record(T0 + 25, streamer, "b", "ua", 7)), "after the window"
    assert (stats.accepted, model.before, model.after) == (1, 1, 1)
    assert [row[2:] for row in model.take_changes().clients] == [("a", "ua", 5)]
