"""The exporter's cost inside nginx: nginx's own CPU per request with and without it (issue 12).

Private nginx servers (lab/nginx.py), one per variant, serve a 2 KB segment and a small
playlist to wrk flat out, in alternating rounds (each round runs every variant once, in a
rotating order, so a neighbour's load on this shared machine hits them alike):

- `none`: nginx without the exporter (no Lua log handler, no access log);
- `exporter`: the shipped nginx/sfive.conf and sfive.lua, with one subscriber reading the
  stream (`?v=2`, heartbeats included; a Python thread counting lines);
- `accesslog`: no exporter but nginx's own buffered JSON access_log of the same fields
  (`buffer=64k flush=1s`), the floor of any logging;
- `before` (with `--before REV`): the exporter of git revision REV (sfive.conf and sfive.lua
  from `git show`), with one subscriber (protocol 1);
- with `--breakdown`: `lua-empty` (an empty log handler), `lua-vars` (it reads the five
  variables), `lua-format` (and builds the line with one string.format), `lua-escape` (and
  checks the user agent and the URL for characters to escape, with the Lua pattern the
  exporter used before it cached and used PCRE), `lua-dict` (one shared-dict incr and set
  per request, nothing else): where the cost goes. Each is a function defined at init and
  called per request, as the exporter's is.

CPU per request is the workers' utime + stime (from /proc) over the round divided by the
requests nginx served in it (stub_status); best of the rounds, and the best req/s (wrk).
Every subscriber must have received exactly the requests its nginx served, numbered without a
gap (the benchmark fails otherwise).

    .venv/bin/python bench/nginx_cost.py [--workers 1,2,4,8] [--rounds 3] [--seconds 5]
                                         [--before REV] [--breakdown] [--only a,b]

With --instructions it counts instead the instructions per request of one worker under
valgrind (callgrind) for each variant: slow, but free of the noise of a shared machine, which
is what a breakdown needs.

Progress goes to stderr, the Markdown tables to stdout.
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.nginx_throughput import cpu_seconds, machine, progress, wrk_script  # noqa: E402
from lab.nginx import NginxServer, find_nginx  # noqa: E402

FILES = {
    "live/hls/foo-high/seg1.ts": bytes(i % 251 for i in range(2048)),
    "live/hls/foo-high/index.m3u8": b"#EXTM3U\n#EXT-X-TARGETDURATION:4\n#EXTINF:4.0,\nseg1.ts\n",
}
STATUS = "/nginx_status"
STATUS_LOCATION = f"        location = {STATUS} {{ stub_status; }}"

FLOOR_LOG = (
    "log_format sfive_floor escape=json '{\"time\":\"$msec\",\"client\":\"$remote_addr\","
    "\"ua\":\"$http_user_agent\",\"url\":\"$uri\",\"status\":$status,"
    "\"bytes-sent\":$bytes_sent}';\n"
    "access_log %s sfive_floor buffer=64k flush=1s;\n"
)
VARS = ("local v = ngx.var; local a, u, p, s, b = v.remote_addr, v.http_user_agent, v.uri, "
        "v.status, v.bytes_sent")


def handler(body: str, http: str = "") -> str:
    """A log handler doing body, as a function defined once (at init) and called per request,
    as the exporter's is: so LuaJIT compiles it the same way (an inline chunk would not be)."""
    return (f"{http}init_by_lua_block {{ function sfive_cost() {body} end }}\n"
            "log_by_lua_block { sfive_cost() }\n")


BREAKDOWN = {
    "lua-empty": handler(""),
    "lua-vars": handler(VARS),
    "lua-format": handler(
        f"{VARS}; local line = string.format("
        "'{\"seq\":%d,\"time\":\"%s\",\"client\":\"%s\",\"ua\":\"%s\",\"url\":\"%s\","
        "\"status\":%d,\"bytes-sent\":%d}', 1, ngx.now(), a, u or '', p, s, b)"),
    "lua-escape": handler(
        f"{VARS}; local f = string.find; local pat = '[%z\\1-\\31\"\\\\\\128-\\255]'; "
        "local x, y = f(u or '', pat), f(p, pat)"),
    "lua-dict": handler(
        "local d = ngx.shared.sfive_cost; local n = d:incr('seq', 1, 0); "
        "d:set(n % 100000, string.rep('x', 180))", http="lua_shared_dict sfive_cost 64m;\n"),
}


