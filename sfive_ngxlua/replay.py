"""``sfive-ngxlua-replay``: datasets for recorded exporter output (backfill after an outage).

The same pipeline, model, datasets and sinks as the live service; time is taken from the records:
an interval is emitted once a record at least ``grace`` past its end has been read, and the rest
at the end of the input.
"""

from __future__ import annotations

import gzip
import os
import sys
import time
from collections import deque
from typing import IO, Any, Deque, Iterator, List, Optional, Tuple

from twisted.python import usage

from . import __version__
from .datasets import Dataset
from .model import IntervalModel
from .pipeline import Pipeline
from .report import report
from .settings import ModelOptions, Settings
from .stats import Stats

CHUNK = 1 << 20
HUB_PATIENCE = 30.0


class ReplayOptions(ModelOptions):
    """The service's model options and sinks, plus the files to read."""

    synopsis = "[options] [FILE ...]"
    longdesc = (
        "Replays recorded nginx-lua exporter output (FILE, '-' for standard input, .gz "
        "decompressed) and emits one sfive dataset per streamer and interval, as JSON lines on "
        "standard output or to the hub with --socket/--hub."
    )
    optFlags = [["quiet", "q", "no progress line and no summary on standard error"]]

    def opt_version(self) -> None:
        """print the version and exit"""
        print(f"sfive-ngxlua-replay {__version__}")
        sys.exit(0)

    def parseArgs(self, *files: str) -> None:
        self["files"] = list(files) or ["-"]


class Progress:
    """A progress line on a terminal, at most a few times a second."""

    def __init__(self, stream: IO[str], total: Optional[int], enabled: bool) -> None:
        self.stream = stream
        self.total = total
        self.enabled = enabled and stream.isatty()
        self.started = self.last = time.monotonic()

    def update(self, done: int, stats: Stats, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self.last < 0.25 and not force):
            return
        self.last = now
        rate = stats.lines / max(now - self.started, 1e-9)
        share = f" {100 * done / self.total:5.1f}%" if self.total else ""
        self.stream.write(f"\r{share} {done / 1e6:9.1f} MB {stats.lines:12,} lines "
                          f"{rate:10,.0f} lines/s")
        self.stream.flush()

    def done(self) -> None:
        if self.enabled:
            self.stream.write("\n")


def open_inputs(files: List[str]) -> Tuple[List[Tuple[str, IO[bytes]]], List[str]]:
    """Open every input before anything is read, so that a bad name fails early."""
    opened, errors = [], []
    for name in files:
        try:
            if name == "-":
                stream: IO[bytes] = sys.stdin.buffer
            elif name.endswith(".gz"):
                stream = gzip.open(name, "rb")
                stream.peek(1)
            else:
                stream = open(name, "rb")
        except (OSError, EOFError) as e:
            errors.append(f"cannot read {name}: {e.strerror or e}")
            continue
        opened.append((name, stream))
    return opened, errors


def chunks(inputs: List[Tuple[str, IO[bytes]]], errors: List[str]) -> Iterator[Tuple[int, bytes]]:
    """(bytes read so far, chunk) over all inputs; a file always ends a line."""
    done = 0
    for name, stream in inputs:
        try:
            while True:
                data = stream.read(CHUNK)
                if not data:
                    break
                done += len(data)
                yield done, data
        except (OSError, EOFError, ValueError) as e:
            errors.append(f"error reading {name} (after {done} bytes): {e}")
        finally:
            if stream is not sys.stdin.buffer:
                stream.close()
        yield done, b"\n"


class Replay:
    """Runs one replay into a sink (anything with ``deliver(dataset)``)."""

    def __init__(self, settings: Settings, sink: Any, stats: Optional[Stats] = None) -> None:
        self.settings = settings
        self.sink = sink
        self.stats = stats if stats is not None else Stats()
        self.model = IntervalModel(settings, self.stats, start=None)
        self.pipeline = Pipeline(settings, self.stats, self.model, on_time=self._time)
        self.datasets = 0

    def _time(self, now: int) -> None:
        self.datasets += report(self.model.close_due(now), self.settings, self.sink.deliver)

    def feed(self, data: bytes) -> None:
        self.pipeline.feed(data)

    def finish(self) -> None:
        """End of input: everything up to the last record's interval."""
        self.pipeline.feed(b"\n")
        self.datasets += report(self.model.close_all(), self.settings, self.sink.deliver)


