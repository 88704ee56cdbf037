"""sfive-ngxlua-replay --jobs N: how it scales, and that the datasets stay byte for byte.

    python bench/replay_jobs.py [--lines 1000000] [--jobs 1,2] [--repeat 3] [--files 1]

Generates the input (bench/gen.py: one file, or --files rotated ones), then runs the replay
with each --jobs in turn (alternating, --repeat rounds), and prints per N the median wall time,
the CPU time of all its processes (user + system, from the kernel's rusage of the children)
and its peak RSS per process, the speed-up on wall time against --jobs 1, and whether the
output is byte for byte that of --jobs 1 (it fails if not). On a shared machine the wall time
moves with the others' load; the CPU time says what the work costs. So it also splits, for
each N (in this process, through ``sfive_ngxlua.parallel.run_jobs``), the CPU time of the main
process (its in-order part: heads, merges, copying) from the workers', and projects the wall
time on N idle cores as main + workers / N, against the same split of --jobs 1 (the main
process's share counted as if it never overlapped the workers': a lower bound).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import gen  # noqa: E402

REPLAY = str(Path(sys.executable).parent / "sfive-ngxlua-replay")


def once(files: list[str], jobs: int) -> tuple[float, float, float, str]:
    """(wall s, CPU s of the process and its workers, peak RSS MiB of the largest one,
    sha256 of stdout) of one replay."""
    args = ["-n", "bench", "-d", "15", "-F", gen.NAMEFORMAT, "-q", "--jobs", str(jobs)]
    for spec in gen.STREAMER_IDS:
        args += ["-S", spec]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    done = subprocess.run([REPLAY, *args, *files], capture_output=True, check=True)
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, after.ru_maxrss / 1024, hashlib.sha256(done.stdout).hexdigest()


def split(files: list[str], jobs: int) -> tuple[float, float]:
    """(CPU s of the main process, CPU s of the workers) of one in-process run_jobs."""
    import io

    from sfive_ngxlua.parallel import run_jobs
    from sfive_ngxlua.settings import Settings, parse_streamer_ids
    from sfive_ngxlua.stats import Stats

    class Quiet:
        def update(self, *args: object) -> None:
            pass

    settings = Settings(streamers=parse_streamer_ids(list(gen.STREAMER_IDS)), hostname="bench",
                        nameformat=gen.NAMEFORMAT)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    mine = time.process_time()
    run_jobs(settings, files, jobs, io.BytesIO(), Quiet(), Stats())
    mine = time.process_time() - mine
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return mine, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lines", type=int, default=1_000_000)
    p.add_argument("--jobs", default="1,2")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--files", type=int, default=1, help="rotated files (1: one large file)")
    a = p.parse_args(argv)
    jobs = [int(j) for j in a.jobs.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        files = [os.path.join(tmp, f"access.log.{i}") for i in range(a.files)]
        lines = gen.generate(a.lines)
        per = -(-a.lines // a.files)
        for path in files:
            with open(path, "wb") as f:
                for _, data in zip(range(per), lines):
                    f.write(data)
        size = sum(os.path.getsize(f) for f in files)
        print(f"{a.lines:,} lines ({size / 1e6:.0f} MB) in {a.files} file(s); {os.cpu_count()} "
              f"cores; {a.repeat} alternating rounds, medians; load average before: "
              f"{os.getloadavg()[0]:.2f}")
        runs: dict[int, list[tuple[float, float, float, str]]] = {j: [] for j in jobs}
        for _ in range(a.repeat):
            for j in jobs:
                runs[j].append(once(files, j))
        splits = {j: sorted(split(files, j) for _ in range(a.repeat))[a.repeat // 2]
                  for j in jobs}
        print(f"load average after: {os.getloadavg()[0]:.2f}")
    base = statistics.median(r[0] for r in runs[jobs[0]])
    digest = runs[jobs[0]][0][3]
    cpu1 = sum(splits[jobs[0]])
    print("| --jobs | wall s | CPU s (all processes) | peak RSS MiB | speed-up (wall) | "
          "CPU s main + workers | projected on idle cores | same bytes |")
    print("|---:|---:|---:|---:|---:|---:|---:|:--|")
    ok = True
    for j in jobs:
        wall = statistics.median(r[0] for r in runs[j])
        cpu = statistics.median(r[1] for r in runs[j])
        same = all(r[3] == digest for r in runs[j])
        ok = ok and same
        main_cpu, workers = splits[j]
        parts = f"{main_cpu:.2f} + {workers:.2f}"
        projected = f"{cpu1 / (main_cpu + workers / min(j, os.cpu_count() or 1)):.2f}x"
        print(f"| {j} | {wall:.2f} | {cpu:.2f} | {max(r[2] for r in runs[j]):.0f} | "
              f"{base / wall:.2f}x | {parts} | {projected} | {'yes' if same else 'NO'} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
