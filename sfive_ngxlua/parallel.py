"""``sfive-ngxlua-replay --jobs N``: the input spread over processes, the datasets exactly those
of one process, in order.

The input is cut into units (a file; a byte range of a large uncompressed file, on line
boundaries). A worker replays a unit in two parts: its *head*, the lines until a record at
least ``HEAD_SECONDS`` past the unit's first record, which it hands back as bytes, and its
*body*, from that record on, which it replays itself with a model whose first and reported
interval are those the whole replay has there (provided what came before ends behind that
record). The leader keeps the one model of the whole replay: per unit, in order, it feeds the
head through it, checks that the worker's assumption holds, and merges the body's partial
intervals into its own; where it does not hold, or a merge would not be exact (folding at
``--max-clients`` in an interval both parts filled), it replays the body itself, in order.
The README ("Replay on every core") names each rule that depends on order and how it is kept.
"""

from __future__ import annotations

import gzip
import os
import shutil
import signal
import sys
import tempfile
from collections import deque
from dataclasses import dataclass, field
from typing import IO, Any, Deque, Dict, Iterator, List, Optional, Tuple

from .datasets import datasets, encode
from .lines import LineSplitter
from .model import OVERFLOW_CLIENT, Clients, Interval, IntervalModel
from .pipeline import Pipeline
from .records import Record, RecordParser
from .settings import Settings
from .stats import Stats

HEAD_SECONDS = 2.0
"""A unit's head spans this much record time (plus ``grace``): more than the lines of two
files or byte ranges interleave by (nginx's flush period), so that what came before a unit
ends behind its body's first record."""
HEAD_MAX = 32 << 20
"""A head longer than this (bytes) is not handed back: the leader replays the unit itself."""
UNIT_MIN = 8 << 20
UNIT_MAX = 128 << 20
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


@dataclass
class Result:
    """What a worker hands back for one unit."""

    index: int
    fallback: bool = False
    """The worker did not replay the body (the head is too long, or no record ends it)."""
    head: bytes = b""
    body_at: int = 0
    """Where the body starts (an offset in the file, decompressed for .gz)."""
    reported: Optional[int] = None
    """R_b: the interval reported before the body's first record, as the body assumed."""
    b1_time: int = 0
    """The body's first record's time."""
    boundary_k: Optional[int] = None
    """K_b: intervals up to this one may have lines from before the body (None: the unit is
    the input's first, replayed from the very start)."""
    boundary: List[Tuple[int, int, Dict[int, Any]]] = field(default_factory=list)
    """The body's closed intervals up to K_b, as (k, duration_ms, {streamer: clients})."""
    spool: Optional[str] = None
    spooled: int = 0
    end: Optional[Dict[str, Any]] = None
    """The body model's snapshot at the unit's end."""
    stats: Stats = field(default_factory=Stats)
    size: int = 0


class JobFailed(Exception):
    """A worker failed; the message says which unit and why."""


