"""The access-log follower's throughput against the exporter path, on the same generated lines.

    python bench/follow_throughput.py [--lines 500000] [--repeat 3]

Lines from bench/gen.py (the exporter's layout); the access-log copy has the same lines
without "seq", as nginx/sfive-log.conf writes them. Best of --repeat, CPU seconds of this
process (time.process_time):
(a) follower: FileFollowService (polling, a task.Clock) reads the file from its start to its
    end through its own splitter into the Pipeline and the model;
(b) exporter path: the same Pipeline and model fed the exporter's bytes in 64 KiB chunks, as
    LogFetchService hands over what the HTTP client delivers (the HTTP client's own cost is
    not in this figure, which favours the exporter path).
Both feed a replay-mode model (every record counted, none before the start). Prints a
Markdown table; checks that both accepted the same records and bytes.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from twisted.internet import task  # noqa: E402

from bench import gen  # noqa: E402
from sfive_ngxlua.follow import FileFollowService  # noqa: E402
from sfive_ngxlua.model import IntervalModel  # noqa: E402
from sfive_ngxlua.pipeline import Pipeline  # noqa: E402
from sfive_ngxlua.settings import Settings, parse_streamer_ids  # noqa: E402
from sfive_ngxlua.stats import Stats  # noqa: E402

SEQ = re.compile(rb'^\{"seq":\d+,')


def settings(path: str = "") -> Settings:
    return Settings(streamers=parse_streamer_ids(list(gen.STREAMER_IDS)),
                    nameformat=gen.NAMEFORMAT, file=path or None)


def follower(path: str) -> tuple[float, Stats]:
    open(path, "ab").close()
    size = os.path.getsize(path)
    s = settings(path)
    stats = Stats()
    pipeline = Pipeline(s, stats, IntervalModel(s, stats, start=None))
    clock = task.Clock()
    service = FileFollowService(s, None, pipeline, stats, clock=clock, inotify=False)
    service.resume({"kind": "file", "path": os.path.abspath(path), "file": _ident(path),
                    "rotated": []})
    started = time.process_time()
    service.startService()
    while service.current.line_end < size:
        clock.advance(0)
    spent = time.process_time() - started
    service.stopService()
    return spent, stats


def _ident(path: str) -> dict:
    from sfive_ngxlua.follow import HEAD, _digest

    st = os.stat(path)
    with open(path, "rb") as f:
        head = f.read(HEAD)
    nl = head.find(b"\n")
    head = head[: nl + 1] if nl >= 0 else head
    return {"dev": st.st_dev, "ino": st.st_ino, "head": _digest(head), "head_len": len(head),
            "offset": 0}


def exporter(data: bytes) -> tuple[float, Stats]:
    s = settings()
    stats = Stats()
    pipeline = Pipeline(s, stats, IntervalModel(s, stats, start=None))
    step = 1 << 16
    started = time.process_time()
    for i in range(0, len(data), step):
        pipeline.feed(data[i:i + step])
    pipeline.feed(b"\n")
    return time.process_time() - started, stats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=500_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    lines = list(gen.generate(args.lines, seed=1))
    exported = b"".join(lines)
    logged = b"".join(SEQ.sub(b"{", ln) for ln in lines)
    rows = {}
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "sfive.log")
        with open(path, "wb") as f:
            f.write(logged)
        for name, run in (("follower (--file)", lambda: follower(path)),
                          ("exporter path (Pipeline.feed)", lambda: exporter(exported))):
            best = None
            for _ in range(args.repeat):
                spent, stats = run()
                best = spent if best is None else min(best, spent)
            rows[name] = (best, stats)
            print(f"{name}: {best:.2f} s", file=sys.stderr)
    (fs, fstats), (es, estats) = rows.values()
    assert (fstats.accepted, fstats.lines) == (estats.accepted, estats.lines), (fstats, estats)
    print("| path | lines | CPU s | lines/s | CPU us/line |\n|---|---:|---:|---:|---:|")
    for name, (spent, stats) in rows.items():
        print(f"| {name} | {stats.lines:,} | {spent:.2f} | {stats.lines / spent:,.0f} | "
              f"{1e6 * spent / stats.lines:.2f} |")
    print(f"\nfollower / exporter path CPU: {fs / es:.2f}; accepted {fstats.accepted:,} both")


if __name__ == "__main__":
    main()
