"""Intervals to sfive version-1 datasets, and their encoding (one JSON object per line)."""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List

import simplejson

from .model import Interval
from .settings import Settings

Dataset = Dict[str, Any]


def start_time(epoch: int) -> str:
    """``YYYY-MM-DDTHH:MM:SSZ`` in UTC."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def datasets(interval: Interval, settings: Settings) -> List[Dataset]:
    """One dataset per configured streamer, in the configured order, empty ones included."""
    out = []
    start = start_time(interval.start)
    for streamer in settings.streamers:
        clients = interval.streams[streamer]
        entries = [
            {"ip": ip, "user-agent": ua, "bytes-sent": sent}
            for (ip, ua), sent in clients.bytes.items()
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


def shrink(data: bytes, limit: int) -> bytes:
    """Trim an encoded dataset's ``clients`` list, largest clients kept, until it fits ``limit``.

    ``client-count`` and ``bytes-sent`` are left as they are, so the totals stay exact.
    """
    dataset = simplejson.loads(data)
    clients = sorted(dataset["data"]["clients"], key=lambda c: c["bytes-sent"], reverse=True)
    lo, hi = 0, len(clients)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        dataset["data"]["clients"] = clients[:mid]
        if len(encode(dataset)) <= limit:
            lo = mid
        else:
            hi = mid - 1
    dataset["data"]["clients"] = clients[:lo]
    return encode(dataset)


def report(intervals: List[Interval], settings: Settings, deliver: Callable[[dict], Any]) -> int:
    """Deliver every interval's datasets in order; return how many. (Here, not in report.py, so
    that replay to standard output needs no Twisted service machinery.)"""
    n = 0
    for interval in intervals:
        for dataset in datasets(interval, settings):
            deliver(dataset)
            n += 1
    return n
