"""Replay against its peers, side by side on one generated input: the issue 5 benchmark.

    python bench/run.py [--lines 500000] [--repeat 3]

Generates the input (bench/gen.py), then times on it, best of --repeat runs, in CPU
seconds (time.process_time in this process; user + sys from wait4 for mtail):
(a) bare JSON decoding of every line (simplejson, and orjson if installed),
(b) the original program's per-line approach (bench/baseline.py),
(c) mtail one-shot with bench/sfive.mtail (if installed),
(d) sfive-ngxlua-replay in this process, datasets to /dev/null,
and (e) replay's peak RSS (VmHWM) in a child process on N and 10*N lines piped from
the generator.  Cross-checks the accepted records and bytes of (b), (c) and (d), and
prints Markdown tables for BENCHMARKS.md on standard output; progress goes to standard
error.  Exits 1 if a cross-check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import baseline, gen, mtailrun  # noqa: E402

MEM_TOLERANCE_MIB = 5.0
TARGETS = {"baseline": 25.0, "mtail": 2.0, "decode": 0.5}


def progress(msg: str) -> None:
    sys.stderr.write(f"[bench] {msg}\n")
    sys.stderr.flush()


@dataclass
class Timing:
    """Best CPU seconds over the runs, the wall time of that run, and lines processed."""

    name: str
    lines: int
    cpu: float
    wall: float
    note: str = ""

    @property
    def rate(self) -> float:
        return self.lines / self.cpu if self.cpu > 0 else float("inf")


def best_of(name: str, lines: int, repeat: int, fn: Callable[[], object], note: str = ""
            ) -> tuple[Timing, object]:
    """Run fn repeat times in this process; keep the lowest CPU time (and fn's last result)."""
    best: Timing | None = None
    result = None
    for i in range(repeat):
        progress(f"{name}: run {i + 1}/{repeat}")
        c0, w0 = time.process_time(), time.perf_counter()
        result = fn()
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        if best is None or cpu < best.cpu:
            best = Timing(name, lines, cpu, wall, note)
    assert best is not None
    progress(f"{name}: {best.cpu:.2f} s CPU, {best.rate:,.0f} lines/s")
    return best, result


def decode_all(path: str, loads: Callable[[bytes], object]) -> int:
    """Decode every line of the file; count the ones that are not JSON."""
    bad = 0
    with open(path, "rb") as f:
        for line in f:
            try:
                loads(line)
            except ValueError:
                bad += 1
    return bad


def replay_args(extra: list[str]) -> list[str]:
    """The replay command line for the benchmark's streamers, then extra."""
    args = ["-n", "bench", "-d", "15", "-F", gen.NAMEFORMAT]
    for spec in gen.STREAMER_IDS:
        args += ["-S", spec]
    return args + extra


def replay_inprocess(path: str) -> int:
    """sfive-ngxlua-replay on path, in this process, datasets to /dev/null; its exit status."""
    from sfive_ngxlua import replay

    options = replay.ReplayOptions()
    options.parseOptions(replay_args(["-q", path]))
    with open(os.devnull, "wb") as out, open(os.devnull, "w") as err:
        return replay.run(options.settings(), options["files"], quiet=True, out=out, err=err)


@dataclass
class ReplayChild:
    """A replay child process: peak RSS, exit status, CPU time, summary line, datasets."""

    peak_mib: float
    status: int
    cpu: float
    summary: str
    datasets: list[dict]


_CHILD = """\
import atexit, sys

def _hwm():
    with open("/proc/self/status") as f, open(sys.argv[1], "w") as out:
        out.write(next(line for line in f if line.startswith("VmHWM:")))

atexit.register(_hwm)
from sfive_ngxlua.replay import main
main(sys.argv[2:])
"""


def replay_child(lines: int, seed: int, workdir: str, keep_output: bool) -> ReplayChild:
    """gen.py | sfive-ngxlua-replay - in a child; its peak RSS and CPU time.

    The peak is the child's own VmHWM, written at its exit: wait4's ru_maxrss would not do,
    as Linux carries the parent's peak RSS over fork and exec into the child's.
    """
    import simplejson

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    out_path = Path(workdir, f"replay-{lines}.jsonl")
    err_path = Path(workdir, f"replay-{lines}.err")
    hwm_path = Path(workdir, f"replay-{lines}.hwm")
    gen_cmd = [sys.executable, str(ROOT / "bench" / "gen.py"), "--lines", str(lines),
               "--seed", str(seed)]
    with open(out_path if keep_output else os.devnull, "wb") as out, open(err_path, "wb") as err:
        g = subprocess.Popen(gen_cmd, stdout=subprocess.PIPE, env=env)
        r = subprocess.Popen([sys.executable, "-c", _CHILD, str(hwm_path), *replay_args(["-"])],
                             stdin=g.stdout, stdout=out, stderr=err, env=env)
        assert g.stdout is not None
        g.stdout.close()
        started = last = time.monotonic()
        while True:
            pid, status, ru = os.wait4(r.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(0.2)
            if time.monotonic() - last >= 10:
                last = time.monotonic()
                progress(f"  replay of {lines:,} lines running, {last - started:.0f} s")
        r.returncode = os.waitstatus_to_exitcode(status)
        g.wait()
    summary = err_path.read_text(errors="replace").strip()
    try:
        peak_kib = int(hwm_path.read_text().split()[1])
    except (OSError, IndexError, ValueError):
        peak_kib = 0
    datasets = []
    if keep_output:
        with open(out_path, "rb") as f:
            datasets = [simplejson.loads(line) for line in f]
    return ReplayChild(peak_kib / 1024, r.returncode, ru.ru_utime + ru.ru_stime,
                       summary.splitlines()[-1] if summary else "", datasets)


def replay_totals(datasets: list[dict]) -> dict[tuple[str, str, str], int]:
    """Bytes per streamer over all datasets."""
    per: dict[tuple[str, str, str], int] = {}
    for d in datasets:
        sid = d["streamer-id"]
        key = (sid["content-id"], sid["format"], sid["quality"])
        per[key] = per.get(key, 0) + d["data"]["bytes-sent"]
    return per


def accepted_from_summary(summary: str) -> int | None:
    """The accepted count of replay's summary line ('... N lines, M accepted, ...')."""
    for part in summary.split(","):
        words = part.split()
        if len(words) >= 2 and words[-1] == "accepted":
            return int(words[-2])
    return None


def machine() -> dict[str, str]:
    """What the figures were measured on."""
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = []
    for mod in ("simplejson", "orjson", "dateutil", "twisted"):
        try:
            versions.append(f"{mod} {__import__(mod).__version__}")
        except ImportError:
            versions.append(f"{mod} absent")
        except AttributeError:
            versions.append(mod)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "libraries": ", ".join(versions),
        "mtail": mtailrun.version() if mtailrun.available() else "mtail not installed",
        "load": load,
    }


def ratio_row(label: str, num: Timing | None, den: Timing | None, target: float) -> str:
    if num is None or den is None:
        return f"| {label} | pending | >= {target:g} | |"
    r = num.rate / den.rate
    return f"| {label} | {r:.2f} | >= {target:g} | {'yes' if r >= target else '**no**'} |"


@dataclass
class Results:
    """Everything one benchmark run measured."""

    rows: list[Timing]
    decode: Timing
    base: Timing
    mtail: Timing | None = None
    replay: Timing | None = None
    memory: tuple[ReplayChild, ReplayChild] | None = None


def report(a: argparse.Namespace, info: dict[str, str], res: Results, checks: list[str]) -> str:
    """The Markdown tables."""
    out = [
        f"Input: {a.lines:,} generated lines (bench/gen.py, seed {a.seed}); best of {a.repeat} "
        "runs; CPU seconds (user + sys).",
        f"Machine: {info['nproc']} CPUs, {info['cpu']}; {info['python']}; {info['libraries']}; "
        f"{info['mtail']}; load average at start {info['load']}.",
        "",
        "| measurement | lines | CPU s | wall s | lines/s (CPU) | note |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for t in res.rows:
        out.append(f"| {t.name} | {t.lines:,} | {t.cpu:.2f} | {t.wall:.2f} | {t.rate:,.0f} "
                   f"| {t.note} |")
    if res.replay is None:
        out.append("| (d) sfive-ngxlua-replay | | | | pending | |")
    out += [
        "",
        "| ratio (lines/s) | measured | target | met |",
        "|---|---:|---:|---|",
        ratio_row("replay / baseline", res.replay, res.base, TARGETS["baseline"]),
        ratio_row("replay / mtail", res.replay, res.mtail, TARGETS["mtail"]),
        ratio_row("replay / bare decode (simplejson)", res.replay, res.decode, TARGETS["decode"]),
    ]
    big_n = a.lines * a.mem_factor
    if res.memory is None:
        out.append(f"| replay peak RSS, {big_n:,} vs {a.lines:,} lines | pending "
                   f"| +{MEM_TOLERANCE_MIB:g} MiB at most | |")
    else:
        small, big = res.memory
        d = big.peak_mib - small.peak_mib
        met = "yes" if d <= MEM_TOLERANCE_MIB else "**no**"
        out.append(f"| replay peak RSS, {big_n:,} vs {a.lines:,} lines | {big.peak_mib:.1f} vs "
                   f"{small.peak_mib:.1f} MiB ({d:+.1f}) | +{MEM_TOLERANCE_MIB:g} MiB at most "
                   f"| {met} |")
    if checks:
        out += ["", "Cross-check: " + "; ".join(checks) + "."]
    return "\n".join(out)


def prefix_file(path: str, dst: str, lines: int) -> None:
    with open(path, "rb") as f, open(dst, "wb") as out:
        for i, line in enumerate(f):
            if i >= lines:
                break
            out.write(line)


def measure(a: argparse.Namespace, workdir: str, path: str) -> tuple[Results, list[str], bool]:
    """Run (a) to (e) on the input at path; the results, the cross-checks, and whether one
    failed."""
    import simplejson

    n = a.lines
    dec, _ = best_of("(a) bare decode, simplejson.loads", n, a.repeat,
                     lambda: decode_all(path, simplejson.loads))
    rows = [dec]
    try:
        import orjson
    except ImportError:
        progress("orjson not installed: skipped")
    else:
        rows.append(best_of("(a) bare decode, orjson.loads", n, a.repeat,
                            lambda: decode_all(path, orjson.loads))[0])

    base_path, base_n, note = path, n, ""
    if 0 < a.baseline_lines < n:
        base_n, base_path = a.baseline_lines, str(Path(workdir, "baseline-prefix.log"))
        prefix_file(path, base_path, base_n)
        note = f"first {base_n:,} lines"
    base, totals = best_of("(b) baseline: the original's per-line approach", base_n, a.repeat,
                           lambda: baseline.run(base_path, gen.STREAMER_IDS, gen.NAMEFORMAT),
                           note)
    assert isinstance(totals, baseline.Totals)
    rows.append(base)
    res = Results(rows, dec, base)
    full = base_n == n
    checks = [f"baseline accepted {totals.accepted:,} records, {totals.bytes_sent:,} bytes"] \
        if full else []
    failed = False

    if not a.no_mtail and mtailrun.available():
        clean = str(Path(workdir, "input-utf8.log"))
        mtailrun.utf8_clean_copy(path, clean)
        best: mtailrun.MtailResult | None = None
        for i in range(a.repeat):
            progress(f"(c) mtail one-shot: run {i + 1}/{a.repeat}")
            m = mtailrun.run(clean)
            if best is None or m.cpu < best.cpu:
                best = m
        assert best is not None
        res.mtail = Timing("(c) mtail one-shot, GOMAXPROCS=1", n, best.cpu, best.wall,
                           "child process")
        progress(f"(c): {best.cpu:.2f} s CPU, {res.mtail.rate:,.0f} lines/s")
        rows.append(res.mtail)
        if full:
            ok = (best.records, best.bytes_sent) == (totals.accepted, totals.bytes_sent)
            failed |= not ok
            checks.append(f"mtail {best.records:,} records, {best.bytes_sent:,} bytes: "
                          f"{'equal' if ok else 'DIFFERENT'}")
    elif not a.no_mtail:
        progress("mtail not installed: (c) skipped")

    if a.no_replay:
        return res, checks, failed
    import sfive_ngxlua.replay  # noqa: F401  (imported before the clock starts)

    res.replay, status = best_of("(d) sfive-ngxlua-replay, in process", n, a.repeat,
                                 lambda: replay_inprocess(path), "datasets to /dev/null")
    rows.append(res.replay)
    if status != 0:
        failed = True
        checks.append(f"replay exited with status {status}")
    if a.no_mem:
        return res, checks, failed
    progress(f"(e) replay in a child, {n:,} lines piped from gen.py")
    small = replay_child(n, a.seed, workdir, keep_output=True)
    progress(f"(e) replay in a child, {n * a.mem_factor:,} lines piped from gen.py")
    big = replay_child(n * a.mem_factor, a.seed, workdir, keep_output=False)
    res.memory = (small, big)
    progress(f"(e): peak RSS {small.peak_mib:.1f} MiB / {big.peak_mib:.1f} MiB")
    if small.status or big.status:
        failed = True
        checks.append(f"replay child exit status {small.status} / {big.status}")
    if full:
        per = replay_totals(small.datasets)
        accepted = accepted_from_summary(small.summary)
        ok = accepted == totals.accepted and per == totals.per_streamer
        failed |= not ok
        shown = f"{accepted:,}" if accepted is not None else "?"
        checks.append(f"replay {shown} records, {sum(per.values()):,} bytes (per streamer too): "
                      f"{'equal' if ok else 'DIFFERENT'}")
    return res, checks, failed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lines", type=int, default=500_000, help="input lines, N (500000)")
    p.add_argument("--seed", type=int, default=1, help="generator seed (1)")
    p.add_argument("--repeat", type=int, default=3, help="runs per measurement, best kept (3)")
    p.add_argument("--baseline-lines", type=int, default=0,
                   help="time the slow baseline on the first M lines only (default: all)")
    p.add_argument("--mem-factor", type=int, default=10, help="memory: N and FACTOR*N lines (10)")
    p.add_argument("--no-mtail", action="store_true", help="skip (c)")
    p.add_argument("--no-replay", action="store_true", help="skip (d) and (e)")
    p.add_argument("--no-mem", action="store_true", help="skip (e)")
    p.add_argument("--workdir", help="keep the input here (default: a temporary directory)")
    a = p.parse_args(argv)

    info = machine()
    with contextlib.ExitStack() as stack:
        workdir = a.workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="sfive-"))
        Path(workdir).mkdir(parents=True, exist_ok=True)
        path = str(Path(workdir, f"input-{a.lines}-{a.seed}.log"))
        progress(f"generating {a.lines:,} lines (seed {a.seed}) into {path}")
        gen.write(path, a.lines, a.seed)
        res, checks, failed = measure(a, workdir, path)
    print(report(a, info, res, checks))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