def summary(stats: Stats, datasets: int) -> str:
    rejected = ", ".join(f"{k}={v}" for k, v in sorted(stats.rejected.items())) or "none"
    return (f"sfive-ngxlua-replay: {stats.lines} lines, {stats.accepted} accepted, "
            f"{sum(stats.rejected.values())} rejected ({rejected}), {stats.late} late, "
            f"{stats.before_start} before the first interval, {stats.folded} folded into "
            f"overflow, {stats.lost} lost in exporter gaps, {datasets} datasets")


def _total_size(files: List[str]) -> Optional[int]:
    try:
        return sum(os.path.getsize(f) for f in files if f != "-" and not f.endswith(".gz")) or None
    except OSError:
        return None


def run(settings: Settings, files: List[str], quiet: bool = False,
        out: Optional[IO[bytes]] = None, err: IO[str] = sys.stderr) -> int:
    """Replay ``files`` to standard output (or ``out``); return the exit status."""
    from .sinks import StdoutSink

    inputs, errors = open_inputs(files)
    if errors:
        return _ended(errors, None, 0, err, status=2)
    replay = Replay(settings, StdoutSink(Stats(), out))
    progress = Progress(err, _total_size(files), not quiet)
    for done, data in chunks(inputs, errors):
        replay.feed(data)
        progress.update(done, replay.stats)
    replay.finish()
    progress.done()
    return _ended(errors, None if quiet else replay.stats, replay.datasets, err)


def _ended(errors: List[str], stats: Optional[Stats], datasets: int, err: IO[str],
           status: int = 1) -> int:
    """Say what went wrong and (unless ``stats`` is None) the summary; the exit status."""
    for e in errors:
        err.write(f"sfive-ngxlua-replay: {e}\n")
    if stats is not None:
        err.write(summary(stats, datasets) + "\n")
    return status if errors else 0


def run_to_hub(settings: Settings, files: List[str], quiet: bool = False) -> int:
    """Replay to the hub through the service's sinks, pausing while the hub's queue is full."""
    from twisted.internet import task
    from twisted.internet.defer import ensureDeferred

    status: List[int] = []
    try:
        task.react(lambda reactor: ensureDeferred(_to_hub(reactor, settings, files, quiet,
                                                          status)))
    except SystemExit as e:
        if e.code not in (0, None):
            return 1
    return status[0] if status else 1


async def _to_hub(reactor: Any, settings: Settings, files: List[str], quiet: bool,
                  status: List[int]) -> None:
    from twisted.internet import task

    from .service import make_sink
    from .sinks import CallableSink

    inputs, errors = open_inputs(files)
    if errors:
        status.append(_ended(errors, None, 0, sys.stderr, status=2))
        return
    stats = Stats()
    sink = make_sink(settings, reactor, stats)
    sink.startService()
    pending: Deque[Dataset] = deque()
    replay = Replay(settings, CallableSink(pending.append), stats)
    progress = Progress(sys.stderr, _total_size(files), not quiet)

    async def hand_over() -> bool:
        """Move datasets into the hub's queue without overfilling it; False if the hub stalls."""
        stalled = 0.0
        while pending:
            if len(sink.queue) < settings.queue_limit:
                sink.deliver(pending.popleft())
                stalled = 0.0
                continue
            await task.deferLater(reactor, 0.01, lambda: None)
            stalled += 0.01
            if stalled >= HUB_PATIENCE:
                errors.append(f"the hub took no dataset for {HUB_PATIENCE:g}s; giving up")
                return False
        return True

    for done, data in chunks(inputs, errors):
        replay.feed(data)
        progress.update(done, stats)
        if not await hand_over():
            break
    else:
        replay.finish()
        await hand_over()
    await sink.stopService()
    progress.done()
    if stats.queued:
        errors.append(f"{stats.queued} datasets were not delivered to the hub")
    status.append(_ended(errors, None if quiet else stats, replay.datasets, sys.stderr))


def main(argv: Optional[List[str]] = None) -> None:
    """Console entry point."""
    options = ReplayOptions()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        sys.stderr.write(f"{options}\nsfive-ngxlua-replay: {e}\n")
        sys.exit(64)
    settings = options.settings()
    files = options["files"]
    if settings.socket or settings.hub:
        sys.exit(run_to_hub(settings, files, options["quiet"]))
    try:
        sys.exit(run(settings, files, options["quiet"]))
    except BrokenPipeError:
        sys.exit(1)
