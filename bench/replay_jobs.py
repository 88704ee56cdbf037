"""sfive-ngxlua-replay --jobs N: how it scales, and that the datasets stay byte for byte.

    python bench/replay_jobs.py [--lines 1000000] [--jobs 1,2] [--repeat 3] [--files 1]
                                [--window] [--callgrind | --only-callgrind | --pair]

Generates the input (bench/gen.py: one file, or --files rotated ones), then runs the replay
(the installed command, as an operator does) with each --jobs in turn (alternating, --repeat
rounds), and prints per N the median wall time, the CPU time of all its processes (user +
system, from the kernel's rusage of the children), the speed-up on wall time against
--jobs 1, the peak RSS of the main process and of the largest worker (VmHWM, read every
20 ms), and whether the output is byte for byte that of --jobs 1 (it fails if not).
``--window`` replays with --from/--until (the input's second to second-to-last minute).

On a shared machine the wall time moves with the others' load; the CPU time says what the work
costs. So it also runs each N in this process (``sfive_ngxlua.parallel``, --repeat times,
medians) and splits the main process's CPU time into its parts (before the fork: planning,
forking; then in order: adding heads' records, merging, encoding its own datasets, copying the
workers', taking on their models, replaying units itself; the end) from the workers'; and it
projects the wall time on N idle cores: ``before + (after + workers) / N`` (every process busy
until the end) and, as a bound, ``before + after + workers / N`` (the main process's share
never overlapping the workers').

``--callgrind`` counts instructions per process too (stable under load): valgrind's callgrind
on the installed command, once per N, dumping the main process's counts before each fork (so
that a forked worker counts only its own work); it prints the main process's count before the
fork and after, each worker's, the sum, and the projections from the counts (the bound:
``before + after + the largest worker's``). Minutes per run.

``--pair`` measures the machine instead: the CPU seconds of one ``--jobs 1`` replay alone and
of each of two run at once (on a VM's shared vCPUs the same work costs more CPU time when both
are busy, whatever the code).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import gen  # noqa: E402

REPLAY = str(Path(sys.executable).parent / "sfive-ngxlua-replay")
MAIN_PARTS = ("plan", "fork", "heads", "merge", "encode", "copy", "adopt", "in order", "end")


def model_args(window: Optional[Tuple[str, str]]) -> List[str]:
    """The benchmark's model options (and the window)."""
    args = ["-n", "bench", "-d", "15", "-F", gen.NAMEFORMAT]
    for spec in gen.STREAMER_IDS:
        args += ["-S", spec]
    if window:
        args += ["--from", window[0], "--until", window[1]]
    return args


def args_for(jobs: int, window: Optional[Tuple[str, str]]) -> List[str]:
    return [*model_args(window), "-q", "--jobs", str(jobs)]


def _hwm(pid: int) -> float:
    """A process's peak RSS so far (MiB; 0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return 0.0


def _children(pid: int) -> List[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def once(files: List[str], jobs: int, window: Optional[Tuple[str, str]]
         ) -> Tuple[float, float, str, float, float]:
    """(wall s, CPU s of the process and its workers, sha256 of stdout, peak RSS MiB of the
    main process and of the largest worker) of one replay (RSS read every 20 ms)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    digest = hashlib.sha256()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen([REPLAY, *args_for(jobs, window), *files], stdout=out)
        rss_main = rss_workers = 0.0
        while proc.poll() is None:
            rss_main = max(rss_main, _hwm(proc.pid))
            for child in _children(proc.pid):
                rss_workers = max(rss_workers, _hwm(child))
            time.sleep(0.02)
        wall = time.monotonic() - started
        if proc.returncode:
            raise SystemExit(f"--jobs {jobs} failed")
        out.seek(0)
        for data in iter(lambda: out.read(1 << 20), b""):
            digest.update(data)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, digest.hexdigest(), rss_main, rss_workers


_inner_work: Any = None


def _worker_rss(unit: Any) -> Any:
    """``parallel.work``, and the worker's peak RSS (it runs in the forked worker)."""
    result = _inner_work(unit)
    result.rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result.pid = os.getpid()
    return result


