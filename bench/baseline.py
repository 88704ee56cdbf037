"""The original program's per-line approach, ported anew to Python 3, as the speed baseline.

Per line, as the old fetcher did: simplejson.loads, re.match of the url (through the
module-level re.match, whose pattern-cache lookup it paid), a status check,
dateutil.parser.parse of the time and subtraction of its utcoffset, then an update of
the streamer's ClientList keyed by '%(client)s/%(ua)s'.  What differs, so that totals
can be compared with replay's: bad lines are counted instead of raised out of the
protocol and skipped (the wrong-type checks it lacked are three isinstance tests), every record
counts (there is no wall-clock start time in a replay), and the line reading is a plain
file iteration, not the old splitlines of the whole buffer per chunk (that would only
make the baseline slower).  ``key in self._clients.keys()`` keeps its Python 3 meaning, a
hash look-up; in Python 2 it scanned a list of all the interval's clients, so the original
was slower still than this port.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

import dateutil.parser
import simplejson as json


class ClientList:
    """Bytes sent per client (ip + user agent) of one streamer."""

    def __init__(self) -> None:
        self._clients: dict[str, dict] = {}

    def update(self, logdata: dict) -> None:
        key = "%(client)s/%(ua)s" % logdata  # noqa: UP031 (the original's own key)
        if key in self._clients.keys():
            self._clients[key]["bytes-sent"] += logdata["bytes-sent"]
        else:
            self._clients[key] = {"ip": logdata["client"], "user-agent": logdata["ua"],
                                  "bytes-sent": logdata["bytes-sent"]}

    def count(self) -> int:
        return len(self._clients)

    def bytes_sent(self) -> int:
        return sum(c["bytes-sent"] for c in self._clients.values())


def streamers(streamer_ids: Iterable[str]) -> dict[str, dict[str, dict[str, ClientList]]]:
    """content -> format -> quality -> ClientList for all combinations of C1,C2/F1/Q1,Q2."""
    out: dict[str, dict[str, dict[str, ClientList]]] = {}
    for s in streamer_ids:
        parts = s.split("/")
        if len(parts) != 3:
            raise ValueError(f"invalid streamer id {s!r}: must be C/F/Q")
        for c in parts[0].split(","):
            for f in parts[1].split(","):
                for q in parts[2].split(","):
                    out.setdefault(c, {}).setdefault(f, {}).setdefault(q, ClientList())
    return out


@dataclass
class Totals:
    """What the baseline saw: lines, accepted records and bytes, per streamer too."""

    lines: int = 0
    accepted: int = 0
    bytes_sent: int = 0
    per_streamer: dict[tuple[str, str, str], int] = field(default_factory=dict)
    clients: int = 0


class Fetcher:
    """The per-record part of the old NGXLuaFetcher."""

    def __init__(self, streamer_ids: Iterable[str], nameformat: str,
                 statuses: tuple[int, ...] = (200, 206)) -> None:
        self._streamer = streamers(streamer_ids)
        self._url_re = re.compile(nameformat)
        self._statuses = statuses
        self.accepted = 0

    def update_data(self, data: dict) -> None:
        try:
            m = re.match(self._url_re, data["url"])
            if not m:
                return
            streamerid = m.groupdict()
            if data["status"] in self._statuses:
                ts = dateutil.parser.parse(data["time"])
                ts = (ts - ts.utcoffset()).replace(tzinfo=None)
                if not (isinstance(data["bytes-sent"], int) and isinstance(data["client"], str)
                        and isinstance(data["ua"], str)):
                    raise TypeError("wrong type")
                cl = self._streamer[streamerid["content"]][streamerid["format"]]
                cl[streamerid["quality"]].update(data)
                self.accepted += 1
        except (KeyError, ValueError, TypeError, OverflowError):
            pass

    def data_line(self, line: bytes) -> None:
        try:
            data = json.loads(line)
        except ValueError:
            return
        if isinstance(data, dict):
            self.update_data(data)

    def totals(self, lines: int) -> Totals:
        t = Totals(lines=lines, accepted=self.accepted)
        for c, fs in self._streamer.items():
            for f, qs in fs.items():
                for q, cl in qs.items():
                    b = cl.bytes_sent()
                    t.per_streamer[(c, f, q)] = b
                    t.bytes_sent += b
                    t.clients += cl.count()
        return t


def run(source: str | Iterable[bytes], streamer_ids: Iterable[str], nameformat: str,
        statuses: tuple[int, ...] = (200, 206)) -> Totals:
    """Process a file path or an iterable of lines the old way; return the totals."""
    fetcher = Fetcher(streamer_ids, nameformat, statuses)
    n = 0
    if isinstance(source, str):
        with open(source, "rb") as f:
            for line in f:
                n += 1
                fetcher.data_line(line)
    else:
        for line in source:
            n += 1
            fetcher.data_line(line)
    return fetcher.totals(n)
