"""One exporter line to a record, a gap notice, a heartbeat, or the reason it was rejected.

This is the per-line hot path of both the live service and replay. Live traffic repeats
timestamps (to the second), time zone suffixes and URLs heavily, so each of those is parsed once
and then looked up.
"""

from __future__ import annotations

import calendar
import codecs
import re
import time
from typing import Dict, NamedTuple, Optional, Union

import simplejson
from simplejson.scanner import make_scanner

from .settings import Settings, StreamerKey, compile_nameformat

_URL_CACHE_LIMIT = 10_000
_TIME_CACHE_LIMIT = 4_096
"""Live traffic needs few entries at a time (the current segments and playlists, the current
seconds); a full cache is cleared. Small caches keep memory flat however long the input."""
_CACHED_URL_MAX = 256
"""Longer URLs are matched every time instead of cached: clients choose URLs, and 100,000
cached URLs of 8 KiB each would hold 800 MB."""
MAX_BYTES = 2**53

_DATE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\Z")
_TAIL = re.compile(r"(?:[.,]\d{1,9})?(?:(Z)|([+-])(\d\d):?(\d\d))\Z")

def _per_byte(error: UnicodeDecodeError) -> tuple:
    """U+FFFD for one invalid byte, then decode on from the next one (as nginx/sfive.lua)."""
    return "\ufffd", error.start + 1


codecs.register_error("sfive-per-byte", _per_byte)

_decoder = simplejson.JSONDecoder()
_scan = make_scanner(_decoder)


class Record(NamedTuple):
    """An accepted request: its UTC second, streamer, client and bytes."""

    time: int
    streamer: StreamerKey
    client: str
    ua: str
    bytes_sent: int


class Gap(NamedTuple):
    """The exporter says ``lost`` records before ``seq`` are gone (its ring overran)."""

    lost: int
    seq: int


class Heartbeat(NamedTuple):
    """Protocol v2: the subscriber has everything up to ``seq``, and every record whose time is
    before ``time`` (epoch seconds) has been delivered at or before it: the event-time
    watermark. ``oldest`` and ``oldest_time``: the oldest record the exporter's ring still holds
    and about its time (None if the exporter does not say)."""

    seq: int
    time: float
    oldest: Optional[int] = None
    oldest_time: Optional[float] = None


_new_record = tuple.__new__
Parsed = Union[Record, Gap, Heartbeat, str]
"""A Record, a Gap, a Heartbeat, or a rejection reason."""

MAX_HEARTBEAT = 2.0**40
"""Heartbeat times beyond this (year 36812) are refused as wrong-type."""

REASONS = (
    "invalid-utf8",
    "invalid-json",
    "not-an-object",
    "missing-field",
    "wrong-type",
    "bad-time",
    "status",
    "url-mismatch",
    "url-truncated",
    "unknown-streamer",
    "too-long",
    "future",
)
"""Every rejection reason, so that counters and metrics can list them all from the start."""


