"""Intervals to sfive version-1 datasets, and their encoding (one JSON object per line).

A closed interval's datasets are first ``Prepared``: the envelope's fields and the clients
ranked, as columns. The sinks that send bytes (standard output, the hub's) encode that directly,
the whole client list with one template, so that a dataset of many clients costs no dict and
no encoder call per client; ``as_dict()`` makes the version-1 dict for the sinks that hand
datasets on (a callable, an embedding application's own sink) and for ``datasets()``. A
prepared dataset and its dict encode to the same bytes (``tests/test_datasets_prepared.py``).
"""

from __future__ import annotations

import sys
from bisect import bisect_right
from itertools import accumulate, compress, count, islice
from operator import add, eq, itemgetter
from typing import IO, Any, Callable, Dict, List, Optional, Tuple, Union

import simplejson
from simplejson.encoder import encode_basestring_ascii

from .model import ClientKey, Clients, Interval
from .records import start_time
from .settings import Settings, StreamerKey
from .stats import Stats

Dataset = Dict[str, Any]

_first, _second = itemgetter(0), itemgetter(1)


def _ranked_columns(table: Dict[ClientKey, int]) -> Tuple[List[ClientKey], List[int]]:
    """The clients and their bytes, largest first, ties by ip then user agent (``ranked``):
    sorted by bytes alone, then each run of equal bytes by client, so that comparing two
    clients' strings is left to the ties."""
    bytes_of = table.__getitem__
    keys = sorted(table, key=bytes_of, reverse=True)
    sents = list(map(bytes_of, keys))
    tied = list(compress(count(), map(eq, sents, islice(sents, 1, None))))
    if tied:
        start = end = tied[0]
        for i in islice(tied, 1, None):
            if i != end + 1:
                keys[start:end + 2] = sorted(keys[start:end + 2])
                start = i
            end = i
        keys[start:end + 2] = sorted(keys[start:end + 2])
    return keys, sents


def ranked(clients: Clients) -> List[Tuple[ClientKey, int]]:
    """An interval's clients, largest first, ties by ip then user agent: the order of every
    dataset's client list, so that a datagram keeps the largest ones and the order is
    deterministic."""
    return list(zip(*_ranked_columns(clients.bytes)))


class Prepared:
    """One streamer's dataset of an interval, ready to encode: the envelope's fields and the
    ranked clients as columns (``keys``, ``sents``); ``as_dict()`` is the version-1 dict."""

    __slots__ = ("settings", "streamer", "start", "duration_ms", "count", "total", "keys",
                 "sents")

    def __init__(self, settings: Settings, streamer: StreamerKey, start: str,
                 duration_ms: int, clients: Clients) -> None:
        self.settings = settings
        self.streamer = streamer
        self.start = start
        self.duration_ms = duration_ms
        self.keys, self.sents = _ranked_columns(clients.bytes)
        self.count = clients.count
        self.total = sum(self.sents)

    def as_dict(self, clients: Optional[List[Dict[str, Any]]] = None) -> Dataset:
        """The version-1 dataset (with ``clients`` instead of the client list, if given)."""
        if clients is None:
            clients = [{"ip": ip, "user-agent": ua, "bytes-sent": sent}
                       for (ip, ua), sent in zip(self.keys, self.sents)]
        settings, streamer = self.settings, self.streamer
        return {
            "version": 1,
            "hostname": settings.hostname,
            "tags": list(settings.tags),
            "streamer-id": {
                "content-id": streamer[0],
                "format": streamer[1],
                "quality": streamer[2],
            },
            "start-time": self.start,
            "duration-ms": self.duration_ms,
            "data": {
                "clients": clients,
                "client-count": self.count,
                "bytes-sent": self.total,
            },
        }

    def encode(self) -> bytes:
        """The wire form, byte for byte ``encode(self.as_dict())``: the envelope and every
        entry in one formatting."""
        head, tail = _shell(self.as_dict([]))
        n = len(self.sents)
        if not n:
            return (head + tail).encode("utf-8")
        template = "".join((head.replace("%", "%%"), ",".join([_ENTRY] * n),
                            tail.replace("%", "%%")))
        return (template % _flat(*_columns(self.keys), self.sents)).encode("utf-8")

    def fit(self, limit: int) -> Tuple[bytes, int]:
        """``fit`` (below) of this dataset: the client list encoded in batches of doubling
        size, the last one that does not fit whole cut where the next client would not fit;
        so a client is encoded at most twice, and only a few datagrams' worth of them."""
        head, tail = _shell(self.as_dict([]))
        room = limit - len(head) - len(tail)
        ips, uas = _columns(self.keys)
        sents = self.sents
        n = len(sents)
        parts: List[str] = []
        used = -1  # the parts' length, joined by commas (none yet: no comma either)
        a, size = 0, FIT_BATCH
        while a < n:
            b = min(n, a + size)
            piece = _entries(ips, uas, sents, a, b)
            if used + 1 + len(piece) <= room:
                parts.append(piece)
                used += 1 + len(piece)
                a, size = b, size * 2
                continue
            entries = list(map(_ENTRY.__mod__, zip(ips[a:b], uas[a:b], sents[a:b])))
            # entry j is kept if used + (len(entries[0]) + 1) + ... + (len(entries[j]) + 1)
            # <= room: the cumulative lengths plus j + 1 commas, increasing in j
            kept = bisect_right(list(map(add, accumulate(map(len, entries)), count(1))),
                                room - used)
            if kept:
                parts.append(",".join(entries[:kept]))
            a += kept
            break
        return (head + ",".join(parts) + tail).encode("utf-8"), a


