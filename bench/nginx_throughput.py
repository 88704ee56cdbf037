"""Throughput of the whole chain: wrk -> private nginx with the Lua exporter -> the service.

A private nginx (lab/nginx.py, the shipped snippets) serves small HLS segments
(1-4 KB) to wrk; the real service (twistd sfive-ngxlua, a subprocess) follows the exporter
stream and sends its datasets to a unix datagram socket this script binds and reads. It runs
a few load phases (rate-limited ones through wrk's Lua delay(), then wrk flat out) and for
each measures: requests/s (wrk), the lag between nginx's access log and the lines the service
has read (sampled every second, and right after the load), the time the service takes to
catch up, records lost in ring overruns (the service's records_lost counter), and the CPU of
the service, the nginx workers and wrk as % of one core. At the end the datasets' bytes must
equal the access log's $bytes_sent for the counted statuses.

    /work/main/.venv/bin/python bench/nginx_throughput.py [--workers 2] [--seconds 20]

Progress goes to stderr, the Markdown table to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lab.nginx import NginxServer, find_nginx, free_port  # noqa: E402

SEGMENTS = {f"live/hls/foo-high/seg{i}.ts": 1024 + (i - 1) * 439 for i in range(1, 9)}
STREAMER = "foo/hls/high"
COUNTED_STATUSES = (200, 206)
TICK = os.sysconf("SC_CLK_TCK")

WRK_SCRIPT = """
local paths = {%(paths)s}
local requests = {}
local i = 0
init = function(args)
    wrk.headers["User-Agent"] = "wrk-bench"
    for k, path in ipairs(paths) do
        requests[k] = wrk.format("GET", path)
    end
end
request = function()
    i = i %% #requests + 1
    return requests[i]
end
%(delay)s
"""


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds; 0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    total = sum(fields[:8])
    return (total - idle) / TICK, total / TICK


class AccessLogCounter:
    """Counts the access log's lines as it grows (cheaply, from where it left off)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.count = 0

    def poll(self) -> int:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        complete = data.rfind(b"\n") + 1
        self.count += data.count(b"\n", 0, complete)
        self.offset += complete
        return self.count


def processed(values: dict[str, float]) -> int:
    """Records the service is done with: lines read (gap lines too) plus records lost."""
    return int(values.get("lines", 0) + values.get("records_lost", 0))


class Metrics:
    """Scrapes the service's Prometheus endpoint."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"

    def scrape(self) -> dict[str, float]:
        try:
            with urllib.request.urlopen(self.url, timeout=5) as response:
                text = response.read().decode()
        except OSError:
            return {}
        values = {}
        for line in text.splitlines():
            m = re.match(r"sfive_ngxlua_(\w+?)(?:_total)?(?:\{.*\})? ([0-9.e+-]+)$", line)
            if m:
                values[m.group(1)] = values.get(m.group(1), 0.0) + float(m.group(2))
        return values


class DatasetReader(threading.Thread):
    """Binds the hub's datagram socket and keeps every dataset the service sends."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.datasets: list[dict] = []
        self.stopping = False

    def run(self) -> None:
        while not self.stopping:
            try:
                data = self.sock.recv(1 << 20)
            except socket.timeout:
                continue
            self.datasets.append(json.loads(data))

    def stop(self) -> None:
        self.stopping = True
        self.join()
        self.sock.close()


@dataclass
class Phase:
    """One load phase's figures."""

    name: str
    connections: int
    seconds: float
    requests: int = 0
    rps: float = 0.0
    latency: str = ""
    errors: str = ""
    max_lag: int = 0
    end_lag: int = 0
    catch_up: float = 0.0
    caught_up: bool = True
    lost: int = 0
    cpu_service: float = 0.0
    cpu_nginx: float = 0.0
    cpu_wrk: float = 0.0
    cpu_machine: float = 0.0


def progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def wrk_script(directory: Path, delay_ms: Optional[int],
               paths: Optional[Iterable[str]] = None) -> Path:
    """A wrk script cycling through paths (default: the segments), with a delay if given."""
    paths = ", ".join(json.dumps("/" + p) for p in (SEGMENTS if paths is None else paths))
    delay = f"delay = function() return {delay_ms} end" if delay_ms else ""
    script = directory / f"wrk-{delay_ms or 0}.lua"
    script.write_text(WRK_SCRIPT % {"paths": paths, "delay": delay})
    return script


