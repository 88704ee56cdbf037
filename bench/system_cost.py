"""The whole importer's cost beside nginx's: CPU per request of nginx and of the service (issue 20).

Three private nginx servers (lab/nginx.py, 2 workers), each serving a 2 KB segment and a
playlist to wrk flat out, in alternating rounds (each round runs every variant once, in a
rotating order, so that a neighbour's load on this shared machine hits them alike):

- `none`: nginx alone, no logging;
- `exporter`: the shipped nginx/sfive.conf and sfive.lua, and the real service
  (`twistd -n sfive-ngxlua -u http://.../sfive -s HUB`) following the exporter's stream;
- `accesslog`: nginx's own access log in the exporter's line format (nginx/sfive-log.conf,
  `buffer=64k flush=1s`) and the service following it (`--file LOG`).

CPU per request: utime + stime (from /proc) of nginx's workers and of the service process over
the round, divided by the requests nginx served in it (stub_status); median and best of the
rounds. The service's datasets go to a unix datagram socket the benchmark binds and drains.
After the rounds the benchmark waits until each service has read every request its nginx
served (its /metrics `lines`): it exits 1 if one did not.

    .venv/bin/python bench/system_cost.py [--rounds 3] [--seconds 5] [--workers 2]
                                          [--pythonpath TREE]
"""

from __future__ import annotations

import argparse
import os
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

from bench.nginx_cost import FILES, STATUS, STATUS_LOCATION  # noqa: E402
from bench.nginx_throughput import Metrics, cpu_seconds, machine, progress, wrk_script  # noqa: E402
from lab.nginx import NginxServer, find_nginx, free_port  # noqa: E402

ACCESS_LOG = "include %s;\naccess_log %%s sfive buffer=64k flush=1s;\n" % (
    ROOT / "nginx" / "sfive-log.conf")