def units(files: List[str], jobs: int, unit_bytes: Optional[int] = None) -> List[Unit]:
    """The files cut into units: ``.gz`` and ``-`` whole, plain files in byte ranges of about
    ``unit_bytes`` (default: a few per job, within UNIT_MIN and UNIT_MAX)."""
    sizes = {f: os.path.getsize(f) for f in files if f != "-" and not f.endswith(".gz")}
    if unit_bytes is None:
        total = sum(sizes.values())
        unit_bytes = min(UNIT_MAX, max(UNIT_MIN, total // (2 * jobs) + 1))
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


def read_unit(unit: Unit, offset: Optional[int] = None) -> Iterator[bytes]:
    """The unit's bytes (from ``offset`` on, if given), in chunks; JobFailed if unreadable."""
    at = unit.start if offset is None else offset
    stream: Optional[IO[bytes]] = None
    try:
        if unit.name == "-":
            stream = sys.stdin.buffer
        elif unit.name.endswith(".gz"):
            stream = gzip.open(unit.name, "rb")
        else:
            stream = open(unit.name, "rb")
        if at:
            stream.seek(at)
        left = None if unit.end is None else unit.end - at
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


def first_interval(files: List[str], settings: Settings) -> Optional[int]:
    """The interval of the input's first record (read from at most FIRST_SCAN bytes, never
    from standard input): the replay's first interval, which every worker needs for the
    before-the-first-interval rule. None if not found there."""
    parser = RecordParser(settings)
    parser.repair_utf8 = True
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
                    return parsed.time // settings.duration
            if seen >= FIRST_SCAN:
                return None
        for line in splitter.feed(b"\n"):
            parsed = parser.parse(line)
            if type(parsed) is Record:
                return parsed.time // settings.duration
    return None


# -- the worker ----------------------------------------------------------------------------


_settings: Optional[Settings] = None
_spool_dir = ""
_first_k: Optional[int] = None


def _init(settings: Settings, spool_dir: str, first_k: Optional[int]) -> None:
    """In each worker: the leader handles SIGINT (and ends the workers)."""
    global _settings, _spool_dir, _first_k
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _settings, _spool_dir, _first_k = settings, spool_dir, first_k


def _clients_data(clients: Clients) -> Dict[str, list]:
    return {"clients": [[ip, ua, sent] for (ip, ua), sent in clients.bytes.items()],
            "folded": sorted(clients.folded) if clients.folded is not None else []}


def work(unit: Unit) -> Result:
    """Replay one unit (in a worker process)."""
    assert _settings is not None
    return _work(unit, _settings)


def _work(unit: Unit, settings: Settings) -> Result:
    result = Result(unit.index)
    chunks = read_unit(unit)
    if unit.index == 0:
        return _body(unit, settings, result, chunks, None, None, None)
    head: List[bytes] = []
    base = unit.start  # the unit's offset of data[0]
    limit = settings.max_line_length
    parser = RecordParser(settings)
    parser.repair_utf8 = True
    threshold: Optional[float] = None
    pending = b""
    for data in chunks:
        result.size += len(data)
        data = pending + data
        pos = 0
        while True:
            nl = data.find(b"\n", pos)
            if nl < 0:
                break
            line = data[pos:nl]
            if line.endswith(b"\r"):
                line = line[:-1]
            if line and len(line) <= limit:
                parsed = parser.parse(line)
                if type(parsed) is Record:
                    t = parsed.time
                    if threshold is None:
                        threshold = t + HEAD_SECONDS + settings.grace
                    elif t >= threshold:
                        head.append(data[:pos])
                        result.head = b"".join(head)
                        result.body_at = base + pos
                        return _start_body(unit, settings, result, parsed, data[pos:], chunks)
            pos = nl + 1
        head.append(data[:pos])
        base += pos
        pending = data[pos:]
        if base - unit.start > HEAD_MAX:
            result.head = b"".join(head)
            result.body_at = base
            result.fallback = True
            return result
    result.head = b"".join(head) + pending
    result.fallback = True  # no body: the head is the whole unit
    result.body_at = -1
    return result


def _start_body(unit: Unit, settings: Settings, result: Result, b1: Record, rest: bytes,
                chunks: Iterator[bytes]) -> Result:
    d = settings.duration
    k1 = b1.time // d
    first = _first_k
    reported = int((b1.time - settings.grace) // d) - 1
    if first is not None:
        reported = max(first - 1, reported)
    if first is None or k1 <= reported:
        result.fallback = True
        return result
    result.b1_time = b1.time
    result.size -= len(rest)  # counted again by _body

    def again() -> Iterator[bytes]:
        yield rest
        yield from chunks

    return _body(unit, settings, result, again(), first, reported, k1)


def _body(unit: Unit, settings: Settings, result: Result, chunks: Iterator[bytes],
          first: Optional[int], reported: Optional[int], boundary_k: Optional[int]) -> Result:
    stats = result.stats
    model = IntervalModel(settings, stats, start=None)
    if first is not None:
        model.first, model.reported = first, reported
    result.reported, result.boundary_k = reported, boundary_k
    fd, path = tempfile.mkstemp(prefix=f"unit{unit.index}-", dir=_spool_dir)
    result.spool = path
    index = {s: i for i, s in enumerate(settings.streamers)}
    with os.fdopen(fd, "wb") as spool:
        def closed(now: int) -> None:
            for interval in model.close_due(now):
                k = interval.start // settings.duration
                if boundary_k is not None and k <= boundary_k:
                    result.boundary.append((k, interval.duration_ms, {
                        index[s]: _clients_data(c) for s, c in interval.streams.items()}))
                    continue
                for dataset in datasets(interval, settings):
                    spool.write(encode(dataset))
                    result.spooled += 1

        pipeline = Pipeline(settings, stats, model, on_time=closed)
        pipeline.parser.repair_utf8 = True
        for data in chunks:
            result.size += len(data)
            pipeline.feed(data)
        pipeline.feed(b"\n")
    result.end = model.snapshot()
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


class Leader:
    """The one model of the whole replay, fed in order; emits encoded datasets to ``out``."""

    def __init__(self, settings: Settings, out: IO[bytes], stats: Stats) -> None:
        self.settings = settings
        self.out = out
        self.stats = stats
        self.datasets = 0
        self.model = IntervalModel(settings, stats, start=None)
        self.pipeline = Pipeline(settings, stats, self.model, on_time=self._time)
        self.pipeline.parser.repair_utf8 = True
        self.in_order = 0
        """Units (or bodies) the leader replayed itself."""

    def _emit(self, intervals: List[Interval]) -> None:
        for interval in intervals:
            for dataset in datasets(interval, self.settings):
                self.out.write(encode(dataset))
                self.datasets += 1
        self.out.flush()

    def _time(self, now: int) -> None:
        self._emit(self.model.close_due(now))

    def feed(self, data: bytes) -> None:
        self.pipeline.feed(data)

    def replay(self, unit: Unit, offset: Optional[int] = None) -> None:
        """Replay (the rest of) a unit here, in order."""
        self.in_order += 1
        for data in read_unit(unit, offset):
            self.feed(data)
        self.feed(b"\n")

    def take(self, unit: Unit, result: Result) -> None:
        """A worker's result for the next unit."""
        if result.boundary_k is None and not result.fallback:  # the first unit: exact
            self._spooled(result)
            self._restore(result.end)
            add_stats(self.stats, result.stats)
            return
        self.feed(result.head)
        if result.fallback:
            if result.body_at < 0:
                self.feed(b"\n")
            else:
                self.replay(unit, result.body_at)
            return
        merged = self._merge(result)
        if merged is None:
            self._discard(result)
            self.replay(unit, result.body_at)
            return
        closing, rest = merged
        if self.model.reported is not None:
            # what one process closes on reading the body's first record (which goes into a
            # later interval, so closing first changes nothing)
            self._emit(self.model.close_due(result.b1_time))
            if self.model.reported != result.reported:  # not expected; in order, then
                self._discard(result)
                self.replay(unit, result.body_at)
                return
        self._emit(closing)
        self._spooled(result)
        end = dict(result.end or {})
        open_ = dict(end.get("open") or {})
        for k, streams in rest.items():
            mine = open_.get(k, {})
            both = {}
            for i in set(streams) | set(mine):
                both[i] = merge_clients(streams.get(i), mine.get(i), self.settings.max_clients)
            open_[k] = both
        end["open"] = open_
        self._restore(end)
        add_stats(self.stats, result.stats)

    def _merge(self, result: Result) -> Optional[Tuple[List[Interval], Dict[str, Any]]]:
        """The body's boundary intervals with this model's: the closed ones as Intervals, the
        still open ones (as snapshot data); None if the body's assumption does not hold here
        or a merge would not be exact."""
        model = self.model
        assert result.reported is not None and result.boundary_k is not None
        if model.reported is not None and model.reported > result.reported:
            return None
        if any(k > result.boundary_k for k in model.open_intervals):
            return None
        mine = model.snapshot()["open"] if model.reported is not None else {}
        mine = {k: v for k, v in mine.items() if int(k) > result.reported}
        cap = self.settings.max_clients
        closing = []
        for k, duration_ms, streams in result.boundary:
            there = mine.pop(str(k), {})
            table = {}
            for i, streamer in enumerate(self.settings.streamers):
                both = merge_clients(there.get(str(i)), streams.get(i), cap)
                if both is None:
                    return None
                clients = Clients(cap)
                clients.bytes = {(ip, ua): sent for ip, ua, sent in both["clients"]}
                table[streamer] = clients
            closing.append(Interval(k * self.settings.duration, duration_ms, table))
        end_open = (result.end or {}).get("open") or {}
        for k, streams in mine.items():
            for i, data in streams.items():
                if merge_clients(data, end_open.get(k, {}).get(i), cap) is None:
                    return None
        return closing, mine

    def _restore(self, snapshot: Optional[Dict[str, Any]]) -> None:
        if snapshot is None or snapshot.get("reported") is None:
            return
        self.model = IntervalModel.restore(self.settings, self.stats, snapshot)
        self.pipeline.model = self.model

    def _spooled(self, result: Result) -> None:
        if result.spool is None:
            return
        with open(result.spool, "rb") as f:
            shutil.copyfileobj(f, self.out)
        self.out.flush()
        self.datasets += result.spooled
        os.unlink(result.spool)

    @staticmethod
    def _discard(result: Result) -> None:
        if result.spool is not None:
            os.unlink(result.spool)

    def finish(self) -> None:
        self.feed(b"\n")
        self._emit(self.model.close_all())


def run_jobs(settings: Settings, files: List[str], jobs: int, out: IO[bytes],
             progress: Any, stats: Stats, unit_bytes: Optional[int] = None) -> Leader:
    """Replay ``files`` on ``jobs`` processes into ``out``; raises JobFailed (a worker's
    error) or KeyboardInterrupt (the workers are ended first)."""
    todo = units(files, jobs, unit_bytes)
    leader = Leader(settings, out, stats)
    if len(todo) < 2 or jobs < 2:  # nothing to spread: no workers to start
        for unit in todo:
            leader.replay(unit)
            progress.update(unit.end or 0, stats)
        leader.finish()
        return leader
    import multiprocessing  # here: a replay on one unit starts without them
    from concurrent.futures import Future, ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    first_k = first_interval(files, settings)
    spool_dir = tempfile.mkdtemp(prefix="sfive-replay-")
    # fork: the workers start at once with the settings and modules already loaded (replay
    # runs no threads before it); forkserver would import everything again in each worker.
    context = multiprocessing.get_context("fork")
    pool = ProcessPoolExecutor(jobs, mp_context=context, initializer=_init,
                               initargs=(settings, spool_dir, first_k))
    window: Deque[Tuple[Unit, Optional[Future[Result]]]] = deque()
    pending = iter(todo)
    done = 0
    try:
        while True:
            while len(window) < 2 * jobs:  # bounded: at most two results per job wait
                unit = next(pending, None)
                if unit is None:
                    break
                local = unit.name == "-" or first_k is None
                window.append((unit, None if local else pool.submit(work, unit)))
            if not window:
                break
            unit, future = window.popleft()
            if future is None:
                leader.replay(unit)
            else:
                try:
                    result = future.result()
                except BrokenProcessPool:
                    raise JobFailed(f"a worker process died while replaying {unit.name}"
                                    ) from None
                done += result.size
                leader.take(unit, result)
            progress.update(done, stats)
        leader.finish()
    except BaseException:
        for child in multiprocessing.active_children():
            child.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    else:
        pool.shutdown(wait=True)
    finally:
        shutil.rmtree(spool_dir, ignore_errors=True)
    return leader
