"""The per-line cost in instructions, for before/after comparisons on a busy machine.

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python bench/hotpath.py --lines 50000 [--track] [--imports-only]

CPU seconds on a shared 2-core machine vary by 20-30% from run to run; callgrind's instruction
count ("Collected") does not (set PYTHONHASHSEED=0). Replays the first --lines generated lines
(bench/gen.py, seed 1) in this process, datasets to /dev/null, as bench/run.py's (d) does;
``--imports-only`` does everything but the replay, so the difference of the two counts divided
by --lines is the cost per line. ``--track`` feeds the model with change tracking on (as under
a state store) instead of through replay: model.add only, on records parsed beforehand.
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lines", type=int, default=50000)
    p.add_argument("--imports-only", action="store_true")
    p.add_argument("--model-only", action="store_true",
                   help="time model.add alone (records parsed beforehand)")
    p.add_argument("--track", action="store_true", help="with --model-only: tracking on")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "input.log")
        gen.write(path, a.lines)
        if a.model_only:
            model_only(path, a.track, not a.imports_only)
        elif not a.imports_only:
            run.replay_inprocess(path)
        else:
            from sfive_ngxlua import replay  # noqa: F401
    return 0


if __name__ == "__main__":
    sys.exit(main())