class RecordParser:
    """Turns lines into records under one Settings; remembers the last exporter sequence number."""

    def __init__(self, settings: Settings, repair_utf8: bool = False) -> None:
        self._statuses = settings.statuses
        self._match = compile_nameformat(settings.nameformat).match
        self._streamers = {key: key for key in settings.streamers}
        self._urls: Dict[str, Union[StreamerKey, str]] = {}
        self._seconds: Dict[str, int] = {}
        self._tails: Dict[str, int] = {}
        self.last_seq: Optional[int] = None
        self.repair_utf8 = repair_utf8
        """nginx's access log (``escape=json``) passes invalid UTF-8 through, where the exporter
        writes U+FFFD for each invalid byte: with this set, the parser does the same instead of
        rejecting the line, so that the same requests count from both sources."""

    def parse(self, line: bytes) -> Parsed:
        """Classify one line (without its newline)."""
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            if not self.repair_utf8:
                return "invalid-utf8"
            text = line.decode("utf-8", "sfive-per-byte")
        try:
            obj, end = _scan(text, 0)
            if end != len(text) and not text[end:].isspace():
                return "invalid-json"
        except StopIteration:
            try:
                obj = _decoder.decode(text)
            except (ValueError, RecursionError):
                return "invalid-json"
        except (ValueError, RecursionError):
            return "invalid-json"
        if type(obj) is not dict:
            return "not-an-object"
        seq = obj.get("seq")
        if type(seq) is int:
            if "url" not in obj:
                lost = obj.get("lost")
                if type(lost) is int and lost > 0:
                    self.last_seq = seq - 1
                    return Gap(lost, seq)
                if "hb" in obj:
                    return self._heartbeat(seq, obj)
            self.last_seq = seq
        try:
            url = obj["url"]
            client = obj["client"]
            ua = obj["ua"]
            when = obj["time"]
            status = obj["status"]
            sent = obj["bytes-sent"]
        except KeyError:
            return "missing-field"
        if (
            type(url) is not str
            or type(client) is not str
            or type(ua) is not str
            or type(when) is not str
            or type(status) is not int
            or type(sent) is not int
            or not 0 <= sent < MAX_BYTES
        ):
            return "wrong-type"
        if status not in self._statuses:
            return "status"
        if "url-truncated" in obj:
            return "url-truncated"  # the exporter cut the URL (max_url_bytes): not its stream
        streamer = self._urls.get(url)
        if streamer is None:
            streamer = self._streamer(url)
        if type(streamer) is str:
            return streamer
        head = self._seconds.get(when[:19])
        offset = self._tails.get(when[19:])
        if head is None or offset is None:
            seconds = self.seconds(when)
            if seconds is None:
                return "bad-time"
        else:
            seconds = head - offset
        return _new_record(Record, (seconds, streamer, client, ua, sent))

    def _heartbeat(self, seq: int, obj: dict) -> Union[Heartbeat, str]:
        when = obj["hb"]
        if type(when) not in (int, float) or not 0 <= when < MAX_HEARTBEAT:
            return "wrong-type"
        self.last_seq = seq
        oldest, since = obj.get("oldest"), obj.get("oldest-time")
        if type(oldest) is not int or not 0 < oldest < MAX_HEARTBEAT:
            return Heartbeat(seq, float(when))  # the ring's history unknown, the beat still good
        if type(since) not in (int, float) or not 0 <= since < MAX_HEARTBEAT:
            since = None
        return Heartbeat(seq, float(when), oldest, None if since is None else float(since))

    def url_match(self, url: str) -> Optional[re.Match[str]]:
        """What the name format (-F) makes of ``url``: its match, with the groups content,
        format and quality, or None. For diagnostics (sfive-ngxlua-check); ``parse`` decides."""
        return self._match(url)

    def _streamer(self, url: str) -> Union[StreamerKey, str]:
        m = self._match(url)
        if m is None:
            result: Union[StreamerKey, str] = "url-mismatch"
        else:
            key = (m.group("content"), m.group("format"), m.group("quality"))
            result = self._streamers.get(key, "unknown-streamer")
        if len(url) <= _CACHED_URL_MAX:
            if len(self._urls) >= _URL_CACHE_LIMIT:
                self._urls.clear()
            self._urls[url] = result
        return result

    def seconds(self, when: str) -> Optional[int]:
        """UTC epoch second of an ISO 8601 time with offset; None if it is not one."""
        head = self._seconds.get(when[:19])
        if head is None:
            head = _head_seconds(when[:19])
            if head is None:
                return _slow_seconds(when)
            if len(self._seconds) >= _TIME_CACHE_LIMIT:
                self._seconds.clear()
            self._seconds[when[:19]] = head
        tail = when[19:]
        offset = self._tails.get(tail)
        if offset is None:
            offset = _tail_offset(tail)
            if offset is None:
                return _slow_seconds(when)
            if len(self._tails) >= _TIME_CACHE_LIMIT:
                self._tails.clear()
            self._tails[tail] = offset
        return head - offset


    def time_of(self, line: bytes) -> Optional[int]:
        """The UTC second of a line's ``time`` field, whatever else the line holds or lacks;
        None if it has no valid one. (Not the hot path: the file follower asks it of the last
        line of a read, for its watermark.)"""
        try:
            obj = _decoder.decode(line.decode("utf-8", "sfive-per-byte"))
        except (ValueError, RecursionError):
            return None
        when = obj.get("time") if type(obj) is dict else None
        return self.seconds(when) if type(when) is str else None

    def url_of(self, line: bytes) -> Optional[str]:
        """A line's ``url`` field if it has one, whatever else it holds or lacks; None if not.
        (Not the hot path: the pipeline asks it of a few rejected lines, for the samples.)"""
        try:
            obj = _decoder.decode(line.decode("utf-8", "sfive-per-byte"))
        except (ValueError, RecursionError):
            return None
        url = obj.get("url") if type(obj) is dict else None
        return url if type(url) is str else None


def start_time(epoch: int) -> str:
    """``YYYY-MM-DDTHH:MM:SSZ`` in UTC: how the service writes a time (a dataset's start, a
    time range in the log)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def _head_seconds(head: str) -> Optional[int]:
    """Epoch second of ``YYYY-MM-DDTHH:MM:SS`` read as UTC; None if it is no valid time."""
    if not _DATE.match(head):
        return None
    year, month, day = int(head[0:4]), int(head[5:7]), int(head[8:10])
    hour, minute, second = int(head[11:13]), int(head[14:16]), int(head[17:19])
    if not (1 <= month <= 12 and hour < 24 and minute < 60 and second < 60):
        return None
    try:
        if not 1 <= day <= calendar.monthrange(year, month)[1]:
            return None
        return calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
    except (ValueError, OverflowError):
        return None


def _tail_offset(tail: str) -> Optional[int]:
    m = _TAIL.match(tail)
    if m is None:
        return None
    if m.group(1):
        return 0
    hours, minutes = int(m.group(3)), int(m.group(4))
    if hours > 23 or minutes > 59:
        return None
    offset = hours * 3600 + minutes * 60
    return -offset if m.group(2) == "-" else offset


def _slow_seconds(when: str) -> Optional[int]:
    """Other ISO 8601 spellings (basic format, week dates); a time without offset is refused."""
    from dateutil.parser import isoparse  # rare spellings only: not imported at start-up

    try:
        parsed = isoparse(when)
        if parsed.tzinfo is None or parsed.utcoffset() is None:
            return None
        return calendar.timegm(parsed.utctimetuple())
    except (ValueError, OverflowError, TypeError):
        return None
