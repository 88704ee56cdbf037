"""``sfive-ngxlua-replay``: datasets for recorded exporter output or nginx's access log in the
sfive format (backfill after an outage).

The same pipeline, model, datasets and sinks as the live service; time is taken from the records:
an interval is emitted once a record at least ``grace`` past its end has been read, and the rest
at the end of the input. With ``--from/--until`` exactly the intervals of that window are
emitted, each only if the input covers it completely, and lines outside it are not counted.

The standard-output path imports no Twisted service or reactor machinery, so that the first line
is read soon after the start.
"""

from __future__ import annotations

import gzip
import importlib
import importlib.util
import math
import os
import sys
import time
from collections import deque
from typing import IO, Any, Deque, Dict, Iterator, List, Optional, Sequence, Tuple


def _lazy(name: str) -> None:
    """Import ``name`` so that it loads on first use (importlib's LazyLoader). Twisted's
    ``twisted.python.compat`` imports ``http.cookiejar``, which pulls in urllib.request,
    http.client, email and ssl: some 40 ms of replay's start-up for a module it never uses."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        return
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    parent, _, child = name.rpartition(".")
    if parent:  # so that "from http import cookiejar" finds it without touching it
        setattr(importlib.import_module(parent), child, module)


_lazy("http.cookiejar")

from twisted.python import usage  # noqa: E402

from . import __version__  # noqa: E402
from .datasets import JsonLinesWriter, report, start_time  # noqa: E402
from .model import Interval, IntervalModel  # noqa: E402
from .pipeline import Pipeline  # noqa: E402
from .records import Record, RecordParser  # noqa: E402
from .settings import HubOptions, ModelOptions, Settings, parse_command_line  # noqa: E402
from .stats import Stats  # noqa: E402

CHUNK = 1 << 20
HUB_PATIENCE = 30.0


class ReplayOptions(ModelOptions, HubOptions):
    """The service's model options and sinks, plus the files to read."""

    synopsis = "[options] [FILE ...]"
    longdesc = (
        "Replays recorded nginx-lua exporter output or nginx access logs in the sfive format "
        "(FILE, '-' for standard input, .gz decompressed; give rotated logs oldest first) and "
        "emits one sfive dataset per streamer and interval, as JSON lines on standard output or "
        "to the hub with --socket/--hub. With --from/--until, exactly the intervals of that "
        "window that the input covers."
    )
    optFlags = [["quiet", "q", "no progress line and no summary on standard error"]]
    optParameters = [
        ["from", None, None,
         "emit only the intervals from this time on (ISO 8601, e.g. 2026-11-27T20:00:00Z)"],
        ["until", None, None, "emit only the intervals that end by this time (ISO 8601)"],
        ["jobs", "j", None, "processes to replay on [default: the cores]; the datasets are "
         "those of one process, byte for byte"],
    ]

    def postOptions(self) -> None:
        super().postOptions()
        self.window = window_of(self["from"], self["until"], self.settings())
        self.jobs = _jobs(self["jobs"])

    def opt_version(self) -> None:
        """print the version and exit"""
        from .records import default_decoder

        print(f"sfive-ngxlua-replay {__version__} (lines decoded by {default_decoder()})")
        sys.exit(0)

    def parseArgs(self, *files: str) -> None:
        self["files"] = list(files) or ["-"]


def _jobs(value: Optional[str]) -> int:
    if value is None:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
            os.cpu_count() or 1
    if not value.isdigit() or int(value) < 1:
        raise usage.UsageError(f"--jobs must be a positive integer, not {value!r}")
    return int(value)