def parse_wrk(out: str, phase: Phase) -> None:
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    phase.requests = int(m.group(1)) if m else 0
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    phase.rps = float(m.group(1)) if m else 0.0
    m = re.search(r"Latency\s+(\S+)", out)
    phase.latency = m.group(1) if m else "?"
    errors = re.findall(r"Socket errors: .*|Non-2xx or 3xx responses: \d+", out)
    phase.errors = "; ".join(errors) or "none"


def run_phase(phase: Phase, script: Path, threads: int, nginx: NginxServer, service: int,
              metrics: Metrics, access: AccessLogCounter) -> None:
    """Run wrk once; sample the lag every second; wait for the service to catch up."""
    workers = nginx.worker_pids()
    lost_before = metrics.scrape().get("records_lost", 0)
    cpu0 = (cpu_seconds(service), sum(map(cpu_seconds, workers)), machine_busy()[0])
    started = time.monotonic()
    wrk = subprocess.Popen(
        ["wrk", f"-t{threads}", f"-c{phase.connections}", f"-d{phase.seconds:g}s",
         "-s", str(script), nginx.url("/")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wrk_cpu = 0.0
    while True:
        wrk_cpu = cpu_seconds(wrk.pid) or wrk_cpu
        try:
            wrk.wait(1)
            break
        except subprocess.TimeoutExpired:
            pass
        served, read = access.poll(), processed(metrics.scrape())
        phase.max_lag = max(phase.max_lag, served - read)
        progress(f"  {phase.name}: {time.monotonic() - started:4.0f}s  nginx {served} requests, "
                 f"service read {read} (lag {served - read})")
    wall = time.monotonic() - started
    cpu1 = (cpu_seconds(service), sum(map(cpu_seconds, workers)), machine_busy()[0])
    served, read = access.poll(), processed(metrics.scrape())
    phase.end_lag = served - read
    phase.max_lag = max(phase.max_lag, phase.end_lag)
    deadline = time.monotonic() + 60
    while read < served and time.monotonic() < deadline:
        time.sleep(0.05)
        read = processed(metrics.scrape())
    phase.catch_up = time.monotonic() - started - wall
    phase.caught_up = read >= served
    if not phase.caught_up:
        progress(f"  {phase.name}: the service did not catch up within 60 s ({read}/{served})")
    parse_wrk(wrk.stdout.read(), phase)
    phase.lost = int(metrics.scrape().get("records_lost", 0) - lost_before)
    phase.cpu_service = 100 * (cpu1[0] - cpu0[0]) / wall
    phase.cpu_nginx = 100 * (cpu1[1] - cpu0[1]) / wall
    phase.cpu_wrk = 100 * wrk_cpu / wall
    phase.cpu_machine = 100 * (cpu1[2] - cpu0[2]) / wall
    progress(f"  {phase.name}: {phase.rps:.0f} req/s, lag at end {phase.end_lag}, caught up in "
             f"{phase.catch_up:.2f}s, lost {phase.lost}, service CPU {phase.cpu_service:.0f}%")


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: timed out waiting for {what}")
        time.sleep(0.05)


def machine() -> str:
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return f"{os.cpu_count()} CPUs ({model}), {platform.system()} {platform.release()}"


def table(phases: list[Phase], workers: int) -> str:
    rows = [
        "| load | wrk conns | req/s | latency avg | max lag: records (ms) | lag at end | "
        f"catch-up s | lost | service CPU % | nginx CPU % ({workers} workers) | wrk CPU % | "
        f"machine busy % (of {100 * (os.cpu_count() or 1)}, all processes) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in phases:
        lag_ms = 1000 * p.max_lag / p.rps if p.rps else 0
        rows.append(f"| {p.name} | {p.connections} | {p.rps:,.0f} | {p.latency} | "
                    f"{p.max_lag} ({lag_ms:.0f}) | "
                    f"{p.end_lag} | {p.catch_up:.2f} | {p.lost} | {p.cpu_service:.0f} | "
                    f"{p.cpu_nginx:.0f} | {p.cpu_wrk:.0f} | {p.cpu_machine:.0f} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="nginx worker processes (2)")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (1)")
    parser.add_argument("--connections", type=int, default=50, help="wrk connections, max (50)")
    parser.add_argument("--seconds", type=float, default=20, help="flat-out phase length (20)")
    parser.add_argument("--rates", default="1000,5000,20000",
                        help="rate-limited phases before it, req/s, comma-separated ('' = none)")
    parser.add_argument("--rate-seconds", type=float, default=10, help="their length (10)")
    parser.add_argument("--duration", type=int, default=5, help="the service's -d (5)")
    parser.add_argument("--twistd", default="/work/main/.venv/bin/twistd",
                        help="twistd of a venv with sfive-ngxlua installed")
    parser.add_argument("--ring-size", type=int, help="exporter ring_size (shipped default)")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("bench: wrk is not installed (apt-get install wrk)")

    tmp = Path(tempfile.mkdtemp(prefix="sfive-bench-"))
    files = {path: bytes(i % 251 for i in range(size)) for path, size in SEGMENTS.items()}
    nginx = NginxServer(find_nginx(), tmp / "nginx", workers=args.workers, files=files,
                        ring_size=args.ring_size)
    reader = DatasetReader(tmp / "hub.sock")
    service: Optional[subprocess.Popen] = None
    log = tmp / "service.log"
    try:
        nginx.start()
        reader.start()
        metrics_port = free_port()
        command = [args.twistd, "-n", "--pidfile=", "-l", str(log), "sfive-ngxlua",
                   "-n", "bench", "-d", str(args.duration), "-S", STREAMER,
                   "-u", nginx.url("/sfive"), "-s", str(tmp / "hub.sock"),
                   "--metrics", f"tcp:{metrics_port}:interface=127.0.0.1"]
        progress(f"nginx ({args.workers} workers) on {nginx.url('/')}; starting the service")
        service = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        metrics = Metrics(metrics_port)
        wait_until(lambda: metrics.scrape().get("exporter_connected") == 1, 15,
                   "the service to connect to the exporter")
        access = AccessLogCounter(nginx.access_log_path)

        def probe() -> bool:
            urllib.request.urlopen(nginx.url("/" + next(iter(SEGMENTS))), timeout=5).read()
            time.sleep(0.1)
            return metrics.scrape().get("records_accepted", 0) > 0

        wait_until(probe, 15, "the service to count a first request")

        phases = []
        for rate in filter(None, (r.strip() for r in args.rates.split(","))):
            connections = max(1, int(rate) // 100)
            phases.append((Phase(f"{int(rate)} req/s target", connections, args.rate_seconds),
                           wrk_script(tmp, 10)))
        phases.append((Phase("flat out", args.connections, args.seconds), wrk_script(tmp, None)))
        for phase, script in phases:
            progress(f"phase '{phase.name}': wrk -t{args.threads} -c{phase.connections} "
                     f"-d{phase.seconds:g}s")
            run_phase(phase, script, args.threads, nginx, service.pid, metrics, access)

        final = metrics.scrape()
        progress("stopping the service (it reports the running interval)")
        service.send_signal(signal.SIGTERM)
        service.wait(30)
        time.sleep(0.5)
        reader.stop()

        # the probe requests made before the first interval began are not counted (before_start)
        skipped = int(final.get("records_before_start", 0))
        served = [r for r in nginx.access_log() if r["uri"].startswith("/live/hls/foo-high/")]
        served = served[skipped:]
        expected = sum(r["bytes_sent"] for r in served if r["status"] in COUNTED_STATUSES)
        got = sum(d["data"]["bytes-sent"] for d in reader.datasets)
        reported = [line for line in log.read_text().splitlines() if " reported: " in line]
        logged_lost = re.search(r" total\.lost=(\d+)", reported[-1]) if reported else None
        ok = (got == expected and final.get("records_lost", 0) == 0
              and all(p.caught_up for p, _ in phases))
        print(f"Machine: {machine()}; nginx {args.workers} workers, wrk {args.threads} threads, "
              f"{len(SEGMENTS)} segments of 1-4 KB, service -d {args.duration}.\n")
        print(table([p for p, _ in phases], args.workers))
        print(f"\nDatasets: {len(reader.datasets)}, bytes {got:,} vs access log {expected:,} "
              f"({'equal' if got == expected else 'DIFFERENT'}) over {len(served):,} requests; "
              f"service lost={int(final.get('records_lost', 0))} (log line: "
              f"lost={logged_lost.group(1) if logged_lost else '?'}), "
              f"rejected={int(final.get('records_rejected', 0))}, "
              f"probes before the first interval={skipped}.\n")
        print("Kept up: " + ("yes" if ok else "NO") + " (no record lost, lag back to 0 after "
              "each phase, datasets' bytes = access log's).")
        return 0 if ok else 1
    finally:
        if service is not None and service.poll() is None:
            service.kill()
            service.wait()
        if reader.is_alive():
            reader.stop()
        nginx.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