def split(files: List[str], jobs: int, window: Optional[Tuple[str, str]]) -> Dict[str, Any]:
    """One in-process replay on ``jobs`` processes: the main process's CPU seconds by part
    (each second counted in the outermost part it was spent in), the workers' CPU seconds,
    each process's peak RSS (MiB)."""
    global _inner_work
    from sfive_ngxlua import parallel
    from sfive_ngxlua.replay import Replay, ReplayOptions, _plan
    from sfive_ngxlua.stats import Stats

    options = ReplayOptions()
    options.parseOptions(model_args(window) + files)
    settings = options.settings()
    parts = dict.fromkeys(MAIN_PARTS, 0.0)
    active: List[str] = []
    saved: List[Tuple[Any, str, Any]] = []

    def patch(owner: Any, name: str, new: Any) -> None:
        saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, new)

    def timed(owner: Any, name: str, part: str) -> None:
        inner = getattr(owner, name)

        def wrapper(*a: Any, **kw: Any) -> Any:
            if active:
                return inner(*a, **kw)
            active.append(part)
            c0 = time.process_time()
            try:
                return inner(*a, **kw)
            finally:
                parts[part] += time.process_time() - c0
                active.pop()
        patch(owner, name, wrapper)

    def timed_steps(owner: Any, name: str, part: str) -> None:
        inner = getattr(owner, name)

        def wrapper(*a: Any, **kw: Any) -> Any:
            steps = inner(*a, **kw)
            while True:
                outer = not active
                if outer:
                    active.append(part)
                c0 = time.process_time()
                try:
                    n = next(steps)
                except StopIteration:
                    return
                finally:
                    if outer:
                        parts[part] += time.process_time() - c0
                        active.pop()
                yield n
        patch(owner, name, wrapper)

    _inner_work = parallel.work
    patch(parallel, "work", _worker_rss)
    timed(parallel.Jobs, "start", "fork")
    timed(parallel.Leader, "_merge", "merge")
    timed(parallel.Leader, "_adopt", "adopt")
    timed(parallel.StreamOutput, "spooled", "copy")
    timed(parallel.Leader, "finish", "end")
    timed(Replay, "emit", "encode")
    timed(parallel.Pipeline, "add_records", "heads")
    timed_steps(parallel.Leader, "replay_unit", "in order")
    rss: Dict[int, float] = {}
    inner_take = parallel.Leader.take

    def take(self: Any, unit: Any, result: Any) -> Any:
        if hasattr(result, "pid"):
            rss[result.pid] = max(rss.get(result.pid, 0.0), result.rss)
        return inner_take(self, unit, result)
    patch(parallel.Leader, "take", take)
    try:
        children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        main0 = time.process_time()
        with open(os.devnull, "wb") as out:
            c0 = time.process_time()
            plan = _plan(settings, files, jobs, options.window, None, [])
            parts["plan"] += time.process_time() - c0
            if plan is None:
                raise SystemExit(f"--jobs {jobs}: nothing to spread")
            spread = parallel.Jobs(settings, plan, jobs, parallel.StreamOutput(out), Stats(),
                                   options.window)
            spread.run()
        main = time.process_time() - main0
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
    finally:
        for owner, name, inner in reversed(saved):
            setattr(owner, name, inner)
    workers = (children.ru_utime - children0.ru_utime) + (children.ru_stime - children0.ru_stime)
    before = parts["plan"] + parts["fork"]
    return {"main": main, "before": before, "after": main - before, "parts": parts,
            "workers": workers, "rss_workers": rss, "units": len(plan.units),
            "merged": spread.leader.merged, "in_order": spread.leader.in_order}