def window_of(start: Optional[str], until: Optional[str],
              settings: Settings) -> Optional[Window]:
    """``--from/--until`` as epoch seconds, checked: on interval boundaries, from before until."""
    if start is None and until is None:
        return None
    parse = RecordParser(settings).seconds
    bounds: List[Optional[int]] = []
    for option, text in (("--from", start), ("--until", until)):
        if text is None:
            bounds.append(None)
            continue
        seconds = parse(text)
        if seconds is None:
            raise usage.UsageError(f"{option} {text!r}: not an ISO 8601 time with a time zone, "
                                   f"e.g. 2026-11-27T20:00:00Z")
        if seconds % settings.duration:
            raise usage.UsageError(f"{option} {text!r}: not on an interval boundary (a multiple "
                                   f"of --duration {settings.duration}s since the epoch)")
        bounds.append(seconds)
    lo, hi = bounds
    if lo is not None and hi is not None and lo >= hi:
        raise usage.UsageError(f"--from {start!r} is not before --until {until!r}")
    return lo, hi


Window = Tuple[Optional[int], Optional[int]]
"""``--from/--until`` in epoch seconds (either may be None)."""

WindowCounts = Tuple[int, int, Optional[int], Optional[int], Optional[Tuple[int, int]]]
"""WindowModel.counts(): before, after, the first record's time, the latest, the uncovered
start."""


def replay_model(settings: Settings, stats: Stats, window: Optional[Window]) -> IntervalModel:
    """The model of a replay: the service's, or with ``--from/--until`` a WindowModel."""
    if window is None:
        return IntervalModel(settings, stats, start=None)
    return WindowModel(settings, stats, *window)