class Subscriber(threading.Thread):
    """Reads an exporter stream over a raw socket and counts its records cheaply (the last
    seq is kept, so that a gap shows as last seq != count)."""

    def __init__(self, port: int, query: str) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.sendall(f"GET /sfive{query} HTTP/1.1\r\nHost: localhost\r\n"
                          "User-Agent: sfive-cost\r\n\r\n".encode())
        self.records = 0
        self.gaps = 0
        self.last_seq = 0
        self.tail = b""
        self.stopping = False

    def run(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stopping:
            try:
                data = self.sock.recv(1 << 20)
            except socket.timeout:
                continue
            except OSError:
                return
            if not data:
                return
            chunk = self.tail + data
            # a record's '"time":' or a gap's '"lost":' may straddle two reads: count in the
            # part up to the last newline only, keep the rest
            cut = chunk.rfind(b"\n") + 1
            counted = chunk[:cut]
            self.records += counted.count(b'"time":')
            self.gaps += counted.count(b'"lost":')
            seqs = re.findall(rb'\{"seq":(\d+),"time"', counted[-4000:])
            if seqs:
                self.last_seq = int(seqs[-1])
            self.tail = chunk[cut:]

    def stop(self) -> None:
        self.stopping = True
        self.join()
        self.sock.close()


@dataclass
class Variant:
    """One nginx under test and its figures."""

    name: str
    server: NginxServer
    query: Optional[str] = None            # subscribe with this query (exporter variants)
    subscriber: Optional[Subscriber] = None
    cpu_us: list[float] = field(default_factory=list)
    rps: list[float] = field(default_factory=list)
    check: str = ""

    def served(self) -> int:
        with urllib.request.urlopen(self.server.url(STATUS), timeout=10) as response:
            text = response.read().decode()
        return int(text.split("\n")[2].split()[2])  # "accepts handled requests"


def run_round(variant: Variant, script: Path, seconds: float, connections: int) -> None:
    workers = variant.server.worker_pids()
    before = variant.served()
    cpu0 = sum(map(cpu_seconds, workers))
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "-s", str(script),
         variant.server.url("/")], capture_output=True, text=True, check=True).stdout
    cpu1 = sum(map(cpu_seconds, workers))
    served = variant.served() - before - 1  # not the first status request
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    variant.rps.append(float(m.group(1)) if m else 0.0)
    variant.cpu_us.append(1e6 * (cpu1 - cpu0) / max(served, 1))
    progress(f"  {variant.name}: {variant.cpu_us[-1]:.2f} us/request, {variant.rps[-1]:,.0f} "
             f"req/s ({served:,} requests)")


def check_subscriber(variant: Variant) -> bool:
    """The subscriber got every request its nginx served, exactly once, without a gap."""
    sub = variant.subscriber
    assert sub is not None
    expected = variant.served() - 1  # every request but the stream's own
    deadline = time.monotonic() + 30
    while sub.records < expected and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # anything beyond would be a duplicate: give it the time to show
    ok = sub.records == expected and sub.last_seq == expected and sub.gaps == 0
    variant.check = (f"{'exact' if ok else 'WRONG'}: {sub.records:,} records, last seq "
                     f"{sub.last_seq:,}, {sub.gaps} gap lines, nginx served {expected:,}")
    progress(f"  {variant.name}: {variant.check}")
    return ok


def before_dir(rev: str, tmp: Path) -> Path:
    directory = tmp / f"exporter-{rev}"
    directory.mkdir()
    for name in ("sfive.conf", "sfive.lua"):
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:nginx/{name}"],
                              capture_output=True, text=True, check=True).stdout
        (directory / name).write_text(text)
    return directory


def table(variants: list[Variant], workers: int) -> str:
    """Best and median of the rounds, and both as ratios to nginx without the exporter (the
    best round is the least disturbed by the machine's other load, the median the typical)."""
    none = next(v for v in variants if v.name == "none")
    base_best, base_median = min(none.cpu_us), statistics.median(none.cpu_us)
    rows = [f"| nginx, {workers} worker{'s' if workers > 1 else ''} | CPU per request: best "
            "| median | all rounds | × without (best; median) | requests/s (best) |",
            "|---|---:|---:|---|---:|---:|"]
    for v in variants:
        best, median = min(v.cpu_us), statistics.median(v.cpu_us)
        rounds = ", ".join(f"{x:.1f}" for x in v.cpu_us)
        rows.append(f"| {v.name} | {best:.2f} us | {median:.2f} us | {rounds} | "
                    f"{best / base_best:.2f}; {median / base_median:.2f} | {max(v.rps):,.0f} |")
    return "\n".join(rows)


def specs(workers: int, tmp: Path, binary, args, old: Optional[Path],
          **common) -> list[Variant]:
    """The variants to measure with this many workers (their nginx not started yet)."""
    def server(name: str, **options) -> NginxServer:
        return NginxServer(binary, tmp / f"{name}-{workers}", workers=workers, files=FILES,
                           extra_server=STATUS_LOCATION, test_log=False, **common, **options)

    found = [Variant("none", server("none", http_config="")),
             Variant("exporter", server("exporter"), "?v=2"),
             Variant("accesslog", server("accesslog", http_config=FLOOR_LOG % (
                 tmp / f"floor-{workers}.log")))]
    if old is not None:
        found.append(Variant("before", server("before", source_dir=old), ""))
    if args.breakdown:
        found += [Variant(name, server(name, http_config=conf))
                  for name, conf in BREAKDOWN.items()]
    if args.only:
        wanted = set(args.only.split(",")) | {"none"}
        found = [v for v in found if v.name in wanted]
    return found


def subscribe(variant: Variant) -> None:
    if variant.query is not None:
        variant.subscriber = Subscriber(variant.server.port, variant.query)
        variant.subscriber.start()


