"""The interval model: records in, finished wall-clock intervals out. Plain data, no I/O.

Interval k covers ``[k*D, (k+1)*D)`` in UTC epoch seconds. A record goes into the interval of its
own time. Interval k is due at ``(k+1)*D + grace`` (the reporter passes the event-time
watermark as ``now``). Records older than the first interval are dropped (counted as
before-start; live, only those up to START_WINDOW older: a clock stepped back is no reason to
drop); records for an interval already reported go into the oldest open one (counted as late),
so no accepted byte is lost.

The model is plain data: ``snapshot()`` dumps it as JSON-able data, ``restore()`` makes it again
in another process (``StateMismatch`` if it was made under other settings), and
``take_changes()`` hands out only what changed since the last call, for incremental
checkpoints. Dirty tracking, on from the first of these calls, costs one set add per counted
record; a model nobody takes changes from (replay, a service without a state store) pays one
test of a local flag per record.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from operator import length_hint
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple

from .records import Record
from .settings import Settings, StreamerKey
from .stats import Stats

ClientKey = Tuple[str, str]
"""(ip, user agent)"""

OVERFLOW_CLIENT: ClientKey = ("*", "(other clients beyond --max-clients)")

FUTURE_HORIZON = 7200
"""Seconds a record may lie ahead of the reported intervals before it is refused: two hours,
so that a wall-clock step of an hour (NTP at boot) does not refuse the records after it."""

START_WINDOW = 120
"""A live model drops records from before its first interval (the service started within the
interval before it, which it cannot count whole) only if they are at most this many seconds
older than that interval; older ones come from a wall clock stepped back past the service's
start, and count as late (kept) instead."""

FORMAT = 1
"""The snapshot layout's version; ``restore`` refuses any other."""


def fold_hash(key: ClientKey) -> int:
    """A client's identity in an overflow entry's distinct count: the same in every process
    (unlike ``hash()``), so a saved count means the same after a restart. blake2b, 8 bytes,
    as a signed 64-bit integer (an SQLite INTEGER)."""
    ip, ua = key
    data = ip.encode("utf-8", "surrogatepass") + b"\0" + ua.encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big", signed=True)


def _counted(records: Iterable[Record], done: List[int]) -> Iterator[Record]:
    """``records``, counting in ``done[0]`` each one the consumer is done with (it asked for
    the next)."""
    for record in records:
        yield record
        done[0] += 1


class StateMismatch(Exception):
    """A snapshot made under other settings (or another format); the message says what differs."""


@dataclass
class Changes:
    """What changed in the model since the last ``take_changes()``/``snapshot()``/``restore()``.

    Applied to a replica in this order it gives the model's state: delete the ``dropped``
    intervals, upsert ``clients`` (k, streamer index, ip, user agent, bytes now), insert
    ``folded`` (k, streamer index, fold_hash); ``first``/``reported``/``live``/``coverage``
    are the values now. No client or folded row belongs to a dropped interval.
    """

    first: Optional[int]
    reported: Optional[int]
    live: bool
    coverage: Optional[Dict[str, Any]] = None
    clients: List[Tuple[int, int, str, str, int]] = field(default_factory=list)
    folded: List[Tuple[int, int, int]] = field(default_factory=list)
    dropped: List[int] = field(default_factory=list)


COVERED, PARTIAL, WITHHELD = "covered", "partial", "withheld"
"""An interval's coverage (README, "What is reported"): the source vouched for all of it; a
loss overlaps it or it was cut short; the source vouched for none of it (not reported)."""
MAX_SPANS = 64
"""Loss spans and given-up spans kept in the model (the oldest are merged or forgotten)."""