class WindowModel(IntervalModel):
    """The interval model of a replay limited to ``[lo, hi)``: records outside are counted, not
    kept, and an interval counts as covered only if the input reaches ``grace`` past its end
    and began ``grace`` before its start (lines interleave out of order by up to nginx's flush
    period, which grace must cover)."""

    def __init__(self, settings: Settings, stats: Stats, lo: Optional[int] = None,
                 hi: Optional[int] = None) -> None:
        super().__init__(settings, stats, start=None)
        self.lo = lo
        self.hi = hi
        self.before = 0
        self.after = 0
        self.earliest: Optional[int] = None
        self.latest: Optional[int] = None
        self.uncovered_start: Optional[Tuple[int, int]] = None
        self.last_k = None if hi is None else hi // self.duration - 1
        if lo is not None:
            self.first = lo // self.duration
            self.reported = self.first - 1

    def add_records(self, records: Sequence[Record], due: float = math.inf) -> int:
        """The records inside the window go on to the model, in runs; the others are counted
        (and a record after the window still makes the intervals up to its end due)."""
        lo, hi = self.lo, self.hi
        n = len(records)
        i = 0
        while i < n:
            t = records[i][0]
            if self.earliest is None:
                self.begins_at(t)
            if (lo is not None and t < lo) or (hi is not None and t >= hi):
                if t > self.latest:
                    self.latest = t
                i += 1
                if lo is not None and t < lo:
                    self.before += 1
                else:
                    self.after += 1
                    if t >= due:
                        return i
                continue
            j = i + 1
            while j < n and (lo is None or records[j][0] >= lo) and (
                    hi is None or records[j][0] < hi):
                j += 1
            latest = max(r[0] for r in records[i:j])
            if latest > self.latest:
                self.latest = latest
            taken = super().add_records(records[i:j] if i or j < n else records, due)
            if taken < j - i:
                return i + taken
            i = j
        return n

    @property
    def due_at(self) -> float:
        """Nothing more becomes due once the window's last interval is reported."""
        if self.last_k is not None and self.reported is not None and self.reported >= self.last_k:
            return math.inf
        return super().due_at

    def begins_at(self, t: int) -> None:
        """The input's first record is at ``t``: the window's intervals before ``t + grace``
        are not covered (their first lines are in an earlier file)."""
        self.earliest = self.latest = t
        if self.lo is None:
            return
        covered = -(-int(t + self.grace) // self.duration)
        if covered > self.first:
            self.uncovered_start = (self.first * self.duration, covered * self.duration)
            self.first = covered
            self.reported = covered - 1

    def due(self, now: float) -> int:
        """Nothing past the window's end (plus grace) becomes due."""
        if self.hi is not None:
            now = min(now, self.hi + self.grace)
        return super().due(now)

    def close_all(self, now: Optional[float] = None) -> list:
        """End of input: the intervals the input covers, nothing beyond."""
        if self.latest is None:
            return []
        return self.close_due(self.latest)

    def counts(self) -> WindowCounts:
        """What this model counted of the window beside the intervals (a parallel replay's
        worker hands them back with its model's snapshot)."""
        return (self.before, self.after, self.earliest, self.latest, self.uncovered_start)

    def resumed(self, settings: Settings, snapshot: Dict[str, Any], counts: WindowCounts
                ) -> WindowModel:
        """This window's model with a snapshot's state (``IntervalModel.restore``), this
        model's counts and ``counts`` (a later part of the input's) added up; where this
        model has seen no record yet, the other part's first record is the input's."""
        model = WindowModel.restore(settings, self.stats, snapshot)
        model.lo, model.hi, model.last_k = self.lo, self.hi, self.last_k
        before, after, earliest, latest, uncovered = counts
        model.before, model.after = self.before + before, self.after + after
        model.latest = latest if self.latest is None else self.latest if latest is None \
            else max(self.latest, latest)
        if self.earliest is not None:
            earliest, uncovered = self.earliest, self.uncovered_start
        model.earliest, model.uncovered_start = earliest, uncovered
        return model

    def uncovered(self) -> List[str]:
        """What of the window the input did not cover, as phrases for the summary."""
        out = []
        d = self.duration
        if self.uncovered_start is not None:
            a, b = self.uncovered_start
            out.append(f"the input begins at {start_time(self.earliest)}: intervals "
                       f"{start_time(a)} to {start_time(b)} not emitted")
        end = None if self.reported is None else (self.reported + 1) * d
        if self.hi is not None and (end is None or end < self.hi):
            where = "has no line in the window" if self.latest is None else \
                f"ends at {start_time(self.latest)}"
            out.append(f"the input {where}: intervals {start_time(end or self.lo or 0)} to "
                       f"{start_time(self.hi)} not emitted")
        return out


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

    def done(self, done: int = 0, stats: Optional[Stats] = None) -> None:
        """The line's end, after its last state (with ``stats``: where the replay ended)."""
        if self.enabled:
            if stats is not None:
                self.update(done, stats, force=True)
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

    def __init__(self, settings: Settings, sink: Any, stats: Optional[Stats] = None,
                 window: Optional[Window] = None) -> None:
        self.settings = settings
        self.sink = sink
        self.stats = stats if stats is not None else Stats()
        self.model = replay_model(settings, self.stats, window)
        # access logs: invalid UTF-8 read as the exporter writes it
        self.pipeline = Pipeline(settings, self.stats, self.model, on_time=self._time,
                                 repair_utf8=True)
        self.datasets = 0

    def _time(self, now: int) -> None:
        self.emit(self.model.close_due(now))

    def emit(self, intervals: List[Interval]) -> None:
        """Deliver finished intervals' datasets, in order."""
        self.datasets += report(intervals, self.settings, self.sink.deliver)

    def adopt(self, model: IntervalModel) -> None:
        """Go on with ``model`` (a parallel replay's leader takes on a worker's)."""
        self.model = self.pipeline.model = model

    def feed(self, data: bytes) -> None:
        self.pipeline.feed(data)

    def finish(self) -> None:
        """End of input: everything up to the last record's interval."""
        self.pipeline.feed(b"\n")
        self.emit(self.model.close_all())


def summary(stats: Stats, datasets: int, model: Optional[IntervalModel] = None) -> str:
    rejected = ", ".join(f"{k}={v}" for k, v in sorted(stats.rejected.items())) or "none"
    window = ""
    if isinstance(model, WindowModel):
        window = (f", {model.before + model.after} outside --from/--until ({model.before} "
                  f"before, {model.after} after)")
        window += "".join(f"; {phrase}" for phrase in model.uncovered())
    return (f"sfive-ngxlua-replay: {stats.lines} lines, {stats.accepted} accepted, "
            f"{sum(stats.rejected.values())} rejected ({rejected}), {stats.late} late, "
            f"{stats.before_start} before the first interval, {stats.folded} folded into "
            f"overflow, {stats.lost} lost in exporter gaps, {datasets} datasets{window}")


def _total_size(files: List[str]) -> Optional[int]:
    try:
        return sum(os.path.getsize(f) for f in files if f != "-" and not f.endswith(".gz")) or None
    except OSError:
        return None


def run(settings: Settings, files: List[str], quiet: bool = False,
        out: Optional[IO[bytes]] = None, err: IO[str] = sys.stderr,
        window: Optional[Window] = None, jobs: int = 1, unit_bytes: Optional[int] = None) -> int:
    """Replay ``files`` to standard output (or ``out``) on ``jobs`` processes; return the exit
    status."""
    inputs, errors = open_inputs(files)
    if errors:
        return _ended(errors, None, 0, err, status=2)
    plan = _plan(settings, files, jobs, window, unit_bytes, inputs)
    if plan is not None:
        return _run_jobs(settings, plan, quiet, out, err, jobs, window)
    replay = Replay(settings, JsonLinesWriter(Stats(), out), window=window)
    progress = Progress(err, _total_size(files), not quiet)
    done = 0
    for done, data in chunks(inputs, errors):
        replay.feed(data)
        progress.update(done, replay.stats)
    replay.finish()
    progress.done(done, replay.stats)
    return _ended(errors, None if quiet else replay.stats, replay.datasets, err, model=replay.model)


def _plan(settings: Settings, files: List[str], jobs: int, window: Optional[Window],
          unit_bytes: Optional[int], inputs: List[Tuple[str, IO[bytes]]]) -> Any:
    """The parallel replay's plan (sfive_ngxlua.parallel), or None where one process replays:
    ``--jobs 1``, nothing to spread, or the input's first record not found (the inputs are then
    read as they are, else closed)."""
    if jobs < 2:
        return None
    from .parallel import plan

    found = plan(settings, files, jobs, window, unit_bytes)
    if found is not None:
        for _name, stream in inputs:
            if stream is not sys.stdin.buffer:
                stream.close()
    return found


def _run_jobs(settings: Settings, plan: Any, quiet: bool, out: Optional[IO[bytes]],
              err: IO[str], jobs: int, window: Optional[Window]) -> int:
    """``run`` on several processes (sfive_ngxlua.parallel)."""
    from .parallel import JobFailed, Jobs, StreamOutput

    stats = Stats()
    progress = Progress(err, plan.size, not quiet)
    spread = Jobs(settings, plan, jobs, StreamOutput(out), stats, window, progress)
    try:
        spread.run()
    except JobFailed as e:
        progress.done()
        return _ended([str(e)], None, 0, err)
    progress.done(spread.done, stats)
    return _ended([], None if quiet else stats, spread.leader.datasets, err,
                  model=spread.leader.model)


def _ended(errors: List[str], stats: Optional[Stats], datasets: int, err: IO[str],
           status: int = 1, model: Optional[IntervalModel] = None) -> int:
    """Say what went wrong and (unless ``stats`` is None) the summary; the exit status."""
    for e in errors:
        err.write(f"sfive-ngxlua-replay: {e}\n")
    if stats is not None:
        err.write(summary(stats, datasets, model) + "\n")
    return status if errors else 0


def run_to_hub(settings: Settings, files: List[str], quiet: bool = False,
               window: Optional[Window] = None, jobs: int = 1,
               unit_bytes: Optional[int] = None) -> int:
    """Replay to the hub through the service's sinks, pausing while the hub's queue is full."""
    from twisted.internet import task
    from twisted.internet.defer import ensureDeferred

    status: List[int] = []
    try:
        task.react(lambda reactor: ensureDeferred(_to_hub(reactor, settings, files, quiet,
                                                          status, window, jobs, unit_bytes)))
    except SystemExit as e:
        if e.code not in (0, None):
            return 1
    return status[0] if status else 1


async def _to_hub(reactor: Any, settings: Settings, files: List[str], quiet: bool,
                  status: List[int], window: Optional[Window] = None, jobs: int = 1,
                  unit_bytes: Optional[int] = None) -> None:
    """The hub gets the datasets in order, only from this process; every dataset waits for
    room in the hub's queue (neither limit may drop one). With several jobs the workers never
    see the hub: their datasets come back in spool files (parallel.Spool), sent from here."""
    from twisted.internet import task

    from .service import make_sink
    from .sinks import CallableSink

    inputs, errors = open_inputs(files)
    if errors:
        status.append(_ended(errors, None, 0, sys.stderr, status=2))
        return
    stats = Stats()
    pending: Deque[Any] = deque()
    plan = _plan(settings, files, jobs, window, unit_bytes, inputs)
    progress = Progress(sys.stderr, _total_size(files) if plan is None else plan.size,
                        not quiet)
    spread: Any = None
    if plan is not None:
        from .parallel import JobFailed, Jobs, Queued, Spool, when_done

        spread = Jobs(settings, plan, jobs, Queued(pending), stats, window, progress)
        spread.start()  # the workers are forked before the hub's socket is opened
        trigger = reactor.addSystemEventTrigger("before", "shutdown", spread.stop)
    sink = make_sink(settings, reactor, stats)
    sink.startService()

    async def push(data: bytes) -> bool:
        stalled = 0.0
        while not sink.queue.takes(len(data)):  # neither limit may drop a dataset
            await task.deferLater(reactor, 0.01, lambda: None)
            stalled += 0.01
            if stalled >= HUB_PATIENCE:
                errors.append(f"the hub took no dataset for {HUB_PATIENCE:g}s; giving up")
                return False
        sink.queue.push(data)
        sink.flush()
        return True

    async def hand_over() -> bool:
        """Move datasets into the hub's queue without overfilling it; False if the hub stalls."""
        while pending:
            item = pending.popleft()
            if spread is not None and type(item) is Spool:
                for data in item.datasets():
                    if not await push(sink.wire(data)):
                        return False
            elif not await push(sink.encode(item)):
                return False
        return True

    failed = False
    done = 0
    if spread is None:
        replay = Replay(settings, CallableSink(pending.append), stats, window=window)
        for done, data in chunks(inputs, errors):
            replay.feed(data)
            progress.update(done, stats)
            if not await hand_over():
                break
        else:
            replay.finish()
            await hand_over()
        datasets, model = replay.datasets, replay.model
    else:
        try:
            for wait in spread.steps():
                if wait is not None:
                    await when_done(reactor, wait)
                if not await hand_over():
                    break
        except JobFailed as e:
            errors.append(str(e))
            failed = True
        finally:
            spread.stop()
            reactor.removeSystemEventTrigger(trigger)
        datasets, model, done = spread.leader.datasets, spread.leader.model, spread.done
    await sink.stopService()
    progress.done(done, None if failed else stats)
    if stats.queued and not failed:
        errors.append(f"{stats.queued} datasets were not delivered to the hub")
    status.append(_ended(errors, None if quiet or failed else stats, datasets, sys.stderr,
                         model=model))


def main(argv: Optional[List[str]] = None) -> None:
    """Console entry point."""
    options = ReplayOptions()
    parse_command_line(options, argv, "sfive-ngxlua-replay")
    settings = options.settings()
    files = options["files"]
    if settings.socket or settings.hub:
        sys.exit(run_to_hub(settings, files, options["quiet"], options.window, options.jobs))
    try:
        sys.exit(run(settings, files, options["quiet"], window=options.window,
                     jobs=options.jobs))
    except BrokenPipeError:
        sys.exit(1)
    except KeyboardInterrupt:
        sys.stderr.write("\nsfive-ngxlua-replay: interrupted\n")
        sys.exit(130)
