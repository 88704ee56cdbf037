"""Peak memory with many distinct clients (issue 3: bounded memory; issue 14: hostile load).

Two ways to run it:

- In process (default): the service's own composition (``service.build``: pipeline, model,
  reporter) on a task.Clock: feeds N exporter lines, each from a distinct client, in 64 KiB
  chunks as the fetcher would, then reports the interval (datasets built and encoded whole, as
  the stream sink and standard output do) and prints the process's peak RSS. Lines are
  generated in batches so that the input itself is not held.

- ``--service``: the real service (``twistd -n sfive-ngxlua -d 2 -s HUB``, a child process)
  connected to a stand-in exporter (an HTTP server in this process streaming exporter lines,
  each record stamped with the time it is sent) and to a unix datagram hub socket this script
  binds and reads. It waits for the service's first dataset (so it is connected and its first
  interval is open), sends N records from distinct clients spread over ``--seconds`` (3),
  waits until the datasets account for every client and every byte (exact totals), and prints
  the service's peak RSS (``VmHWM`` from /proc, read before it is stopped).

    python bench/rss_clients.py [--clients 100000] [--max-clients 50000] [--ua-length 80]
    python bench/rss_clients.py --service --clients 150000 --ua-length 300 [--duration 2]
        [--seconds 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import simplejson

T0 = 1_800_000_000
UA = "Mozilla/5.0 (Linux; Android 14; SM-S918B) AppleWebKit/537.36 (KHTML, like Gecko) Player/{}"
URL = "/live/hls/foo-high/seg1.ts"


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def user_agent(i: int, length: int) -> str:
    """A distinct user agent of exactly ``length`` characters (at least the base's length)."""
    ua = UA.format(i)
    return ua + "x" * (length - len(ua)) if length > len(ua) else ua


def client_ip(i: int) -> str:
    return f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"


def in_process(args: argparse.Namespace) -> None:
    from twisted.internet import reactor
    from twisted.internet.task import Clock

    from sfive_ngxlua.datasets import encode
    from sfive_ngxlua.service import build
    from sfive_ngxlua.settings import Settings
    from sfive_ngxlua.sinks import CallableSink
    from sfive_ngxlua.stats import Stats

    settings = Settings(streamers=(("foo", "hls", "high"),), hostname="bench", duration=15,
                        max_clients=args.max_clients)
    clock = Clock()
    clock.advance(T0)
    stats = Stats()
    sizes = []
    sink = CallableSink(lambda d: sizes.append(len(encode(d))), stats)
    top = build(settings, reactor, sink=sink, clock=clock, stats=stats)
    top.getServiceNamed("report").startService()
    pipeline = top.getServiceNamed("fetch").pipeline
    baseline = peak_mib()

    started = time.perf_counter()
    batch = []
    for i in range(args.clients):
        batch.append(simplejson.dumps({
            "seq": i + 1, "time": "2027-01-15T08:00:05+00:00",
            "client": client_ip(i), "ua": user_agent(i, args.ua_length),
            "url": URL, "status": 200, "bytes-sent": 1000 + i,
        }))
        if len(batch) == 1000 or i == args.clients - 1:
            data = ("\n".join(batch) + "\n").encode()
            batch = []
            for at in range(0, len(data), 65536):
                pipeline.feed(data[at:at + 65536])
    fed = time.perf_counter() - started
    after_ingest = peak_mib()
    clock.advance(16)
    reported = time.perf_counter() - started - fed

    assert stats.accepted == args.clients, stats
    print(f"clients={args.clients} max_clients={args.max_clients} ua_length={args.ua_length} "
          f"folded={stats.folded}")
    print(f"ingest {fed:.2f}s, report {reported:.2f}s, dataset {sizes[0] / 2**20:.1f} MiB")
    print(f"peak RSS: {peak_mib():.0f} MiB (baseline {baseline:.0f} MiB, after ingest "
          f"{after_ingest:.0f} MiB)")


class Exporter(ThreadingHTTPServer):
    """A v1 exporter stand-in: GET /sfive streams what ``send`` is given, chunk by chunk."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _ExporterHandler)
        self.chunks: list[bytes] = []
        self.cond = threading.Condition()
        self.connected = threading.Event()
        self.closing = False

    def send(self, data: bytes) -> None:
        with self.cond:
            self.chunks.append(data)
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        self.shutdown()
        self.server_close()


class _ExporterHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Exporter

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        self.server.connected.set()
        sent = 0
        try:
            while True:
                with self.server.cond:
                    while sent == len(self.server.chunks) and not self.server.closing:
                        self.server.cond.wait(0.5)
                    if self.server.closing:
                        return
                    chunk = self.server.chunks[sent]
                    self.server.chunks[sent] = b""
                    sent += 1
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
        except OSError:
            pass

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        pass


def vm_hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for {pid}")


def vm_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def through_service(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="sfive-rss-"))
    hub = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    hub.bind(str(tmp / "hub.sock"))
    hub.settimeout(0.2)
    exporter = Exporter()
    threading.Thread(target=exporter.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{exporter.server_address[1]}/sfive"
    log = tmp / "service.log"
    command = [args.twistd, "-n", "--pidfile=", "-l", str(log), "sfive-ngxlua",
               "-n", "bench", "-d", str(args.duration), "-S", "foo/hls/high",
               "-u", url, "-s", str(tmp / "hub.sock"),
               "--max-clients", str(args.max_clients)]
    service = subprocess.Popen(command, stdin=subprocess.DEVNULL)
    datasets: list[dict] = []
    sizes: list[int] = []

    def receive(until: float) -> None:
        while time.monotonic() < until:
            try:
                data = hub.recv(1 << 21)
            except socket.timeout:
                return
            sizes.append(len(data))
            datasets.append(json.loads(data))

    try:
        deadline = time.monotonic() + 30
        while not datasets and time.monotonic() < deadline:
            assert service.poll() is None, log.read_text()
            receive(deadline)
        assert datasets and exporter.connected.is_set(), "the service did not start"
        idle = vm_rss_mib(service.pid)
        first = len(datasets)
        started = time.monotonic()
        expected = 0
        for start in range(0, args.clients, 1000):
            # paced: the records spread evenly over --seconds, as a flood of viewers would
            pause = started + args.seconds * start / args.clients - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            now = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
            lines = []
            for i in range(start, min(start + 1000, args.clients)):
                sent = 1000 + i
                expected += sent
                lines.append(
                    f'{{"seq":{i + 1},"time":"{now}","client":"{client_ip(i)}",'
                    f'"ua":"{user_agent(i, args.ua_length)}","url":"{URL}","status":200,'
                    f'"bytes-sent":{sent}}}\n')
            exporter.send("".join(lines).encode())
            receive(0)
        sending = time.monotonic() - started

        def counted() -> tuple[int, int]:
            mine = datasets[first:]
            return (sum(d["data"]["client-count"] for d in mine),
                    sum(d["data"]["bytes-sent"] for d in mine))

        deadline = time.monotonic() + 120
        while counted() != (args.clients, expected) and time.monotonic() < deadline:
            assert service.poll() is None, log.read_text()[-3000:]
            receive(deadline)
        took = time.monotonic() - started
        peak = vm_hwm_mib(service.pid)
        clients, sent = counted()
        mine = datasets[first:]
        busy = [(d["start-time"], d["data"]["client-count"], len(d["data"]["clients"]), size)
                for d, size in zip(mine, sizes[first:]) if d["data"]["client-count"]]
    finally:
        service.send_signal(signal.SIGTERM)
        try:
            service.wait(30)
        except subprocess.TimeoutExpired:
            service.kill()
        exporter.close()
        hub.close()
    exact = (clients, sent) == (args.clients, expected)
    print(f"service: -d {args.duration} --max-clients {args.max_clients}, clients={args.clients} "
          f"ua_length={args.ua_length}; sent over {sending:.1f}s, all reported after {took:.1f}s")
    for start, count, listed, size in busy:
        print(f"  interval {start}: client-count {count}, {listed} clients in a datagram of "
              f"{size} bytes")
    print(f"totals: clients {clients} of {args.clients}, bytes {sent} of {expected}: "
          f"{'exact' if exact else 'DIFFER'}")
    print(f"peak RSS (VmHWM): {peak:.0f} MiB (idle before the load: {idle:.0f} MiB)")
    return 0 if exact else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100_000)
    parser.add_argument("--max-clients", type=int, default=50_000)
    parser.add_argument("--ua-length", type=int, default=80,
                        help="characters per user agent (80; the issue's hostile case: 300)")
    parser.add_argument("--service", action="store_true",
                        help="through the real service (twistd), an exporter and a hub socket")
    parser.add_argument("--duration", type=int, default=2, help="the service's -d (2)")
    parser.add_argument("--seconds", type=float, default=3,
                        help="--service: send the records evenly over this many seconds (3)")
    parser.add_argument("--twistd", default=str(Path(sys.executable).parent / "twistd"),
                        help="twistd of a venv with sfive-ngxlua installed (this venv's)")
    args = parser.parse_args()
    if args.service:
        return through_service(args)
    in_process(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