class Clients:
    """Bytes per client of one streamer in one interval, capped in size with exact totals.

    ``changed`` (clients whose bytes changed) and ``new_folded`` (fold hashes added) are what
    ``IntervalModel.take_changes`` hands out and then clears.
    """

    __slots__ = ("bytes", "cap", "folded", "changed", "new_folded")

    def __init__(self, cap: int) -> None:
        self.bytes: Dict[ClientKey, int] = {}
        self.cap = cap
        self.folded: Optional[Set[int]] = None
        self.changed: Set[ClientKey] = set()
        self.new_folded: List[int] = []

    def add(self, key: ClientKey, sent: int) -> bool:
        """Add bytes for a client; return False if the client was folded into the overflow."""
        if key in self.bytes:
            self.bytes[key] += sent
            self.changed.add(key)
            return True
        kept = self.add_new(key, sent)
        self.changed.add(key if kept else OVERFLOW_CLIENT)
        return kept

    def add_new(self, key: ClientKey, sent: int) -> bool:
        """``add`` for a client not seen in this interval yet (not marked as changed)."""
        clients = self.bytes
        if len(clients) < self.cap:
            clients[key] = sent
            return True
        self._fold(fold_hash(key))
        clients[OVERFLOW_CLIENT] = clients.get(OVERFLOW_CLIENT, 0) + sent
        return False

    def _fold(self, h: int) -> None:
        folded = self.folded
        if folded is None:
            folded = self.folded = set()
        if h not in folded:
            folded.add(h)
            self.new_folded.append(h)

    def merge(self, other: Clients) -> None:
        """Take in another interval's clients; each distinct client is still counted once,
        those the other one had folded into its overflow entry included."""
        for key, sent in other.bytes.items():
            if key != OVERFLOW_CLIENT:
                self.add(key, sent)
        if other.folded is not None:
            clients = self.bytes
            clients[OVERFLOW_CLIENT] = clients.get(OVERFLOW_CLIENT, 0) + other.bytes[
                OVERFLOW_CLIENT]
            self.changed.add(OVERFLOW_CLIENT)
            if self.folded is None:
                self.folded = set()
            here = {fold_hash(key) for key in clients} if other.folded else set()
            for h in other.folded:
                if h not in here:
                    self._fold(h)

    @property
    def count(self) -> int:
        """Distinct clients, those folded into the overflow entry included."""
        if self.folded is None:
            return len(self.bytes)
        return len(self.bytes) - 1 + len(self.folded)

    @property
    def total(self) -> int:
        return sum(self.bytes.values())


@dataclass
class Interval:
    """A finished interval: start (epoch seconds), length, and per configured streamer clients."""

    start: int
    duration_ms: int
    streams: Dict[StreamerKey, Clients]
    coverage: str = COVERED


