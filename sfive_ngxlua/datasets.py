"""Intervals to sfive version-1 datasets, and their encoding (one JSON object per line)."""

from __future__ import annotations

import sys
from typing import IO, Any, Callable, Dict, List, Optional, Tuple

import simplejson

from .model import ClientKey, Clients, Interval
from .records import start_time
from .settings import Settings
from .stats import Stats

Dataset = Dict[str, Any]


def _rank(item: Tuple[ClientKey, int]) -> Tuple[int, ClientKey]:
    return -item[1], item[0]


def ranked(clients: Clients) -> List[Tuple[ClientKey, int]]:
    """An interval's clients, largest first, ties by ip then user agent: the order of every
    dataset's client list, so that a datagram keeps the largest ones and the order is
    deterministic."""
    return sorted(clients.bytes.items(), key=_rank)


def datasets(interval: Interval, settings: Settings) -> List[Dataset]:
    """One dataset per configured streamer, in the configured order, empty ones included;
    clients listed largest first (``ranked``)."""
    out = []
    start = start_time(interval.start)
    for streamer in settings.streamers:
        clients = interval.streams[streamer]
        entries = [
            {"ip": ip, "user-agent": ua, "bytes-sent": sent}
            for (ip, ua), sent in ranked(clients)
        ]
        out.append({
            "version": 1,
            "hostname": settings.hostname,
            "tags": list(settings.tags),
            "streamer-id": {
                "content-id": streamer[0],
                "format": streamer[1],
                "quality": streamer[2],
            },
            "start-time": start,
            "duration-ms": interval.duration_ms,
            "data": {
                "clients": entries,
                "client-count": clients.count,
                "bytes-sent": clients.total,
            },
        })
    return out


_json = simplejson.JSONEncoder(separators=(",", ":")).encode


def encode(dataset: Dataset) -> bytes:
    """The wire form: compact JSON and a newline."""
    return _json(dataset).encode("utf-8") + b"\n"


class JsonLinesWriter:
    """Datasets in their wire form on a binary stream (standard output by default), each
    flushed at once. No Twisted here: replay's standard-output path uses it as it is, the
    service's StdoutSink adds the Service around it."""

    def __init__(self, stats: Stats, stream: Optional[IO[bytes]] = None) -> None:
        self.stats = stats
        self.stream = stream if stream is not None else sys.__stdout__.buffer

    def deliver(self, dataset: Dataset) -> None:
        self.stream.write(encode(dataset))
        self.stream.flush()
        self.stats.datasets_sent += 1


def _client_rank(client: Dict[str, Any]) -> Tuple[int, str, str]:
    return -client["bytes-sent"], client["ip"], client["user-agent"]


def fit(dataset: Dataset, limit: int) -> Tuple[bytes, int]:
    """The wire form of ``dataset`` in at most ``limit`` bytes (the newline included): the
    envelope and totals as they are, then clients largest first (ties by ip, then user agent),
    each encoded on its own and appended while it still fits, so a dataset of 50,000 clients
    costs a datagram's worth of encoding, not the whole list's. Returns the bytes and how many
    clients they hold (all of them, byte for byte ``encode(dataset)``, when everything fits);
    a ``limit`` below the envelope's own size still gets the envelope, with no clients."""
    data = dataset["data"]
    clients = data["clients"]
    if any(_client_rank(a) > _client_rank(b) for a, b in zip(clients, clients[1:])):
        clients = sorted(clients, key=_client_rank)  # not from datasets(): rank it here
    shell = _json(dict(dataset, data=dict(data, clients=[])))
    at = shell.rindex('"clients":[]') + len('"clients":[')
    head, tail = shell[:at], shell[at:] + "\n"
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


def report(intervals: List[Interval], settings: Settings, deliver: Callable[[dict], Any]) -> int:
    """Deliver every interval's datasets in order; return how many. (Here, not in report.py, so
    that replay to standard output needs no Twisted service machinery.)"""
    n = 0
    for interval in intervals:
        for dataset in datasets(interval, settings):
            deliver(dataset)
            n += 1
    return n