class Drain(threading.Thread):
    """Binds the hub's datagram socket and counts the datasets."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.datasets = 0
        self.stopping = False

    def run(self) -> None:
        while not self.stopping:
            try:
                self.sock.recv(1 << 20)
                self.datasets += 1
            except socket.timeout:
                continue

    def stop(self) -> None:
        self.stopping = True
        self.join()
        self.sock.close()


@dataclass
class Variant:
    name: str
    server: NginxServer
    source: Optional[list] = None          # the service's source options, None: no service
    service: Optional[subprocess.Popen] = None
    metrics: Optional[Metrics] = None
    drain: Optional[Drain] = None
    start_served: int = 0
    start_lines: int = 0
    nginx_us: list = field(default_factory=list)
    service_us: list = field(default_factory=list)
    check: str = ""

    def served(self) -> int:
        with urllib.request.urlopen(self.server.url(STATUS), timeout=10) as response:
            text = response.read().decode()
        return int(text.split("\n")[2].split()[2])


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def start(v: Variant, tmp: Path, twistd: str, pythonpath: Optional[str]) -> None:
    v.server.start()
    if v.source is None:
        return
    hub = tmp / f"hub-{v.name}.sock"
    v.drain = Drain(hub)
    v.drain.start()
    port = free_port()
    source = [v.server.url("/sfive") if s == "{exporter}" else s for s in v.source]
    v.service = subprocess.Popen(
        [twistd, "-n", "--pidfile=", "-l", str(tmp / f"service-{v.name}.log"), "sfive-ngxlua",
         "-n", "bench", "-d", "5", "-S", "foo/hls/high", *source, "-s", str(hub),
         "--metrics", f"tcp:{port}:interface=127.0.0.1"], stdin=subprocess.DEVNULL, cwd=tmp,
        env={**os.environ, "PYTHONPATH": pythonpath} if pythonpath else None)
    v.metrics = Metrics(port)

    def first() -> bool:
        urllib.request.urlopen(v.server.url("/live/hls/foo-high/seg1.ts"), timeout=5).read()
        return v.metrics.scrape().get("lines", 0) > 0

    if not wait_until(first, 30):
        raise SystemExit(f"bench: the {v.name} service read nothing (see its log in {tmp})")
    v.start_lines = int(v.metrics.scrape().get("lines", 0))
    v.start_served = v.served()


def read_all(v: Variant, timeout: float) -> tuple:
    """Wait until the service has read every request nginx served since its first line
    (the status request asking is logged after it is answered: one less); (read, served)."""
    served = v.served() - v.start_served - 1

    def read() -> int:
        return int(v.metrics.scrape().get("lines", 0)) - v.start_lines

    wait_until(lambda: read() >= served, timeout)
    return read(), served


def run_round(v: Variant, script: Path, seconds: float, connections: int) -> None:
    workers = v.server.worker_pids()
    before = v.served()
    nginx0 = sum(map(cpu_seconds, workers))
    service0 = cpu_seconds(v.service.pid) if v.service else 0.0
    subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "-s", str(script),
                    v.server.url("/")], capture_output=True, check=True)
    served = v.served() - before - 1
    nginx1 = sum(map(cpu_seconds, workers))
    if v.service:  # the service's work for these requests: until it has read them
        read_all(v, 30)
        v.service_us.append(1e6 * (cpu_seconds(v.service.pid) - service0) / max(served, 1))
    v.nginx_us.append(1e6 * (nginx1 - nginx0) / max(served, 1))
    progress(f"  {v.name}: nginx {v.nginx_us[-1]:.2f} us/request"
             + (f", service {v.service_us[-1]:.2f} us/request" if v.service else "")
             + f" ({served:,} requests)")


def check(v: Variant) -> bool:
    """The service read every request its nginx served."""
    if v.service is None:
        return True
    read, served = read_all(v, 30)
    ok = read >= served
    v.check = (f"{'every request read' if ok else 'NOT ALL READ'}: {read:,} lines read, "
               f"{served:,} requests served after the service's first line")
    progress(f"  {v.name}: {v.check}")
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--connections", type=int, default=50)
    p.add_argument("--twistd", default=str(ROOT / ".venv" / "bin" / "twistd"))
    p.add_argument("--pythonpath", help="the service imports sfive_ngxlua from here (another "
                   "revision's tree, for a before/after)")
    args = p.parse_args()
    binary = find_nginx()
    with tempfile.TemporaryDirectory(prefix="sfive-cost-") as name:
        tmp = Path(name)
        script = wrk_script(tmp, None, paths=list(FILES))

        def server(kind: str, **options) -> NginxServer:
            return NginxServer(binary, tmp / kind, workers=args.workers, files=FILES,
                               extra_server=STATUS_LOCATION, test_log=False, **options)

        log = tmp / "sfive.log"
        variants = [Variant("none", server("none", http_config="")),
                    Variant("exporter", server("exporter"), ["-u", "{exporter}"]),
                    Variant("accesslog", server("accesslog", http_config=ACCESS_LOG % log),
                            ["--file", str(log)])]
        try:
            for v in variants:
                start(v, tmp, args.twistd, args.pythonpath)
            progress(f"{machine()}; rounds of {args.seconds:g} s, wrk -t1 "
                     f"-c{args.connections}")
            for r in range(args.rounds):
                progress(f" round {r + 1}/{args.rounds}")
                for v in variants[r % 3:] + variants[:r % 3]:
                    run_round(v, script, args.seconds, args.connections)
            ok = all([check(v) for v in variants])
        finally:
            for v in variants:
                if v.service is not None:
                    v.service.terminate()
                    v.service.wait(timeout=30)
                if v.drain is not None:
                    v.drain.stop()
                v.server.stop()
    base = statistics.median(variants[0].nginx_us)
    print("| | nginx | service | total | × nginx alone | rounds (total) |")
    print("|---|---:|---:|---:|---:|---|")
    for v in variants:
        totals = [a + b for a, b in zip(v.nginx_us, v.service_us or [0.0] * len(v.nginx_us))]
        service = f"{statistics.median(v.service_us):.1f} µs" if v.service_us else "–"
        print(f"| {v.name} | {statistics.median(v.nginx_us):.1f} µs | {service} | "
              f"{statistics.median(totals):.1f} µs | {statistics.median(totals) / base:.2f} | "
              + ", ".join(f"{t:.1f}" for t in totals) + " |")
    for v in variants:
        if v.check:
            print(f"- {v.name}: {v.check}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
