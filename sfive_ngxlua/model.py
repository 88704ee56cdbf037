"""The interval model: records in, finished wall-clock intervals out. Plain data, no I/O.

Interval k covers ``[k*D, (k+1)*D)`` in UTC epoch seconds. A record goes into the interval of its
own time. Interval k is due at ``(k+1)*D + grace``. Records older than the first interval are
dropped (counted as before-start); records for an interval already reported go into the oldest
open one (counted as late), so no accepted byte is lost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Set, Tuple

from .records import Record
from .settings import Settings, StreamerKey
from .stats import Stats

ClientKey = Tuple[str, str]
"""(ip, user agent)"""

OVERFLOW_CLIENT: ClientKey = ("*", "(other clients beyond --max-clients)")

FUTURE_HORIZON = 3600
"""Seconds a record may lie ahead of the reported intervals before it is refused."""


class Clients:
    """Bytes per client of one streamer in one interval, capped in size with exact totals."""

    __slots__ = ("bytes", "cap", "folded")

    def __init__(self, cap: int) -> None:
        self.bytes: Dict[ClientKey, int] = {}
        self.cap = cap
        self.folded: Optional[Set[int]] = None

    def add(self, key: ClientKey, sent: int) -> bool:
        """Add bytes for a client; return False if the client was folded into the overflow."""
        if key in self.bytes:
            self.bytes[key] += sent
            return True
        return self.add_new(key, sent)

    def add_new(self, key: ClientKey, sent: int) -> bool:
        """``add`` for a client not seen in this interval yet."""
        clients = self.bytes
        if len(clients) < self.cap:
            clients[key] = sent
            return True
        if self.folded is None:
            self.folded = set()
        self.folded.add(hash(key))
        clients[OVERFLOW_CLIENT] = clients.get(OVERFLOW_CLIENT, 0) + sent
        return False

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
            if self.folded is None:
                self.folded = set()
            self.folded |= other.folded - {hash(key) for key in clients}

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
        self._open: Dict[int, Dict[StreamerKey, Clients]] = {}
        self._cur_k: Optional[int] = None
        self._cur_streams: Dict[StreamerKey, Clients] = {}
        self.first: Optional[int] = None
        self.reported: Optional[int] = None
        self._live = False
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
        time, streamer, client, ua, sent = record
        k = time // self.duration
        streams = self._cur_streams if k == self._cur_k else self._streams_for(k)
        if streams is None:
            return False
        clients = streams.get(streamer)
        if clients is None:
            clients = streams[streamer] = Clients(self._cap)
        if len(ua) > self._ua_max:
            ua = ua[: self._ua_max]
        key = (client, ua)
        known = clients.bytes
        if key in known:
            known[key] += sent
        elif not clients.add_new(key, sent):
            self.stats.folded += 1
        self.stats.accepted += 1
        return True

    def _streams_for(self, k: int) -> Optional[Dict[StreamerKey, Clients]]:
        """The open table a record of interval k goes into (a late one: the oldest open one);
        None if the record is refused."""
        if self.reported is None:
            self.first = k
            self.reported = k - 1
        elif k <= self.reported:
            if k < self.first:
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
        out.append(self._close(target, max(0, int((now - target * self.duration) * 1000))))
        return out

    def _close(self, k: int, duration_ms: int) -> Interval:
        self._cur_k = None
        found = self._open.pop(k, {})
        streams = {s: found.get(s) or Clients(self._cap) for s in self.streamers}
        self.reported = k
        return Interval(k * self.duration, duration_ms, streams)

    @staticmethod
    def _merge(src: Dict[StreamerKey, Clients], dst: Dict[StreamerKey, Clients]) -> None:
        for streamer, clients in src.items():
            target = dst.get(streamer)
            if target is None:
                dst[streamer] = clients
                continue
            target.merge(clients)