class IntervalModel:
    """Aggregates records into intervals and hands out the ones that are due."""

    def __init__(self, settings: Settings, stats: Stats, start: Optional[float] = None) -> None:
        """``start``: when the live service started; None (replay) starts at the first record."""
        self.duration = settings.duration
        self.grace = settings.grace
        self.streamers = settings.streamers
        self.stats = stats
        self._cap = settings.max_clients
        self._ua_max = settings.max_ua_length
        self._index = {streamer: i for i, streamer in enumerate(self.streamers)}
        self._open: Dict[int, Dict[StreamerKey, Clients]] = {}
        self._dropped: List[int] = []
        self._tracking = False
        self.taken = 0
        """How many records the last ``add_records`` that raised took before it raised."""
        self._cur_k: Optional[int] = None
        self._cur_streams: Dict[StreamerKey, Clients] = {}
        self._cur_bounds: Tuple[int, int] = (0, 0)
        """The seconds [lo, hi) of the table ``_cur_k`` (none: empty)."""
        self.first: Optional[int] = None
        self.reported: Optional[int] = None
        self._live = False
        self.losses: List[List[float]] = []
        """Announced losses as [since, until] in event time (gap line, copytruncate, vanished
        file, ring change): the open intervals they overlap are partial."""
        self.withheld: Optional[List[int]] = None
        """[first k, last k] of the intervals withheld so far and still open (the front of
        the open ones): their records may yet arrive."""
        self.given_up: List[List[int]] = []
        """[first k, last k] spans of withheld intervals given up: their records are refused
        (``stats.records_withheld``), never counted as late into another interval."""
        if start is not None:
            self.begin(start)

    def begin(self, now: float) -> None:
        """The live service starts at ``now``: its first interval is the first full one after
        it. Without this (replay) the first record's interval is the first, and there is no
        limit on how far ahead a record may lie."""
        self.first = math.ceil(now / self.duration)
        self.reported = self.first - 1
        self._live = True

    def add(self, record: Record) -> bool:
        """Count one accepted record; False if it is refused (before start, too far ahead)."""
        stats = self.stats
        before = stats.accepted
        self.add_records((record,))
        return stats.accepted > before

    def add_records(self, records: Sequence[Record], due: float = math.inf) -> int:
        """Count records in order (the one way records come in: ``add`` is this for one).
        Stops after the first record whose time is at or past ``due`` (replay closes the
        intervals due then, before the next record) and returns how many it took. If it raises,
        ``taken`` is how many it took before the record that raised.

        Per record: two bound tests for the interval and ``due`` (the division only when the
        interval changes, the record that makes the next interval due counted alone), one
        look-up of the streamer's table, and of a known client a get and a set; the counts
        are the iterator's position, not a sum per record."""
        duration = self.duration
        cap = self._cap
        ua_max = self._ua_max
        tracking = self._tracking
        # a finite ``due`` as an integer (record times are whole seconds): an int compared
        # with a float of its size costs as much as the rest of the bound tests
        limit = due if due == math.inf or due == -math.inf else math.ceil(due)
        streams = self._cur_streams
        lo, hi = self._cur_bounds  # the current table's interval [lo, hi)
        top = hi if hi < limit else limit  # below: in the current table and not yet due
        refused = folded = raised = alone = 0
        broke = False
        done = None
        if type(records) is list or type(records) is tuple:
            n = len(records)
            it = iter(records)
        else:  # any other iterable: counted as it goes
            n, done = 0, [0]
            it = _counted(records, done)
        try:
            for time, streamer, client, ua, sent in it:
                if not lo <= time < top:
                    if time >= limit:  # the record that makes the next interval due: alone
                        self.add_records(((time, streamer, client, ua, sent),))
                        alone = 1
                        broke = True
                        break
                    if self._streams_for(time // duration) is None:
                        refused += 1
                        continue
                    streams = self._cur_streams  # a late record's: the oldest open one
                    lo, hi = self._cur_bounds
                    top = hi if hi < limit else limit
                try:
                    clients = streams[streamer]
                except KeyError:
                    clients = streams[streamer] = Clients(cap)
                if len(ua) > ua_max:
                    ua = ua[:ua_max]
                known = clients.bytes
                key = (client, ua)
                old = known.get(key)
                if old is not None:
                    known[key] = old + sent
                elif len(known) < cap:
                    known[key] = sent
                else:
                    clients.add_new(key, sent)
                    folded += 1
                    key = OVERFLOW_CLIENT
                if tracking:
                    clients.changed.add(key)
        except Exception:
            raised = 1
            raise
        finally:
            # a list's iterator knows how many it handed out (the one that raised too)
            taken = (n - length_hint(it) - raised if done is None else done[0] + broke)
            if raised:
                self.taken = taken
            stats = self.stats
            stats.accepted += taken - refused - alone  # the one alone counted itself
            stats.folded += folded
        return taken

    def _track(self) -> None:
        """From now on, record what changes (for ``take_changes``)."""
        self._tracking = True

    def _streams_for(self, k: int) -> Optional[Dict[StreamerKey, Clients]]:
        """The open table a record of interval k goes into (a late one: the oldest open one);
        None if the record is refused."""
        if self.reported is None:
            self.first = k
            self.reported = k - 1
        elif k <= self.reported:
            if self.given_up and self.is_given_up(k):
                self.stats.records_withheld += 1
                return None
            if k < self.first and (not self._live
                                   or (self.first - k - 1) * self.duration < START_WINDOW):
                self.stats.before_start += 1
                return None
            self.stats.late += 1
            k = self.reported + 1
        elif self._live and (k - self.reported) * self.duration > FUTURE_HORIZON + self.duration:
            self.stats.reject("future")
            return None
        streams = self._open.get(k)
        if streams is None:
            streams = self._open[k] = {}
        self._cur_k, self._cur_streams = k, streams
        self._cur_bounds = (k * self.duration, (k + 1) * self.duration)
        return streams

    @property
    def due_at(self) -> float:
        """When the next interval becomes due (infinity before the first record of a replay)."""
        if self.reported is None:
            return math.inf
        return (self.reported + 2) * self.duration + self.grace

    def due(self, now: float) -> int:
        """How many intervals are due at ``now``."""
        if self.reported is None:
            return 0
        last_due = int((now - self.grace) // self.duration) - 1
        return max(0, last_due - self.reported)

    def close_due(self, now: float) -> List[Interval]:
        """Finish every interval due at ``now`` (empty ones too), oldest first."""
        out = []
        for _ in range(self.due(now)):
            out.append(self._close(self.reported + 1, self.duration * 1000))
        return out

    def close_all(self, now: Optional[float] = None) -> List[Interval]:
        """Finish everything: at a stop (``now``), the running interval is cut short at ``now``;
        at the end of a replay (``now`` None), every interval up to the last record's."""
        if self.reported is None:
            return []
        if now is None:
            last = max(self._open, default=self.reported)
            full = self.duration * 1000
            return [self._close(k, full) for k in range(self.reported + 1, last + 1)]
        out = self.close_due(now)
        current = int(now // self.duration)
        target = max(current, self.reported + 1)
        if current < target and not self._open:
            return out
        for k in range(self.reported + 1, target):
            out.append(self._close(k, self.duration * 1000))
        for k in [k for k in self._open if k > target]:
            self._merge(self._open.pop(k), self._open.setdefault(target, {}))
            if self._tracking:
                self._dropped.append(k)
        out.append(self._close(target, max(0, int((now - target * self.duration) * 1000))))
        return out

    def _close(self, k: int, duration_ms: int) -> Interval:
        self._cur_k = None
        self._cur_bounds = (0, 0)
        found = self._open.pop(k, None)
        if found is None:
            found = {}
        elif self._tracking:
            self._dropped.append(k)
        streams = {s: found.get(s) or Clients(self._cap) for s in self.streamers}
        self.reported = k
        return Interval(k * self.duration, duration_ms, streams)

    @staticmethod
    def _merge(src: Dict[StreamerKey, Clients], dst: Dict[StreamerKey, Clients]) -> None:
        for streamer, clients in src.items():
            target = dst.get(streamer)
            if target is None:
                dst[streamer] = clients
                clients.changed = set(clients.bytes)
                clients.new_folded = list(clients.folded or ())
                continue
            target.merge(clients)

    @property
    def open_intervals(self) -> List[int]:
        """The open intervals' numbers k, oldest first."""
        return sorted(self._open)

    def entries(self, upto: Optional[int] = None) -> int:
        """Client entries held in open intervals (those up to interval ``upto`` only, if
        given): what the model's memory grows with."""
        return sum(len(c.bytes) for k, streams in self._open.items()
                   if upto is None or k <= upto for c in streams.values())

    # -- coverage -------------------------------------------------------------------------

    def lose(self, since: Optional[float], until: Optional[float]) -> None:
        """An announced loss of the records between ``since`` (None: not known, from the
        oldest open interval on) and ``until`` (event time; None: ``since``)."""
        if self.reported is None:
            return
        lo = (self.reported + 1) * self.duration
        since = lo if since is None else max(lo, since)
        until = since if until is None else until
        if until < since:
            return
        self.losses.append([since, until])
        if len(self.losses) > MAX_SPANS:
            a, b = self.losses.pop(0), self.losses[0]
            b[0], b[1] = min(a[0], b[0]), max(a[1], b[1])

    def lost(self, k: int) -> bool:
        """Whether an announced loss overlaps interval k."""
        lo, hi = k * self.duration, (k + 1) * self.duration
        return any(since < hi and until >= lo for since, until in self.losses)

    def lost_whole(self, k: int) -> bool:
        """Whether one announced loss spans all of interval k."""
        lo, hi = k * self.duration, (k + 1) * self.duration
        return any(since <= lo and until >= hi for since, until in self.losses)

    def give_up(self, k: int) -> None:
        """Interval k (closed, not reported) is given up as withheld."""
        spans = self.given_up
        if spans and spans[-1][1] + 1 >= k >= spans[-1][0]:
            spans[-1][1] = max(spans[-1][1], k)
        else:
            spans.append([k, k])
            del spans[:-MAX_SPANS]

    def has_records(self, k: int) -> bool:
        """Whether open interval k holds any record."""
        return bool(self._open.get(k))

    def is_given_up(self, k: int) -> bool:
        return any(a <= k <= b for a, b in self.given_up)

    def _prune_losses(self) -> None:
        if self.losses and self.reported is not None:
            lo = (self.reported + 1) * self.duration
            self.losses = [span for span in self.losses if span[1] >= lo]

    def coverage(self) -> Dict[str, Any]:
        """The coverage state as plain data (in snapshots and checkpoints)."""
        self._prune_losses()
        return {"losses": [list(s) for s in self.losses],
                "withheld": None if self.withheld is None else list(self.withheld),
                "given_up": [list(s) for s in self.given_up]}

    def restore_coverage(self, data: Any) -> None:
        """``coverage()``'s data back (None: a state saved before coverage was kept)."""
        if data is None:
            return
        self.losses = [[float(a), float(b)] for a, b in data.get("losses") or ()]
        withheld = data.get("withheld")
        self.withheld = None if withheld is None else [int(withheld[0]), int(withheld[1])]
        self.given_up = [[int(a), int(b)] for a, b in data.get("given_up") or ()]

    # -- the model as data ------------------------------------------------------------------

    def snapshot(self) -> Dict[str, Any]:
        """The whole state as JSON-able plain data, ``{"format", "duration", "streamers",
        "first", "reported", "live", "open": {k: {streamer index: {"clients": [[ip, ua,
        bytes], ...], "folded": [fold hash, ...]}}}}`` (an overflow entry is one of the
        clients; the distinct clients folded into it are its fold hashes), "coverage":
        ``coverage()``}; resets the change tracking, as a full checkpoint does."""
        index = self._index
        open_: Dict[str, Dict[str, Dict[str, list]]] = {}
        for k, streams in sorted(self._open.items()):
            entry = open_[str(k)] = {}
            for streamer, clients in streams.items():
                entry[str(index[streamer])] = {
                    "clients": [[ip, ua, sent] for (ip, ua), sent in clients.bytes.items()],
                    "folded": sorted(clients.folded) if clients.folded is not None else [],
                }
        self._forget_changes()
        self._track()
        return {
            "format": FORMAT,
            "duration": self.duration,
            "streamers": [list(s) for s in self.streamers],
            "first": self.first,
            "reported": self.reported,
            "live": self._live,
            "open": open_,
            "coverage": self.coverage(),
        }

    @classmethod
    def restore(cls, settings: Settings, stats: Stats, snapshot: Dict[str, Any]
                ) -> IntervalModel:
        """A model with a snapshot's state, under ``settings``; raises StateMismatch if the
        snapshot was made under another duration or other streamers, or is of another
        format (or no snapshot at all): a state that does not fit is never mixed in."""
        if not isinstance(snapshot, dict):
            raise StateMismatch(f"the saved state is not a snapshot ({type(snapshot).__name__})")
        fmt = snapshot.get("format")
        if fmt != FORMAT:
            raise StateMismatch(f"the saved state has format {fmt!r}; this version reads "
                                f"format {FORMAT}")
        if snapshot.get("duration") != settings.duration:
            raise StateMismatch(f"the saved state has intervals of {snapshot.get('duration')}s"
                                f", the settings {settings.duration}s")
        saved = [tuple(s) for s in snapshot.get("streamers") or ()]
        if saved != list(settings.streamers):
            def names(streamers: Any) -> str:
                return ", ".join("/".join(s) for s in streamers) or "none"
            raise StateMismatch(f"the saved state has the streamers {names(saved)}, the "
                                f"settings {names(settings.streamers)}")
        model = cls(settings, stats)
        try:
            first, reported = snapshot["first"], snapshot["reported"]
            model.first = None if first is None else int(first)
            model.reported = None if reported is None else int(reported)
            model._live = bool(snapshot["live"])
            for k, streams in snapshot["open"].items():
                table = model._open[int(k)] = {}
                for i, data in streams.items():
                    clients = Clients(model._cap)
                    clients.bytes = {(ip, ua): int(sent) for ip, ua, sent in data["clients"]}
                    if OVERFLOW_CLIENT in clients.bytes:
                        clients.folded = {int(h) for h in data.get("folded") or ()}
                    table[settings.streamers[int(i)]] = clients
            model.restore_coverage(snapshot.get("coverage"))
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            raise StateMismatch(f"the saved state is malformed ({type(e).__name__}: {e})"
                                ) from None
        model._track()
        return model

    def take_changes(self) -> Changes:
        """What changed since the last take_changes()/snapshot()/restore(): for an incremental
        checkpoint (only the clients whose bytes changed, the fold hashes added, the intervals
        closed or merged away). The first call on a model that was neither snapshot nor
        restored hands out everything it holds, and starts the tracking."""
        if not self._tracking:
            for streams in self._open.values():
                for clients in streams.values():
                    clients.changed = set(clients.bytes)
                    clients.new_folded = list(clients.folded or ())
            self._track()
        out = Changes(self.first, self.reported, self._live, self.coverage(),
                      dropped=self._dropped)
        self._dropped = []
        rows, folds = out.clients, out.folded
        index = self._index
        for k, streams in self._open.items():
            for streamer, clients in streams.items():
                changed = clients.changed
                if changed:
                    i = index[streamer]
                    sent = clients.bytes
                    rows.extend([(k, i, ip, ua, sent[(ip, ua)]) for ip, ua in changed])
                    clients.changed = set()
                if clients.new_folded:
                    i = index[streamer]
                    folds.extend([(k, i, h) for h in clients.new_folded])
                    clients.new_folded = []
        return out

    def _forget_changes(self) -> None:
        self._dropped = []
        for streams in self._open.values():
            for clients in streams.values():
                clients.changed = set()
                clients.new_folded = []