def stop(variant: Variant) -> None:
    if variant.subscriber is not None and variant.subscriber.is_alive():
        variant.subscriber.stop()
    variant.server.stop()


def cpu_rounds(args, tmp: Path, binary, old: Optional[Path], script: Path) -> bool:
    """The CPU measurement: alternating rounds for each worker count; True if exact."""
    ok = True
    for workers in (int(w) for w in args.workers.split(",")):
        variants = specs(workers, tmp, binary, args, old)
        try:
            for v in variants:
                v.server.start()
                subscribe(v)
            progress(f"{workers} workers: {', '.join(v.name for v in variants)}")
            for r in range(args.rounds):
                progress(f" round {r + 1}/{args.rounds}")
                for v in variants[r % len(variants):] + variants[:r % len(variants)]:
                    run_round(v, script, args.seconds, args.connections)
            checks = [check_subscriber(v) for v in variants if v.subscriber]
            ok = ok and all(checks)
            print(table(variants, workers))
            print()
            for v in variants:
                if v.check:
                    print(f"- {v.name}: subscriber {v.check}")
            print()
            sys.stdout.flush()
        finally:
            for v in variants:
                stop(v)
    return ok


def callgrind(variant: Variant, script: Path, seconds: float, out: Path) -> float:
    """Instructions per request of the worker (valgrind callgrind), over a wrk run."""
    worker = str(next(iter(variant.server.worker_pids())))
    subprocess.run(["wrk", "-t1", "-c4", "-d2s", "-s", str(script), variant.server.url("/")],
                   capture_output=True, check=True)  # warm up (the JIT too)
    before = variant.served()
    subprocess.run(["callgrind_control", "-z", worker], capture_output=True, check=True)
    subprocess.run(["wrk", "-t1", "-c4", f"-d{seconds:g}s", "-s", str(script),
                    variant.server.url("/")], capture_output=True, check=True)
    subprocess.run(["callgrind_control", "-d", worker], capture_output=True, check=True)
    served = variant.served() - before - 1
    dump = out / f"cg.{worker}.1"
    deadline = time.monotonic() + 30
    while not dump.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    m = re.search(r"^(?:summary|totals): (\d+)", dump.read_text(), re.M)
    ir = int(m.group(1)) / max(served, 1)
    progress(f"  {variant.name}: {ir:,.0f} instructions/request ({served:,} requests)")
    return ir


def instruction_counts(args, tmp: Path, binary, old: Optional[Path], script: Path) -> None:
    """The breakdown without the noise of a shared machine: instructions per request of one
    worker under valgrind (callgrind), each variant in turn."""
    if shutil.which("valgrind") is None:
        raise SystemExit("bench: valgrind is not installed (apt-get install valgrind)")
    out = tmp / "callgrind"
    out.mkdir()
    wrapper = ("valgrind", "--tool=callgrind", "--trace-children=yes", "--smc-check=all",
               f"--callgrind-out-file={out}/cg.%p")
    variants = specs(1, tmp, binary, args, old, wrapper=wrapper)
    counts = {}
    for v in variants:
        try:
            v.server.start(timeout=120)
            subscribe(v)
            counts[v.name] = callgrind(v, script, args.seconds, out)
        finally:
            stop(v)
    base = counts["none"]
    print("| nginx, 1 worker, under valgrind | instructions per request | more than without |"
          " × without |")
    print("|---|---:|---:|---:|")
    for name, ir in counts.items():
        print(f"| {name} | {ir:,.0f} | {ir - base:+,.0f} | {ir / base:.2f} |")
    print()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2,4,8", help="worker counts (1,2,4,8)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (3)")
    parser.add_argument("--seconds", type=float, default=5, help="wrk run per round (5)")
    parser.add_argument("--connections", type=int, default=50, help="wrk connections (50)")
    parser.add_argument("--before", metavar="REV", help="also measure the exporter of REV")
    parser.add_argument("--breakdown", action="store_true",
                        help="also measure the pieces of a log handler")
    parser.add_argument("--only", help="only these variants (comma-separated)")
    parser.add_argument("--instructions", action="store_true",
                        help="count instructions per request under valgrind instead")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("bench: wrk is not installed (apt-get install wrk)")

    tmp = Path(tempfile.mkdtemp(prefix="sfive-cost-"))
    binary = find_nginx()
    old = before_dir(args.before, tmp) if args.before else None
    script = wrk_script(tmp, None, paths=list(FILES))
    try:
        if args.instructions:
            print(f"Machine: {machine()}; wrk -t1 -c4, {args.seconds:g} s after a 2 s warm-up; "
                  "a 2 KB segment and a small playlist.\n")
            instruction_counts(args, tmp, binary, old, script)
            return 0
        print(f"Machine: {machine()}; wrk -t1 -c{args.connections}, {args.seconds:g} s rounds, "
              f"best of {args.rounds}; a 2 KB segment and a small playlist.\n")
        ok = cpu_rounds(args, tmp, binary, old, script)
        print("Subscribers exact: " + ("yes" if ok else "NO"))
        return 0 if ok else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
