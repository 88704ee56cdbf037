"""CPU and size of a state checkpoint (issue 11): one SQLite transaction of the model's changes
since the last one, plus the position, on a real file (WAL, synchronous=NORMAL).

Scenarios, each on a fresh state directory, the model fed through ``IntervalModel.add``:

- ``streamers``: 8 streamers, ``--viewers`` clients each, every client fetching one segment per
  ``--segment`` seconds; one checkpoint per second (the LoopingCall's period), so each
  checkpoint carries the clients that fetched in that second.
- ``clients``: ``--clients`` distinct clients in one interval of one streamer: the checkpoint
  right after all of them arrived (the worst case: every row new), then steady state (each
  second a ``1/--segment`` share of them fetches again), then the report's transaction (the
  interval closed, its rows deleted, its dataset queued).

CPU is the process's user+system time around ``StateStore.checkpoint`` (SQLite runs in this
thread), median and maximum over the checkpoints of a scenario.

    python bench/checkpoint.py [--viewers 500] [--clients 50000] [--segment 4] [--seconds 30]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Callable, List

from sfive_ngxlua.datasets import datasets, encode
from sfive_ngxlua.model import IntervalModel
from sfive_ngxlua.records import Record
from sfive_ngxlua.settings import Settings
from sfive_ngxlua.stats import Stats
from sfive_ngxlua.store import StateStore

T0 = 1_800_000_000
UA = "Mozilla/5.0 (Linux; Android 14; SM-S918B) AppleWebKit/537.36 (KHTML, like Gecko) Player/{}"


def cpu() -> float:
    return time.process_time()


def timed(action: Callable[[], object]) -> float:
    """Milliseconds of CPU ``action`` takes."""
    before = cpu()
    action()
    return (cpu() - before) * 1000


def ip(i: int) -> str:
    return f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"


def open_store(settings: Settings) -> StateStore:
    directory = tempfile.mkdtemp(prefix="sfive-bench-")
    return StateStore(os.path.join(directory, "state"), settings, Stats())


def file_size(store: StateStore) -> int:
    return sum(os.path.getsize(store.path + s) for s in ("", "-wal")
               if os.path.exists(store.path + s))


def report(name: str, costs: List[float], extra: str = "") -> None:
    print(f"{name:44} median {statistics.median(costs):7.2f} ms  max {max(costs):7.2f} ms  "
          f"({len(costs)} checkpoints){extra}")


def eight_streamers(viewers: int, segment: int, seconds: int) -> None:
    streamers = tuple((c, f, q) for c in ("a", "b") for f in ("hls", "dash")
                      for q in ("high", "low"))
    settings = Settings(streamers=streamers, hostname="bench", duration=15)
    store = open_store(settings)
    stats = Stats()
    model = IntervalModel(settings, stats, start=T0)
    store.checkpoint(model, {"kind": "exporter", "ring": None, "seq": 0})
    costs, seq = [], 0
    for second in range(seconds):
        t = T0 + 15 + second
        for s, streamer in enumerate(streamers):
            for v in range(viewers):
                if (v + second) % segment == 0:
                    seq += 1
                    model.add(Record(t, streamer, ip(s * viewers + v), UA.format(v), 1_500_000))
        if second and second % 15 == 0:
            model.close_due(t + 1.0)
        position = {"kind": "exporter", "ring": "0123456789abcdef", "seq": seq}
        costs.append(timed(lambda p=position: store.checkpoint(model, p)))
        store.scrub_wal()
    rate = 8 * viewers / segment
    report(f"8 streamers x {viewers} viewers ({rate:.0f} req/s)", costs,
           f", file+WAL {file_size(store) / 1e6:.1f} MB")
    store.close()


def many_clients(clients: int, segment: int, seconds: int) -> None:
    streamer = ("a", "hls", "high")
    settings = Settings(streamers=(streamer,), hostname="bench", duration=3600,
                        max_clients=max(clients, 50000))
    store = open_store(settings)
    queue = store.queue(1000)
    stats = Stats()
    model = IntervalModel(settings, stats, start=T0)
    store.checkpoint(model, {"kind": "exporter", "ring": None, "seq": 0})
    t = T0 + 3600
    for i in range(clients):
        model.add(Record(t, streamer, ip(i), UA.format(i), 1_500_000))
    first = timed(lambda: store.checkpoint(model, {"kind": "exporter", "ring": None,
                                                   "seq": clients}))
    report(f"{clients} clients, first checkpoint (all new)", [first],
           f", file+WAL {file_size(store) / 1e6:.1f} MB")
    costs = []
    for second in range(seconds):
        for i in range(second % segment, clients, segment):
            model.add(Record(t + second, streamer, ip(i), UA.format(i), 1_500_000))
        position = {"kind": "exporter", "ring": None, "seq": clients + second}
        costs.append(timed(lambda p=position: store.checkpoint(model, p)))
    report(f"{clients} clients, steady ({clients // segment} changed/s)", costs)
    full = []
    for second in range(3):
        for i in range(second % segment, clients, segment):
            model.add(Record(t + second, streamer, ip(i), UA.format(i), 1_500_000))
        store.write_all_next()  # what a non-incremental checkpoint (the whole model) costs
        position = {"kind": "exporter", "ring": None, "seq": clients + seconds + second}
        full.append(timed(lambda p=position: store.checkpoint(model, p)))
    report(f"{clients} clients, full rewrite instead", full)
    started = time.perf_counter()
    cost = timed(lambda: store.checkpoint(
        model, None, queue,
        [encode(d) for i in model.close_due(t + 3600 + 1.0) for d in datasets(i, settings)]))
    wall = (time.perf_counter() - started) * 1000
    report(f"{clients} clients, report transaction", [cost], f", wall {wall:.0f} ms")
    cost = timed(store.scrub_wal)
    report("  then WAL checkpoint (TRUNCATE)", [cost])
    store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--viewers", type=int, default=500, help="clients per streamer")
    parser.add_argument("--clients", type=int, default=50_000)
    parser.add_argument("--segment", type=int, default=4, help="seconds between fetches")
    parser.add_argument("--seconds", type=int, default=30)
    args = parser.parse_args()
    import sqlite3

    print(f"SQLite {sqlite3.sqlite_version}; CPU ms per checkpoint (user+system)")
    eight_streamers(args.viewers, args.segment, args.seconds)
    many_clients(args.clients, args.segment, args.seconds)


if __name__ == "__main__":
    main()
