"""Replay's start-up: wall time from the process's start to its opening the first input.

    python bench/replay_startup.py [--repeat 15] [--replay .venv/bin/sfive-ngxlua-replay]

The input is a FIFO: the writer's open() returns the moment replay opens it to read, which is
where reading begins. Prints the median, the best and the worst of --repeat runs, then (once)
`python -X importtime` of the replay module's ten heaviest imports.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINE = (b'{"time":"2026-11-27T20:00:00+00:00","client":"10.0.0.1","ua":"p","url":'
        b'"/live/hls/foo-high/1.ts","status":200,"bytes-sent":100}\n')


def once(replay: str, directory: str) -> float:
    fifo = os.path.join(directory, "in.fifo")
    if os.path.exists(fifo):
        os.unlink(fifo)
    os.mkfifo(fifo)
    started = time.monotonic()
    child = subprocess.Popen([replay, "-S", "foo/hls/high", "-q", fifo],
                             stdout=subprocess.DEVNULL)
    with open(fifo, "wb") as f:
        opened = time.monotonic()
        f.write(LINE)
    child.wait(30)
    return opened - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--replay", default=str(ROOT / ".venv" / "bin" / "sfive-ngxlua-replay"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        times = [once(args.replay, directory) for _ in range(args.repeat)]
    print(f"replay start-up to the first input opened: median {statistics.median(times):.3f} s, "
          f"best {min(times):.3f} s, worst {max(times):.3f} s ({args.repeat} runs)")
    python = str(Path(args.replay).parent / "python")
    out = subprocess.run([python, "-X", "importtime", "-c", "import sfive_ngxlua.replay"],
                         capture_output=True, text=True).stderr.splitlines()
    rows = []
    for row in out:
        parts = row.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            rows.append((int(parts[1]), parts[2].rstrip()))
    for cumulative, name in sorted(rows, reverse=True)[:10]:
        print(f"  {cumulative / 1000:7.1f} ms cumulative  {name}")
    sys.exit(0)


if __name__ == "__main__":
    main()
