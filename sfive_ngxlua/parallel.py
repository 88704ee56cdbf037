"""``sfive-ngxlua-replay --jobs N``: the input spread over processes, the datasets exactly those
of one process, in order.

The input is cut into units (a file; a byte range of a large uncompressed file, on line
boundaries). A worker reads a whole unit through the pipeline. The records of its *head*, up to
one at least ``HEAD_SECONDS`` (plus grace) past the unit's first, it hands back as they are;
from that record on, its *body*, it counts them itself, with a model whose first and last
reported interval are those one process has there if what came before ends behind that record.
The leader (this process) keeps the one model of the whole replay: per unit, in order, it adds
the head's records, checks the body's assumption, merges the body's partial intervals into its
own and copies the body's finished datasets; where the check or a merge fails, it replays the
rest of the unit itself. Only the leader writes or sends datasets.

The rules that depend on order, and what each forces (the README, "Replay on every core", has
the long account):

- late records go into the oldest open interval: the head is counted in order, and a body
  only where the leader's last reported interval is the one it assumed;
- which clients are folded at ``--max-clients``: an interval both the leader and a body filled
  is merged only if neither folded and together they stay within the cap;
- a far-future record makes every later record late: the check fails for each later unit,
  replayed in order;
- the first interval and a window's coverage come from the input's first record, read here
  before the workers start; a window's before/after counts add up, its last record is the
  latest of all;
- the hub's pace: the leader hands each dataset over as one process would (``replay._to_hub``).
"""

from __future__ import annotations

import gzip
import math
import os
import shutil
import signal
import sys
import tempfile
from collections import deque
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Deque, Dict, Iterator, List, Optional, Sequence, Tuple

from .datasets import JsonLinesWriter, datasets, encode
from .lines import LineSplitter
from .model import OVERFLOW_CLIENT, Clients, Interval, IntervalModel
from .pipeline import Pipeline
from .records import Record, RecordParser
from .replay import Replay, Window, WindowCounts, WindowModel, replay_model
from .settings import Settings
from .stats import Stats

HEAD_SECONDS = 2.0
"""A unit's head spans this much record time (plus ``grace``): more than the lines of two
files or byte ranges interleave by (nginx's flush period), so that what came before a unit
ends behind its body's first record."""
HEAD_RECORDS = 100_000
"""A head of more records than this is not handed back: the leader replays the unit itself."""
UNIT_MIN = 2 << 20
"""Plain files are not cut into byte ranges smaller than this."""
UNIT_MAX = 128 << 20
"""Nor into ranges larger than this (a worker's spool file and a unit's share of the end)."""
FIRST_SCAN = 8 << 20
"""How far the leader reads into the input for its first record (the replay's first interval);
none there: the replay runs in one process."""
READ = 1 << 20


@dataclass(frozen=True)
class Unit:
    """A piece of the input: ``name`` from byte ``start`` to ``end`` (None: to its end)."""

    index: int
    name: str
    start: int = 0
    end: Optional[int] = None


@dataclass(frozen=True)
class Plan:
    """What a parallel replay needs before it starts: the units, and the input's first
    record's time (every worker's model starts from it)."""

    units: List[Unit]
    first_time: int
    size: Optional[int]
    """The plain files' bytes (for the progress line's share; None: not known)."""


@dataclass
class Result:
    """What a worker hands back for one unit."""

    index: int
    complete: bool = True
    """False: the worker gave up (the head holds more than HEAD_RECORDS records)."""
    head: List[Record] = field(default_factory=list)
    """The head's records, past --client-ip, for the leader to add in order."""
    body: bool = False
    """Whether a body follows (False: the head is the whole unit)."""
    reported: Optional[int] = None
    """R_b: the interval reported before the body's first record, as the body assumed."""
    first_time: int = 0
    """The body's first record's time."""
    boundary_k: Optional[int] = None
    """K_b: intervals up to this one may have records from before the body (None: the unit is
    the input's first, replayed from the very start)."""
    boundary: List[Tuple[int, int, Dict[int, Any]]] = field(default_factory=list)
    """The body's closed intervals up to K_b, as (k, duration_ms, {streamer: clients})."""
    spool: Optional[str] = None
    spooled: int = 0
    end: Optional[Dict[str, Any]] = None
    """The body model's snapshot at the unit's end."""
    window: Optional[WindowCounts] = None
    """With a window, the body model's counts (WindowModel.counts)."""
    stats: Stats = field(default_factory=Stats)
    size: int = 0