FIT_BATCH = 256
"""Clients in ``Prepared.fit``'s first batch (each next one twice as many)."""
_ENTRY = '{"ip":"%s%s%d}'
"""A client's entry as the encoder writes its dict: the ip (escaped), its user agent's part
(``_UA``), the bytes."""
_UA = '","user-agent":"%s","bytes-sent":'
"""An entry's part from the ip's closing quote to the bytes, of a user agent (escaped)."""
_PLAIN = bytes(c for c in range(0x20, 0x7F) if c not in b'"\\')
"""The characters JSON writes as they are (ensure_ascii): printable ASCII but quote and
backslash."""


def _plain(text: str) -> bool:
    """Whether the encoder writes ``text`` between its quotes as it is."""
    return text.isascii() and not text.encode("ascii").translate(None, _PLAIN)


def _escape(text: str) -> str:
    """``text`` as the encoder writes it between its quotes."""
    return text if _plain(text) else encode_basestring_ascii(text)[1:-1]


def _columns(keys: List[ClientKey]) -> Tuple[List[str], List[str]]:
    """For the entries of ``keys``: the ips as the encoder writes them between their quotes
    (all checked at once: they are mostly distinct), and the user agents' parts (``_UA``;
    each user agent checked and escaped once: they mostly repeat)."""
    ips = list(map(_first, keys))
    if not _plain("".join(ips)):
        ips = list(map(_escape, ips))
    uas = list(map(_second, keys))
    distinct = set(uas)
    if _plain("".join(distinct)):
        parts = {ua: _UA % ua for ua in distinct}
    else:
        parts = {ua: _UA % _escape(ua) for ua in distinct}
    return ips, list(map(parts.__getitem__, uas))


def _flat(ips: List[str], uas: List[str], sents: List[int]) -> Tuple[Any, ...]:
    """The columns as the entries' formatting arguments, client by client."""
    flat: List[Any] = [None] * (3 * len(ips))
    flat[0::3] = ips
    flat[1::3] = uas
    flat[2::3] = sents
    return tuple(flat)


def _entries(ips: List[str], uas: List[str], sents: List[int], a: int, b: int) -> str:
    """Clients ``a`` to ``b`` (``_columns``) as the client list's text, comma-separated:
    one template, one formatting over all of them."""
    if b <= a:
        return ""
    return ",".join([_ENTRY] * (b - a)) % _flat(ips[a:b], uas[a:b], sents[a:b])


def _shell(envelope: Dataset) -> Tuple[str, str]:
    """A dataset's encoding around its client list (``envelope``: with no clients): the text
    up to the list's first entry, and from its end on with the newline."""
    shell = _json(envelope)
    at = shell.rindex('"clients":[]') + len('"clients":[')
    return shell[:at], shell[at:] + "\n"


