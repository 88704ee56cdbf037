"""Peak memory with N distinct clients in one interval (issue 3: bounded memory under cardinality).

Runs the service's own composition (``service.build``: pipeline, model, reporter) on a
task.Clock: feeds N exporter lines, each from a distinct client, in 64 KiB chunks as the fetcher
would, then reports the interval (datasets built and encoded, as a sink does) and prints the
process's peak RSS. Lines are generated in batches so that the input itself is not held.

    python bench/rss_clients.py [--clients 100000] [--max-clients 50000]
"""

from __future__ import annotations

import argparse
import resource
import time

import simplejson
from twisted.internet import reactor
from twisted.internet.task import Clock

from sfive_ngxlua.datasets import encode
from sfive_ngxlua.service import build
from sfive_ngxlua.settings import Settings
from sfive_ngxlua.sinks import CallableSink
from sfive_ngxlua.stats import Stats

T0 = 1_800_000_000
UA = "Mozilla/5.0 (Linux; Android 14; SM-S918B) AppleWebKit/537.36 (KHTML, like Gecko) Player/{}"


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100_000)
    parser.add_argument("--max-clients", type=int, default=50_000)
    args = parser.parse_args()

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
            "client": f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", "ua": UA.format(i),
            "url": "/live/hls/foo-high/seg1.ts", "status": 200, "bytes-sent": 1000 + i,
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
    print(f"clients={args.clients} max_clients={args.max_clients} folded={stats.folded}")
    print(f"ingest {fed:.2f}s, report {reported:.2f}s, dataset {sizes[0] / 2**20:.1f} MiB")
    print(f"peak RSS: {peak_mib():.0f} MiB (baseline {baseline:.0f} MiB, after ingest "
          f"{after_ingest:.0f} MiB)")


if __name__ == "__main__":
    main()