def callgrind(files: List[str], jobs: int, window: Optional[Tuple[str, str]], tmp: str
              ) -> Dict[str, Any]:
    """Instructions per process of one replay under callgrind (see the module docstring)."""
    out = os.path.join(tmp, f"cg-{jobs}")
    os.makedirs(out, exist_ok=True)
    for old in glob.glob(os.path.join(out, "cg.*")):
        os.unlink(old)
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--dump-before=fork",
         f"--callgrind-out-file={out}/cg.%p", REPLAY, *args_for(jobs, window), *files],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=dict(os.environ,
                                                                    PYTHONHASHSEED="0"))
    digest = hashlib.sha256(proc.stdout.read()).hexdigest()  # type: ignore[union-attr]
    if proc.wait():
        raise SystemExit(f"callgrind --jobs {jobs} failed")
    counts: Dict[int, List[Tuple[int, int]]] = {}
    for path in glob.glob(os.path.join(out, "cg.*")):
        m = re.search(r"cg\.(\d+)(?:\.(\d+))?$", path)
        assert m is not None
        with open(path) as f:
            total = next(int(line.split()[1]) for line in f if line.startswith(("summary:",
                                                                                 "totals:")))
        counts.setdefault(int(m.group(1)), []).append((int(m.group(2) or 1 << 30), total))
    main = proc.pid
    dumps = sorted(counts.pop(main))
    before = dumps[0][1] if len(dumps) > 1 else 0  # the dump before the first fork
    after = sum(n for _, n in dumps) - before
    return {"before": before, "after": after, "workers": sorted(n for (_, n), in
                                                                  counts.values()),
            "digest": digest}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lines", type=int, default=1_000_000)
    p.add_argument("--jobs", default="1,2")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--files", type=int, default=1, help="rotated files (1: one large file)")
    p.add_argument("--window", action="store_true", help="replay with --from/--until")
    p.add_argument("--callgrind", action="store_true", help="instructions per process too")
    p.add_argument("--only-callgrind", action="store_true", help="instructions only")
    p.add_argument("--pair", action="store_true",
                   help="instead: one --jobs 1 replay alone against two at once (CPU s)")
    a = p.parse_args(argv)
    jobs = [int(j) for j in a.jobs.split(",")]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        os.cpu_count() or 1
    window = None
    if a.window:
        minutes = a.lines / gen.REQUESTS_PER_SECOND / 60
        start = gen.START.timestamp()
        window = tuple(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start + 60 * m))
                       for m in (1, max(2, int(minutes) - 1)))
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        files = [os.path.join(tmp, f"access.log.{i}") for i in range(a.files)]
        lines = gen.generate(a.lines)
        per = -(-a.lines // a.files)
        for path in files:
            with open(path, "wb") as f:
                for _, data in zip(range(per), lines):
                    f.write(data)
        size = sum(os.path.getsize(f) for f in files)
        limits = "" if window is None else f", --from {window[0]} --until {window[1]}"
        print(f"{a.lines:,} lines ({size / 1e6:.0f} MB) in {a.files} file(s){limits}; "
              f"{cores} cores; load average before: {os.getloadavg()[0]:.2f}")
        if a.pair:
            pair(files, a.repeat, window)
        elif not a.only_callgrind:
            ok = timed_runs(files, jobs, a.repeat, window)
        if (a.callgrind or a.only_callgrind) and not a.pair:
            ok = instructions(files, jobs, window, tmp) and ok
        print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0 if ok else 1


def pair(files: List[str], repeat: int, window: Optional[Tuple[str, str]]) -> None:
    """The machine's own cost of two busy processes: CPU seconds of one ``--jobs 1`` replay
    alone, then of each of two run at once (the same work, whatever the code)."""
    print(f"--pair: {repeat} rounds of one --jobs 1 replay alone, then two at once:")
    print("| round | load | alone: CPU s (wall s) | two at once: CPU s each (wall s) |")
    print("|---:|---:|---:|---:|")

    def start() -> subprocess.Popen:
        return subprocess.Popen([REPLAY, *args_for(1, window), *files],
                                stdout=subprocess.DEVNULL)

    def cpu(procs: List[subprocess.Popen]) -> List[float]:
        out = []
        for proc in procs:
            _, _, usage = os.wait4(proc.pid, 0)
            out.append(usage.ru_utime + usage.ru_stime)
        return out

    for r in range(repeat):
        t = time.monotonic()
        alone = cpu([start()])[0]
        t1 = time.monotonic()
        two = cpu([start(), start()])
        t2 = time.monotonic()
        print(f"| {r + 1} | {os.getloadavg()[0]:.2f} | {alone:.2f} ({t1 - t:.2f}) | "
              f"{two[0]:.2f}, {two[1]:.2f} ({t2 - t1:.2f}) |")


def timed_runs(files: List[str], jobs: List[int], repeat: int,
               window: Optional[Tuple[str, str]]) -> bool:
    print(f"{repeat} alternating rounds of the command, medians:")
    runs: Dict[int, List[Tuple[float, float, str, float, float]]] = {j: [] for j in jobs}
    for _ in range(repeat):
        for j in jobs:
            runs[j].append(once(files, j, window))
    base = statistics.median(r[0] for r in runs[jobs[0]])
    digest = runs[jobs[0]][0][2]
    print("| --jobs | wall s | CPU s (all processes) | speed-up (wall) | peak RSS MiB main, "
          "largest worker | same bytes |")
    print("|---:|---:|---:|---:|---:|:--|")
    ok = True
    for j in jobs:
        wall = statistics.median(r[0] for r in runs[j])
        cpu = statistics.median(r[1] for r in runs[j])
        same = all(r[2] == digest for r in runs[j])
        ok = ok and same
        rss = f"{max(r[3] for r in runs[j]):.0f}, " + (
            f"{max(r[4] for r in runs[j]):.0f}" if j > 1 else "-")
        print(f"| {j} | {wall:.2f} | {cpu:.2f} | {base / wall:.2f}x | {rss} | "
              f"{'yes' if same else 'NO'} |")
    spread = [j for j in jobs if j > 1]
    if not spread:
        return ok
    from sfive_ngxlua import replay

    print(f"\nin this process, {repeat} runs each, medians (CPU s; RSS MiB):")
    one = []
    for _ in range(repeat):
        c0 = time.process_time()
        with open(os.devnull, "wb") as out, open(os.devnull, "w") as err:
            options = replay.ReplayOptions()
            options.parseOptions(model_args(window) + files)
            replay.run(options.settings(), files, True, out, err, options.window, 1)
        one.append(time.process_time() - c0)
    cpu1 = statistics.median(one)
    print(f"--jobs 1: {cpu1:.2f} s")
    print("| --jobs | units (merged, in order) | main before the fork + after | "
          "after, by part | workers | projected on idle cores (bound) | peak RSS workers |")
    print("|---:|---:|---:|:--|---:|---:|---:|")
    for j in spread:
        got = sorted((split(files, j, window) for _ in range(repeat)), key=lambda g: g["main"]
                     + g["workers"])[repeat // 2]
        n = min(j, os.cpu_count() or 1)
        busy = got["before"] + (got["after"] + got["workers"]) / n
        bound = got["before"] + got["after"] + got["workers"] / n
        parts = ", ".join(f"{k} {v:.3f}" for k, v in got["parts"].items()
                          if v >= 0.0005 and k not in ("plan", "fork"))
        rss = ", ".join(f"{v:.0f}" for v in sorted(got["rss_workers"].values()))
        print(f"| {j} | {got['units']} ({got['merged']}, {got['in_order']}) | "
              f"{got['before']:.2f} + {got['after']:.2f} | {parts} | {got['workers']:.2f} | "
              f"{cpu1 / busy:.2f}x ({cpu1 / bound:.2f}x) | {rss} |")
    return ok


def instructions(files: List[str], jobs: List[int], window: Optional[Tuple[str, str]],
                 tmp: str) -> bool:
    print("\ninstructions per process (callgrind, millions):")
    print("| --jobs | main before the fork + after | workers | all | projected on idle cores "
          "(bound) | same bytes |")
    print("|---:|---:|---:|---:|---:|:--|")
    ok = True
    base: Optional[Dict[str, Any]] = None
    for j in jobs:
        got = callgrind(files, j, window, tmp)
        total = got["before"] + got["after"] + sum(got["workers"])
        if base is None:
            base = dict(got, total=total)
        same = got["digest"] == base["digest"]
        ok = ok and same
        n = min(j, os.cpu_count() or 1)
        if got["workers"]:
            busy = got["before"] + (got["after"] + sum(got["workers"])) / n
            bound = got["before"] + got["after"] + max(got["workers"])
            projected = f"{base['total'] / busy:.2f}x ({base['total'] / bound:.2f}x)"
        else:
            projected = "1.00x"
        workers = " + ".join(f"{w / 1e6:,.0f}" for w in got["workers"]) or "-"
        print(f"| {j} | {got['before'] / 1e6:,.0f} + {got['after'] / 1e6:,.0f} | {workers} | "
              f"{total / 1e6:,.0f} | {projected} | {'yes' if same else 'NO'} |")
    return ok


if __name__ == "__main__":
    sys.exit(main())