class JobFailed(Exception):
    """A worker failed; the message says which unit and why."""


def units(files: List[str], jobs: int, unit_bytes: Optional[int] = None) -> List[Unit]:
    """The files cut into units: ``.gz`` and ``-`` whole, plain files in byte ranges of about
    ``unit_bytes``. By default as few as can be, in a multiple of ``jobs`` (each job's share
    the same; each unit costs the leader a merge, and every unit but the first a head),
    within UNIT_MIN and UNIT_MAX."""
    sizes = {f: os.path.getsize(f) for f in files if f != "-" and not f.endswith(".gz")}
    if unit_bytes is None:
        total = sum(sizes.values())
        n = jobs * max(1, -(-total // (jobs * UNIT_MAX)))
        unit_bytes = max(UNIT_MIN, -(-total // n))
    out: List[Unit] = []
    for name in files:
        size = sizes.get(name)
        if size is None or size <= unit_bytes:
            out.append(Unit(len(out), name))
            continue
        with open(name, "rb") as f:
            start = 0
            while start < size:
                cut = start + unit_bytes
                if cut >= size:
                    out.append(Unit(len(out), name, start, None))
                    break
                f.seek(cut)
                rest = f.readline()  # to the next line boundary
                cut += len(rest)
                out.append(Unit(len(out), name, start, None if cut >= size else cut))
                start = cut
    return out


def read_unit(unit: Unit) -> Iterator[bytes]:
    """The unit's bytes, in chunks; JobFailed if unreadable."""
    stream: Optional[IO[bytes]] = None
    try:
        if unit.name == "-":
            stream = sys.stdin.buffer
        elif unit.name.endswith(".gz"):
            stream = gzip.open(unit.name, "rb")
        else:
            stream = open(unit.name, "rb")
        if unit.start:
            stream.seek(unit.start)
        left = None if unit.end is None else unit.end - unit.start
        while left is None or left > 0:
            data = stream.read(READ if left is None else min(READ, left))
            if not data:
                break
            if left is not None:
                left -= len(data)
            yield data
    except (OSError, EOFError, ValueError) as e:
        raise JobFailed(f"error reading {unit.name}: {e}") from None
    finally:
        if stream is not None and stream is not sys.stdin.buffer:
            stream.close()


def first_time(files: List[str], settings: Settings) -> Optional[int]:
    """The time of the input's first record (read from at most FIRST_SCAN bytes, never from
    standard input): where the replay's first interval and a window's coverage start, which
    every worker needs. None if not found there."""
    parser = RecordParser(settings, repair_utf8=True)
    splitter = LineSplitter(settings.max_line_length)
    seen = 0
    for name in files:
        if name == "-":
            return None
        for data in read_unit(Unit(0, name)):
            seen += len(data)
            for line in splitter.feed(data):
                parsed = parser.parse(line)
                if type(parsed) is Record:
                    return parsed.time
            if seen >= FIRST_SCAN:
                return None
        for line in splitter.feed(b"\n"):
            parsed = parser.parse(line)
            if type(parsed) is Record:
                return parsed.time
    return None


def plan(settings: Settings, files: List[str], jobs: int, window: Optional[Window] = None,
         unit_bytes: Optional[int] = None) -> Optional[Plan]:
    """The plan of a replay on ``jobs`` processes; None if one process should replay: fewer
    than two units, no first record found, or (with ``--until`` but no ``--from``) the first
    record after the window (the first interval is then the first record's inside it)."""
    todo = units(files, jobs, unit_bytes)
    if len(todo) < 2:
        return None
    t0 = first_time(files, settings)
    if t0 is None or (window is not None and window[0] is None and t0 >= (window[1] or 0)):
        return None
    try:
        size = sum(os.path.getsize(f) for f in files if f != "-" and not f.endswith(".gz"))
    except OSError:
        size = 0
    return Plan(todo, t0, size or None)


def start_model(settings: Settings, stats: Stats, window: Optional[Window], t0: int
                ) -> IntervalModel:
    """The replay's model as one process has it once it has read the input's first record
    (at ``t0``), without that record's bytes: where every body starts."""
    model = replay_model(settings, stats, window)
    if isinstance(model, WindowModel):
        model.begins_at(t0)
    if model.reported is None:
        model.first = t0 // settings.duration
        model.reported = model.first - 1
    return model


# -- the front of a unit ---------------------------------------------------------------------


class Front:
    """A pipeline's model over the front of a unit: it keeps the records (``kept``, unless
    ``keep`` is false) instead of counting them, up to the record ``end`` finds in a batch;
    that record and all after it go to the model ``begin(its time)`` gives, which becomes the
    pipeline's. Nothing becomes due while it keeps records. (It goes where the pipeline puts
    its records, past --client-ip, so that what it keeps is what the model would count.)"""

    taken = 0

    def __init__(self, pipeline: Pipeline, end: Callable[[Sequence[Record]], Optional[int]],
                 begin: Callable[[int], IntervalModel], keep: bool = True) -> None:
        self.pipeline = pipeline
        self.end = end
        self.begin = begin
        self.kept: Optional[List[Record]] = [] if keep else None
        self.model: Optional[IntervalModel] = None
        pipeline.model = self  # type: ignore[assignment]

    @property
    def reported(self) -> Optional[int]:
        return 0 if self.model is None else self.model.reported

    @property
    def due_at(self) -> float:
        return math.inf if self.model is None else self.model.due_at

    def add_records(self, records: Sequence[Record], due: float = math.inf) -> int:
        if self.model is not None:  # the pipeline's batch in which the front ended
            return self.model.add_records(records, due)
        at = self.end(records)
        if self.kept is not None:
            self.kept.extend(records if at is None else records[:at])
        if at is None:
            return len(records)
        self.model = self.begin(records[at][0])
        self.pipeline.model = self.model
        return at  # the pipeline goes on with the rest at the model's due time

    def lose(self, since: Optional[float], until: Optional[float]) -> None:
        """An exporter gap in the front: its loss spans, like its log line, show nowhere in a
        replay (the lines and records it lost are counted all the same)."""
        if self.model is not None:
            self.model.lose(since, until)


class _Head:
    """A worker's ``Front.end``: the head ends at the first record at least ``seconds`` past
    the unit's first; ``full`` once it passes ``limit`` records (the worker gives up)."""

    def __init__(self, seconds: float, limit: int) -> None:
        self.seconds = seconds
        self.limit = limit
        self.until: Optional[float] = None
        self.n = 0
        self.full = False

    def __call__(self, records: Sequence[Record]) -> Optional[int]:
        if self.until is None:
            self.until = records[0][0] + self.seconds
        until = self.until
        at = next((i for i, record in enumerate(records) if record[0] >= until), None)
        self.n += len(records) if at is None else at
        if self.n > self.limit:
            self.full = True
            return None
        return at


class _Count:
    """The leader's ``Front.end`` for a unit it replays after adding its head: the front is
    the first ``n`` records (counted already)."""

    def __init__(self, n: int) -> None:
        self.left = n

    def __call__(self, records: Sequence[Record]) -> Optional[int]:
        if self.left >= len(records):
            self.left -= len(records)
            return None
        at, self.left = self.left, 0
        return at


# -- the worker ----------------------------------------------------------------------------


_worker: Optional[_Worker] = None


def _init(settings: Settings, spool_dir: str, t0: int, window: Optional[Window]) -> None:
    """In each worker (forked): the leader handles SIGINT and ends the workers with SIGTERM
    (the handlers and wake-up descriptor of a running reactor, inherited, are not theirs)."""
    global _worker
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked by ``Jobs.start``
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.set_wakeup_fd(-1)
    _worker = _Worker(settings, spool_dir, t0, window)


def work(unit: Unit) -> Result:
    """Replay one unit (in a worker process)."""
    assert _worker is not None
    return _worker.work(unit)


def _clients_data(clients: Clients) -> Dict[str, list]:
    return {"clients": [[ip, ua, sent] for (ip, ua), sent in clients.bytes.items()],
            "folded": sorted(clients.folded) if clients.folded is not None else []}


def _clients(data: Dict[str, list], cap: int) -> Clients:
    """``_clients_data`` back (the clients folded into an overflow entry too: its count)."""
    clients = Clients(cap)
    clients.bytes = {(ip, ua): sent for ip, ua, sent in data["clients"]}
    if OVERFLOW_CLIENT in clients.bytes:
        clients.folded = set(data["folded"])
    return clients


class _Worker:
    """What a worker knows of the whole replay: the settings, the window, the input's first
    record's time; where it spools finished datasets."""

    def __init__(self, settings: Settings, spool_dir: str, t0: int,
                 window: Optional[Window]) -> None:
        self.settings = settings
        self.spool_dir = spool_dir
        self.t0 = t0
        self.window = window
        self.index = {s: i for i, s in enumerate(settings.streamers)}

    def work(self, unit: Unit) -> Result:
        settings = self.settings
        result = Result(unit.index)
        stats = result.stats
        d = settings.duration
        fd, result.spool = tempfile.mkstemp(prefix=f"unit{unit.index}-", dir=self.spool_dir)
        with os.fdopen(fd, "wb") as spool:
            def closed(now: int) -> None:
                index = self.index
                for interval in pipeline.model.close_due(now):
                    k = interval.start // d
                    if result.boundary_k is not None and k <= result.boundary_k:
                        result.boundary.append((k, interval.duration_ms, {
                            index[s]: _clients_data(c) for s, c in interval.streams.items()}))
                        continue
                    for dataset in datasets(interval, settings):
                        spool.write(encode(dataset))
                        result.spooled += 1

            def begin(time: int) -> IntervalModel:
                body = start_model(settings, stats, self.window, self.t0)
                body.reported += body.due(time)
                result.body, result.reported, result.first_time = True, body.reported, time
                result.boundary_k = max(time // d, body.reported)
                return body

            pipeline = Pipeline(settings, stats, None, on_time=closed,  # type: ignore[arg-type]
                                repair_utf8=True)
            head = front = None
            if unit.index == 0:  # the input's start: one process's model, from scratch
                pipeline.model = replay_model(settings, stats, self.window)
                result.body = True
            else:
                head = _Head(HEAD_SECONDS + settings.grace, HEAD_RECORDS)
                front = Front(pipeline, head, begin)
            for data in read_unit(unit):
                result.size += len(data)
                pipeline.feed(data)
                if head is not None and head.full:
                    result.complete = False
                    break
            else:
                pipeline.feed(b"\n")
        if front is not None:
            result.head = front.kept or []
        if not result.complete or not result.body:
            os.unlink(result.spool)
            result.spool, result.spooled = None, 0
            if not result.complete:
                result.head = []
            return result
        model = pipeline.model
        result.end = model.snapshot()
        if isinstance(model, WindowModel):
            result.window = model.counts()
        return result


# -- the leader ----------------------------------------------------------------------------


def add_stats(total: Stats, part: Stats) -> None:
    """Add a unit's counters (those the summary reads) to the whole replay's."""
    total.lines += part.lines
    total.accepted += part.accepted
    total.rejected.update(part.rejected)
    total.late += part.late
    total.before_start += part.before_start
    total.lost += part.lost
    total.folded += part.folded
    total.heartbeats += part.heartbeats


def merge_clients(a: Optional[Dict[str, list]], b: Optional[Dict[str, list]], cap: int
                  ) -> Optional[Dict[str, list]]:
    """One interval's clients of a streamer from lines before (``a``) and after (``b``), as
    one process would have them; None if that is not exact (either folded clients at
    ``--max-clients``, or together they pass it: which are folded depends on the order)."""
    if a is None or b is None:
        return a if b is None else b
    out: Dict[Tuple[str, str], int] = {(ip, ua): sent for ip, ua, sent in a["clients"]}
    for ip, ua, sent in b["clients"]:
        out[(ip, ua)] = out.get((ip, ua), 0) + sent
    if len(out) > cap or OVERFLOW_CLIENT in out:  # folded on either side, or now
        return None
    return {"clients": [[ip, ua, sent] for (ip, ua), sent in out.items()], "folded": []}


class StreamOutput(JsonLinesWriter):
    """The leader's output to standard output (or ``stream``): its own datasets as they come,
    a worker's spooled ones copied."""

    def __init__(self, stream: Optional[IO[bytes]] = None) -> None:
        super().__init__(Stats(), stream)

    def spooled(self, path: str, n: int) -> None:
        with open(path, "rb") as f:
            shutil.copyfileobj(f, self.stream)
        self.stream.flush()
        os.unlink(path)


@dataclass(frozen=True)
class Spool:
    """A worker's finished datasets in their wire form, one a line, waiting in a file."""

    path: str

    def datasets(self) -> Iterator[bytes]:
        """Each dataset's wire form, in order; the file goes once they are read."""
        with open(self.path, "rb") as f:
            yield from f
        os.unlink(self.path)


class Queued:
    """The leader's output to the hub: datasets and Spools queued in order in ``pending``, for
    replay's hand-over (which sends them at the hub's pace)."""

    def __init__(self, pending: Deque[Any]) -> None:
        self.pending = pending

    def deliver(self, dataset: Dict[str, Any]) -> None:
        self.pending.append(dataset)

    def spooled(self, path: str, n: int) -> None:
        self.pending.append(Spool(path))


class Leader:
    """The one model of the whole replay (a Replay on ``output``), fed in order."""

    def __init__(self, settings: Settings, output: Any, stats: Stats,
                 window: Optional[Window] = None) -> None:
        self.settings = settings
        self.output = output
        self.stats = stats
        self.replay = Replay(settings, output, stats, window)
        self.in_order = 0
        """Units the leader replayed itself (wholly or after their head)."""
        self.merged = 0
        """Units whose bodies were merged."""

    @property
    def model(self) -> IntervalModel:
        return self.replay.model

    @property
    def datasets(self) -> int:
        return self.replay.datasets

    def replay_unit(self, unit: Unit, skip: int = 0) -> Iterator[int]:
        """Replay a unit here, in order (its first ``skip`` records counted already); yields
        the bytes of each chunk read."""
        self.in_order += 1
        replay = self.replay
        if skip:
            Front(replay.pipeline, _Count(skip), lambda _time: replay.model, keep=False)
        for data in read_unit(unit):
            replay.feed(data)
            yield len(data)
        replay.feed(b"\n")
        replay.pipeline.model = replay.model

    def take(self, unit: Unit, result: Result) -> Iterator[int]:
        """A worker's result for the next unit (yields as ``replay_unit`` where it replays)."""
        if not result.complete:
            yield from self.replay_unit(unit)
            return
        replay = self.replay
        if result.index == 0:  # the input's start, from scratch: nothing came before
            merged: Optional[Tuple[List[Interval], Dict[str, Any]]] = [], {}
        else:
            replay.pipeline.add_records(result.head)
            if not result.body:  # the whole unit was head: counted in order
                add_stats(self.stats, result.stats)
                return
            # what one process closes on reading the body's first record (which goes into a
            # later interval, so closing first changes nothing)
            replay.emit(self.model.close_due(result.first_time))
            merged = self._merge(result)
        if merged is None:
            os.unlink(result.spool)  # type: ignore[arg-type]
            yield from self.replay_unit(unit, len(result.head))
            return
        closing, rest = merged
        replay.emit(closing)
        if result.spooled:
            self.output.spooled(result.spool, result.spooled)
            replay.datasets += result.spooled
        else:
            os.unlink(result.spool)  # type: ignore[arg-type]
        self._adopt(result, rest)
        add_stats(self.stats, result.stats)
        self.merged += 1

    def _merge(self, result: Result) -> Optional[Tuple[List[Interval], Dict[str, Any]]]:
        """The body's boundary intervals with this model's: the closed ones as Intervals, the
        still open ones (as snapshot data); None if the body's assumption does not hold here
        or a merge would not be exact."""
        assert result.boundary_k is not None
        model = self.model
        if model.reported != result.reported or any(
                k > result.boundary_k for k in model.open_intervals):
            return None
        mine = model.snapshot()["open"]
        cap = self.settings.max_clients
        closing = []
        for k, duration_ms, streams in result.boundary:
            there = mine.pop(str(k), {})
            table = {}
            for i, streamer in enumerate(self.settings.streamers):
                both = merge_clients(there.get(str(i)), streams.get(i), cap)
                if both is None:
                    return None
                table[streamer] = _clients(both, cap)
            closing.append(Interval(k * self.settings.duration, duration_ms, table))
        end_open = (result.end or {}).get("open") or {}
        for k, streams in mine.items():
            for i, data in streams.items():
                if merge_clients(data, end_open.get(k, {}).get(i), cap) is None:
                    return None
        return closing, mine

    def _adopt(self, result: Result, rest: Dict[str, Any]) -> None:
        """Go on with the body's model at the unit's end, this model's open intervals the body
        did not close (``rest``) merged in."""
        end = dict(result.end or {})
        open_ = dict(end.get("open") or {})
        for k, streams in rest.items():
            mine = open_.get(k, {})
            open_[k] = {i: merge_clients(streams.get(i), mine.get(i), self.settings.max_clients)
                        for i in set(streams) | set(mine)}
        end["open"] = open_
        model = self.model
        if isinstance(model, WindowModel):
            assert result.window is not None
            adopted: IntervalModel = model.resumed(self.settings, end, result.window)
        else:
            adopted = IntervalModel.restore(self.settings, self.stats, end)
        self.replay.adopt(adopted)

    def finish(self) -> None:
        self.replay.finish()


def when_done(reactor: Any, future: Any) -> Any:
    """A Deferred that fires (in the reactor's thread) once ``future`` is done."""
    from twisted.internet.defer import Deferred

    d: Deferred = Deferred()
    future.add_done_callback(lambda _f: reactor.callFromThread(d.callback, None))
    return d


class Jobs:
    """A replay on ``jobs`` processes: the workers (forked by ``start``) replay units, the
    leader takes their results in order. ``steps`` runs it, yielding after each step (so that
    the hub's hand-over can run) and, before it waits for a worker, the worker's Future (so
    that a reactor can wait for it instead); ``run`` runs it to the end in one go. Raises
    JobFailed (a worker's error) or what interrupted it (the workers are ended first)."""

    def __init__(self, settings: Settings, plan: Plan, jobs: int, output: Any, stats: Stats,
                 window: Optional[Window] = None, progress: Any = None) -> None:
        self.settings = settings
        self.plan = plan
        self.jobs = jobs
        self.stats = stats
        self.window = window
        self.progress = progress
        self.leader = Leader(settings, output, stats, window)
        self.pool: Any = None
        self.spool_dir = ""
        self.done = 0
        """Bytes read so far (as the progress line counts them)."""

    def start(self) -> None:
        """Fork the workers (once)."""
        if self.pool is not None:
            return
        import multiprocessing  # here: a replay in one process starts without them
        from concurrent.futures import ProcessPoolExecutor

        self.spool_dir = tempfile.mkdtemp(prefix="sfive-replay-")
        # fork: the workers start at once with the settings and modules already loaded (replay
        # runs no threads before it); forkserver would import everything again in each worker.
        context = multiprocessing.get_context("fork")
        self.pool = ProcessPoolExecutor(self.jobs, mp_context=context, initializer=_init,
                                        initargs=(self.settings, self.spool_dir,
                                                  self.plan.first_time, self.window))
        # a fork context forks every worker at the first submit; Ctrl-C waits until it is
        # done (else it may strike in an at-fork hook, which ignores it, or a worker before
        # it ignores it)
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            self.pool.submit(int)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def run(self) -> None:
        for _ in self.steps():
            pass

    def steps(self) -> Iterator[Any]:
        from concurrent.futures.process import BrokenProcessPool

        self.start()
        leader = self.leader
        ahead: Deque[Tuple[Unit, Any]] = deque()
        pending = iter(self.plan.units)
        unit = self.plan.units[0]  # the one the leader waits for
        try:
            while True:
                while len(ahead) < 2 * self.jobs:  # bounded: at most two results per job wait
                    more = next(pending, None)
                    if more is None:
                        break
                    ahead.append((more, None if more.name == "-" else
                                  self.pool.submit(work, more)))
                if not ahead:
                    break
                unit, future = ahead.popleft()
                if future is None:
                    steps = leader.replay_unit(unit)
                else:
                    if not future.done():
                        yield future
                    result = future.result()
                    steps = leader.take(unit, result)
                replayed = False
                for n in steps:  # replayed here, in order
                    self.done += n
                    replayed = True
                    self._progress()
                    yield None
                if future is not None and not replayed:
                    self.done += result.size
                self._progress()
                yield None
            leader.finish()
            yield None
        except BrokenProcessPool:
            self.stop()
            raise JobFailed(f"a worker process died while replaying {unit.name}") from None
        except BaseException:
            self.stop()
            raise
        self.pool.shutdown(wait=True)
        self.pool = None
        shutil.rmtree(self.spool_dir, ignore_errors=True)

    def _progress(self) -> None:
        if self.progress is not None:
            self.progress.update(self.done, self.stats)

    def stop(self) -> None:
        """End the workers at once (an interrupt, an error); idempotent."""
        if self.pool is not None:
            import multiprocessing

            for child in multiprocessing.active_children():
                child.terminate()
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None
        if self.spool_dir:
            shutil.rmtree(self.spool_dir, ignore_errors=True)


def run_jobs(settings: Settings, files: List[str], jobs: int, out: IO[bytes], progress: Any,
             stats: Stats, unit_bytes: Optional[int] = None, window: Optional[Window] = None
             ) -> Leader:
    """Replay ``files`` on ``jobs`` processes into ``out`` (in this process where there is
    nothing to spread); the leader, for its figures."""
    found = plan(settings, files, jobs, window, unit_bytes)
    if found is None:
        leader = Leader(settings, StreamOutput(out), stats, window)
        for i, name in enumerate(files):
            for _ in leader.replay_unit(Unit(i, name)):
                pass
        leader.finish()
        return leader
    spread = Jobs(settings, found, jobs, StreamOutput(out), stats, window, progress)
    spread.run()
    return spread.leader
