"""The per-line cost in instructions, for before/after comparisons on a busy machine.

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python bench/hotpath.py --lines 50000 [--track] [--imports-only]

CPU seconds on a shared 2-core machine vary by 20-30% from run to run; callgrind's instruction
count ("Collected") does not (set PYTHONHASHSEED=0). Replays the first --lines generated lines
(bench/gen.py, seed 1) in this process, datasets to /dev/null, as bench/run.py's (d) does;
``--imports-only`` does everything but the replay, so the difference of the two counts divided
by --lines is the cost per line. ``--track`` feeds the model with change tracking on (as under
a state store) instead of through replay: model.add only, on records parsed beforehand.

``--stage S`` runs the pipeline's stages up to S (split, decode, parse, model) instead of the
replay: consecutive stages' counts differ by the cost of the later one.

``--changes N`` (no callgrind needed) times the model's side of a checkpoint instead: 8
streamers, N clients in one interval, then take_changes() with every client changed, with 1%
changed, with none, and snapshot(); best of 5, CPU milliseconds.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import gen, run  # noqa: E402


def distinct_clients(path: str) -> None:
    """Give every line its own client address (no client repeats: caches and known-client
    look-ups cannot be what makes it fast)."""
    import re

    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    n = iter(range(1, len(lines) + 1))
    pattern = re.compile(rb'"client":"[^"]*"')
    out = [pattern.sub(lambda m: b'"client":"10.%d.%d.%d"' % (
        (i := next(n)) >> 16, i >> 8 & 255, i & 255), line, count=1) for line in lines]
    with open(path, "wb") as f:
        f.write(b"\n".join(out))


STAGES = ("split", "decode", "parse", "model")


def stages(path: str, upto: str) -> None:
    """The pipeline's stages up to ``upto`` on 64 KiB chunks of the input: split (the
    splitter's blocks), decode (each block's checks and decoder call), parse (decoding and
    classifying: fields, types, status, URL and time look-ups, the records), model
    (``add_records``); the differences of consecutive stages' counts are their costs."""
    from sfive_ngxlua.lines import LineSplitter
    from sfive_ngxlua.model import IntervalModel
    from sfive_ngxlua.records import RecordParser
    from sfive_ngxlua.replay import ReplayOptions
    from sfive_ngxlua.stats import Stats

    options = ReplayOptions()
    options.parseOptions(run.replay_args([path]))
    settings = options.settings()
    splitter, parser = LineSplitter(settings.max_line_length), RecordParser(settings)
    model = IntervalModel(settings, Stats())
    level = STAGES.index(upto)
    rejected: dict = {}
    with open(path, "rb") as f:
        data = f.read()
    for i in range(0, len(data), 65536):
        blocks = splitter.feed_blocks(data[i:i + 65536])
        if blocks is None:
            blocks = [b"\n".join(splitter.feed(data[i:i + 65536]))]
        if level == 1 and parser.decoder == "c":
            scan_only(blocks)
        elif level == 1:
            for block in blocks:
                parser._decode_block(block, parser.decoder == "orjson")
        elif level >= 2:
            records, _ = parser.parse_blocks(blocks, rejected)
            if level == 3:
                model.add_records(records)


def scan_only(blocks: list) -> None:
    """The accelerator's decode stage: its UTF-8 and JSON scan of each line and the fields'
    spans, nothing built, nothing looked up (the lines it cannot scan are skipped)."""
    from sfive_ngxlua.records import _speedups

    i = pos = 0
    while i < len(blocks):
        i, pos, end, _, _ = _speedups.scan(blocks, True, i, pos, 0, None, False, None, {}, {},
                                           {}, None, frozenset(), None)
        pos = end + 1


def model_only(path: str, track: bool, feed: bool) -> None:
    """Parse every line first, then (if ``feed``) add the records to a model."""
    from sfive_ngxlua.model import IntervalModel
    from sfive_ngxlua.records import Record, RecordParser
    from sfive_ngxlua.replay import ReplayOptions
    from sfive_ngxlua.stats import Stats

    options = ReplayOptions()
    options.parseOptions(run.replay_args([path]))
    settings = options.settings()
    parser = RecordParser(settings)
    with open(path, "rb") as f:
        records = [r for r in map(parser.parse, f.read().splitlines()) if type(r) is Record]
    model = IntervalModel(settings, Stats())
    if track:
        model.take_changes()
    if feed:
        add = model.add
        for record in records:
            add(record)


def changes(clients: int) -> None:
    """CPU milliseconds of take_changes() and snapshot() on a model of ``clients`` clients."""
    import time

    from sfive_ngxlua.model import IntervalModel
    from sfive_ngxlua.records import Record
    from sfive_ngxlua.settings import Settings
    from sfive_ngxlua.stats import Stats

    streamers = tuple((f"c{i}", "hls", "high") for i in range(8))
    model = IntervalModel(Settings(streamers=streamers, hostname="h", duration=15), Stats())
    model.take_changes()
    records = [Record(1_800_000_000, streamers[n % 8], f"10.{n >> 16}.{n >> 8 & 255}.{n & 255}",
                      "Mozilla/5.0 (X11; Linux x86_64) player/1.0", 1000) for n in range(clients)]

    def best(fn) -> float:
        out = []
        for _ in range(5):
            c0 = time.process_time()
            fn()
            out.append(time.process_time() - c0)
        return min(out) * 1000

    def all_changed() -> None:
        for r in records:
            model.add(r)

    def some_changed() -> None:
        for r in records[:: 100]:
            model.add(r)

    figures = {}
    for name, touch in (("all", all_changed), ("1%", some_changed), ("none", lambda: None)):
        runs = []
        for _ in range(5):
            touch()
            c0 = time.process_time()
            taken = model.take_changes()
            runs.append(time.process_time() - c0)
        figures[name] = (min(runs) * 1000, len(taken.clients))
    snap = best(model.snapshot)
    print(f"clients={clients} streamers=8 " + " ".join(
        f"take_changes[{k} changed: {n} rows]={ms:.1f}ms" for k, (ms, n) in figures.items())
        + f" snapshot={snap:.1f}ms")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lines", type=int, default=50000)
    p.add_argument("--imports-only", action="store_true")
    p.add_argument("--model-only", action="store_true",
                   help="time model.add alone (records parsed beforehand)")
    p.add_argument("--track", action="store_true",
                   help="change tracking on (as under --state-dir): the replay's model, or "
                   "with --model-only the model alone")
    p.add_argument("--stage", choices=STAGES,
                   help="run the pipeline's stages up to this one instead of the replay")
    p.add_argument("--distinct", action="store_true", help="every line from another client")
    p.add_argument("--no-orjson", action="store_true",
                   help="decode with the standard library even where orjson is installed")
    p.add_argument("--changes", type=int, metavar="N",
                   help="time take_changes()/snapshot() with N clients instead")
    a = p.parse_args()
    if a.changes:
        changes(a.changes)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "input.log")
        gen.write(path, a.lines)
        if a.distinct:
            distinct_clients(path)
        from sfive_ngxlua import records, replay

        if a.no_orjson:
            records.orjson = None
        if a.track and not a.model_only:
            init = replay.Replay.__init__

            def tracked(self, *args, **kw) -> None:
                init(self, *args, **kw)
                self.model.take_changes()

            replay.Replay.__init__ = tracked
        if a.stage and not a.imports_only:
            stages(path, a.stage)
        elif a.model_only:
            model_only(path, a.track, not a.imports_only)
        elif not a.imports_only:
            run.replay_inprocess(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