def prepared(interval: Interval, settings: Settings) -> List[Prepared]:
    """One dataset per configured streamer, in the configured order, empty ones included;
    clients listed largest first (``ranked``)."""
    start = start_time(interval.start)
    return [Prepared(settings, streamer, start, interval.duration_ms, interval.streams[streamer])
            for streamer in settings.streamers]


def datasets(interval: Interval, settings: Settings) -> List[Dataset]:
    """``prepared``, as version-1 dicts."""
    return [p.as_dict() for p in prepared(interval, settings)]


def as_dict(dataset: Union[Dataset, Prepared]) -> Dataset:
    """A dataset as a dict (a prepared one made into one)."""
    return dataset.as_dict() if type(dataset) is Prepared else dataset


def listed(dataset: Union[Dataset, Prepared]) -> int:
    """How many clients a dataset lists."""
    if type(dataset) is Prepared:
        return len(dataset.keys)
    return len(dataset["data"]["clients"])


_json = simplejson.JSONEncoder(separators=(",", ":")).encode


def encode(dataset: Union[Dataset, Prepared]) -> bytes:
    """The wire form: compact JSON and a newline."""
    if type(dataset) is Prepared:
        return dataset.encode()
    return _json(dataset).encode("utf-8") + b"\n"


class JsonLinesWriter:
    """Datasets in their wire form on a binary stream (standard output by default), each
    flushed at once. No Twisted here: replay's standard-output path uses it as it is, the
    service's StdoutSink adds the Service around it."""

    takes_prepared = True
    """``deliver`` takes ``Prepared`` datasets as well as dicts (``outbox.deliver``)."""

    def __init__(self, stats: Stats, stream: Optional[IO[bytes]] = None) -> None:
        self.stats = stats
        self.stream = stream if stream is not None else sys.__stdout__.buffer

    def deliver(self, dataset: Union[Dataset, Prepared]) -> None:
        self.stream.write(encode(dataset))
        self.stream.flush()
        self.stats.datasets_sent += 1


def _client_rank(client: Dict[str, Any]) -> Tuple[int, str, str]:
    return -client["bytes-sent"], client["ip"], client["user-agent"]


def fit(dataset: Union[Dataset, Prepared], limit: int) -> Tuple[bytes, int]:
    """The wire form of ``dataset`` in at most ``limit`` bytes (the newline included): the
    envelope and totals as they are, then clients largest first (ties by ip, then user agent),
    each encoded on its own and appended while it still fits, so a dataset of 50,000 clients
    costs a datagram's worth of encoding, not the whole list's. Returns the bytes and how many
    clients they hold (all of them, byte for byte ``encode(dataset)``, when everything fits);
    a ``limit`` below the envelope's own size still gets the envelope, with no clients."""
    if type(dataset) is Prepared:
        return dataset.fit(limit)
    data = dataset["data"]
    clients = data["clients"]
    if any(_client_rank(a) > _client_rank(b) for a, b in zip(clients, clients[1:])):
        clients = sorted(clients, key=_client_rank)  # not from datasets(): rank it here
    head, tail = _shell(dict(dataset, data=dict(data, clients=[])))
    room = limit - len(head) - len(tail)
    parts: List[str] = []
    for client in clients:
        entry = _json(client)
        room -= len(entry) + 1  # with its comma (one more than needed: never too long)
        if room < -1:
            break
        parts.append(entry)
    return (head + ",".join(parts) + tail).encode("utf-8"), len(parts)


def shrink(data: bytes, limit: int) -> bytes:
    """``fit`` for a dataset already encoded (a datagram the socket refused as too large)."""
    return fit(simplejson.loads(data), limit)[0]


def report(intervals: List[Interval], settings: Settings,
           deliver: Callable[[Prepared], Any]) -> int:
    """Deliver every interval's datasets in order, prepared (``deliver``: of a sink that
    takes them, as JsonLinesWriter's and CallableSink's do); return how many. (Here, not in
    report.py, so that replay to standard output needs no Twisted service machinery.)"""
    n = 0
    for interval in intervals:
        for dataset in prepared(interval, settings):
            deliver(dataset)
            n += 1
    return n
