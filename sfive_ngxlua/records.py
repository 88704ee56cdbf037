"""One exporter line to a record, a gap notice, a heartbeat, or the reason it was rejected.

This is the per-line hot path of both the live service and replay. Live traffic repeats
timestamps (to the second), time zone suffixes and URLs heavily, so each of those is parsed once
and then looked up. Where the optional C accelerator (``_speedups.c``) is built, it decides the
lines of the common shape many at a time and leaves every other line to the Python path here,
which stays the reference (``RecordParser.decoder``).
"""

from __future__ import annotations

import calendar
import codecs
import json
import os
import re
import time
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

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


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


_decoder = json.JSONDecoder(parse_constant=_no_constant)
"""The standard library's C decoder, strict (no control characters in strings, no NaN): the
same decoder for one line and for a piece of many lines joined into one array."""
_scan = _decoder.scan_once
_decode_error = json.JSONDecodeError

try:  # an optional extra: about half the decoding cost where installed
    import orjson
except ImportError:  # pragma: no cover - depends on the installation
    orjson = None

try:  # the optional C accelerator (setup.py builds it where there is a compiler)
    from . import _speedups
except ImportError:  # pragma: no cover - depends on the build
    _speedups = None

PURE_ENV = "SFIVE_NGXLUA_PURE"
"""Set (to anything but "" or "0"), parsers do not use the C accelerator: the pure-Python
path, for tests and benchmarks."""


DECODER_NAMES = {"c": "the C accelerator", "orjson": "orjson", "json": "the standard library"}
"""What decides many lines at a time, by ``RecordParser.decoder``, for the logs and --version."""


def default_decoder() -> str:
    """What a parser decodes lines with unless told: "c" (the accelerator, unless it is not
    built or $SFIVE_NGXLUA_PURE is set), else "orjson" where installed, else "json" (the
    standard library's)."""
    if _speedups is not None and os.environ.get(PURE_ENV, "") in ("", "0"):
        return "c"
    return "orjson" if orjson is not None else "json"

PIECE = 32
"""Lines decoded together: one decoder call for each piece. Small, because a piece holding an
invalid line is decoded again without it."""


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


def _plain(data: bytes, n: int) -> bool:
    """Whether the n lines joined into ``data`` (``[line,\\nline,...]``) each begin with their
    only "{" and end with their only "}"."""
    return (data.count(b"{") == n and data.count(b"}") == n and data.count(b"},\n{") == n - 1
            and data[1] == 123 and data[-2] == 125)


class _Lines:
    """The lines of blocks, cut only if one is asked for (rarely: see ``_classify``)."""

    def __init__(self, blocks: Sequence[bytes]) -> None:
        self._blocks = blocks
        self._lines: Optional[List[bytes]] = None

    def __getitem__(self, i: int) -> bytes:
        if self._lines is None:
            self._lines = [line for block in self._blocks for line in block.split(b"\n")
                           if line]
        return self._lines[i]


_INVALID_UTF8 = ("invalid-utf8",)
_INVALID_JSON = ("invalid-json",)


def _reject(rejected: Dict[str, int], firsts: Dict[str, int], reason: str, at: int) -> None:
    """Count one rejected line (its reason's first line is ``at``); off the accepted path."""
    if reason in rejected:
        rejected[reason] += 1
    else:
        rejected[reason] = 1
        firsts[reason] = at


class RecordParser:
    """Turns lines into records under one Settings; remembers the last exporter sequence number."""

    def __init__(self, settings: Settings, repair_utf8: bool = False,
                 decoder: Optional[str] = None) -> None:
        self._statuses = settings.statuses
        self._match = compile_nameformat(settings.nameformat).match
        self._streamers = {key: key for key in settings.streamers}
        self._urls: Dict[str, Union[StreamerKey, str]] = {}
        self._seconds: Dict[str, int] = {}
        self._tails: Dict[str, int] = {}
        self.last_seq: Optional[int] = None
        self.first_rejected: Dict[str, int] = {}
        """Per rejection reason, the number of its first line in the last ``parse_lines`` or
        ``parse_blocks`` (of the lines, blocks cut into lines without the empty ones)."""
        self.block_starts: List[int] = []
        """Of the last ``parse_blocks``, the number of each block's first line: where a line
        is found without cutting the blocks before it (``pipeline._line_at``)."""
        if decoder is None:
            decoder = default_decoder()
        elif {"c": _speedups, "orjson": orjson, "json": json}.get(decoder) is None:
            raise ValueError(f"decoder {decoder!r} is not available here")
        self.decoder = decoder
        """How many lines at a time are decided: "c", the accelerator (``_parse_c``), or
        "orjson" or "json", the decoder that decodes pieces of lines for ``_classify`` (with
        orjson, the standard library's decides whatever orjson refuses or may read otherwise).
        One line (``parse``), and every line the accelerator leaves, goes through the standard
        library's decoder and ``_classify``: the reference."""
        self.repair_utf8 = repair_utf8
        """nginx's access log (``escape=json``) passes invalid UTF-8 through, where the exporter
        writes U+FFFD for each invalid byte: with this set, the parser does the same instead of
        rejecting the line, so that the same requests count from both sources."""

    def parse(self, line: bytes) -> Parsed:
        """Classify one line (without its newline)."""
        rejected: Dict[str, int] = {}
        records, events = self._classify([self._decode_line(line)], rejected)
        if records:
            return _new_record(Record, records[0])
        if events:
            return events[0][1]
        return next(iter(rejected))

    def parse_lines(self, lines: Sequence[bytes], rejected: Dict[str, int]
                    ) -> Tuple[List[Record], List[Tuple[int, Parsed]]]:
        """Classify many lines: the records in order (plain tuples laid out as Record), each
        gap or heartbeat with the number of records before it, and the rejections counted
        into ``rejected`` by reason. The lines are decided by the accelerator, or decoded a
        piece at a time (one decoder call for PIECE lines); the outcome is exactly that of
        ``parse`` for each line."""
        if self.decoder == "c":
            return self._parse_c(lines if type(lines) is list else list(lines), False, rejected)
        self.first_rejected = {}
        return self._classify(self._decode_lines(lines), rejected, lines)

    def parse_blocks(self, blocks: Sequence[bytes], rejected: Dict[str, int]
                     ) -> Tuple[List[Record], List[Tuple[int, Parsed]]]:
        """``parse_lines`` of blocks of lines joined by "\\n" (``LineSplitter.feed_blocks``),
        without cutting them into lines where they have the plain shape: each block is
        checked and decoded whole (a block that is not plain, or fails, is cut into lines)."""
        if self.decoder == "c":
            return self._parse_c(blocks if type(blocks) is list else list(blocks), True,
                                 rejected)
        objs: list = []
        fast = self.decoder == "orjson"
        self.block_starts = starts = []
        for block in blocks:
            got = self._decode_block(block, fast)
            if got is None:
                got = self._decode_lines([line for line in block.split(b"\n") if line])
            starts.append(len(objs))
            objs += got
        self.first_rejected = {}
        return self._classify(objs, rejected, _Lines(blocks) if fast else None)

    def _parse_c(self, items: list, split: bool, rejected: Dict[str, int]
                 ) -> Tuple[List[Record], List[Tuple[int, Parsed]]]:
        """``parse_blocks`` (``split``) or ``parse_lines`` by the accelerator: one call decides
        the lines of the common shape (records, and the rejections of lines valid but for their
        status, url-truncated or streamer) and stops at the first other line, which ``_again``
        classifies here; the next call goes on after it."""
        records: List[Record] = []
        events: List[Tuple[int, Parsed]] = []
        self.first_rejected = firsts = {}
        starts = None
        if split:
            starts = self.block_starts = []
        scan = _speedups.scan
        repair, urls, streamer, statuses = (self.repair_utf8, self._urls, self._streamer,
                                            self._statuses)
        i, pos, end, at, last_seq = scan(items, split, 0, 0, 0, self.last_seq, repair, records,
                                         rejected, firsts, urls, streamer, statuses, starts)
        n = len(items)
        while i < n:
            self.last_seq = last_seq
            last_seq = self._again(items[i][pos:end] if split else items[i], records, events,
                                   rejected, at)
            i, pos, end, at, last_seq = scan(items, split, i, end + 1, at + 1, last_seq,
                                             repair, records, rejected, firsts, urls,
                                             streamer, statuses, starts)
        self.last_seq = last_seq
        return records, events

    def _decode_block(self, block: bytes, fast: bool) -> Optional[list]:
        """The values of a block's lines in one decoder call, if each line begins with its only
        "{" and ends with its only "}" (see ``_decode_piece``); None if not, or if it fails."""
        if block[:1] != b"{" or block[-1] != 125:
            return None
        rest = block[1:-1].replace(b"}\n{", b"")
        if b"\n" in rest or b"{" in rest or b"}" in rest:
            return None
        data = b"[" + block.replace(b"\n", b",\n") + b"]"
        if fast:
            try:
                return orjson.loads(data)
            except orjson.JSONDecodeError:
                return None
        try:
            return _scan(data.decode("utf-8"), 0)[0]
        except (UnicodeDecodeError, ValueError, RecursionError, StopIteration):
            return None

    def _decode_lines(self, lines: Sequence[bytes]) -> list:
        decode = self._decode_fast if self.decoder == "orjson" else self._decode_piece
        if len(lines) <= PIECE:
            return decode(lines)
        objs: list = []
        for i in range(0, len(lines), PIECE):
            objs += decode(lines[i:i + PIECE])
        return objs

    def _decode_fast(self, lines: Sequence[bytes]) -> list:
        """``_decode_piece`` by orjson, under the same checks of the lines' shape. orjson is
        strict JSON: what it refuses (lone surrogates, numbers beyond a double, invalid UTF-8)
        goes to the standard library's decoder; the one value it reads otherwise, an integer
        beyond 64 bits (a float), is re-decoded in ``_classify`` where it matters."""
        data = b"[" + b",\n".join(lines) + b"]"
        if not _plain(data, len(lines)):
            return self._decode_mixed(lines)
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            return self._decode_piece(lines)

    def _decode_line(self, line: bytes) -> object:
        """One line's JSON value, or a 1-tuple holding the reason it is none."""
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            if not self.repair_utf8:
                return _INVALID_UTF8
            text = line.decode("utf-8", "sfive-per-byte")
        try:
            obj, end = _scan(text, 0)
            if end != len(text) and not text[end:].isspace():
                return _INVALID_JSON
        except StopIteration:
            try:
                obj = _decoder.decode(text)
            except (ValueError, RecursionError):
                return _INVALID_JSON
        except (ValueError, RecursionError):
            return _INVALID_JSON
        return obj

    def _decode_piece(self, lines: Sequence[bytes]) -> list:
        """``_decode_line`` of each line, by one decoder call over ``[line,\\nline,...]``.

        That array holds exactly one element per line, the line's own value, when every line
        begins with its only "{" and ends with its only "}" (checked by counting over the
        joined bytes) and the decoder refuses control characters in strings: a "}" then
        either closes its line's object or fails, and the newline after each "," cannot be
        inside a string. A failure is then in the line the error position is in: the lines
        before it are decoded again, that line alone, the rest as a piece."""
        data = b"[" + b",\n".join(lines) + b"]"
        if not _plain(data, len(lines)):
            return self._decode_mixed(lines)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            return self._decode_around(lines, data.count(b"\n", 0, e.start))
        try:
            return _scan(text, 0)[0]
        except _decode_error as e:
            return self._decode_around(lines, text.count("\n", 0, e.pos))
        except StopIteration as e:  # no value where one must begin
            return self._decode_around(lines, text.count("\n", 0, e.value))
        except (ValueError, RecursionError):  # too many digits, NaN, deep nesting
            return [self._decode_line(line) for line in lines]

    def _decode_around(self, lines: Sequence[bytes], bad: int) -> list:
        out = self._decode_piece(lines[:bad]) if bad else []
        out.append(self._decode_line(lines[bad]))
        if bad + 1 < len(lines):
            out += self._decode_piece(lines[bad + 1:])
        return out

    def _decode_mixed(self, lines: Sequence[bytes]) -> list:
        """Runs of lines of the plain shape as pieces, the others one by one."""
        out: list = []
        run: List[bytes] = []
        for line in lines:
            if line[:1] == b"{" and line[-1:] == b"}" and line.count(b"{") == 1 \
                    and line.count(b"}") == 1:
                run.append(line)
                continue
            if run:
                out += self._decode_piece(run)
                run = []
            out.append(self._decode_line(line))
        if run:
            out += self._decode_piece(run)
        return out

    def _classify(self, objs: list, rejected: Dict[str, int],
                  lines: Optional[Sequence[bytes]] = None, base: int = 0
                  ) -> Tuple[List[Record], List[Tuple[int, Parsed]]]:
        """Decoded lines to records, events (gaps, heartbeats) and counted rejections (the
        number of each reason's first line, from ``base``, in ``first_rejected``).
        ``lines``: where an integer field holds a float (orjson reads integers beyond 64 bits
        as floats), the line is decoded again by the standard library."""
        records: List[Record] = []
        events: List[Tuple[int, Parsed]] = []
        append = records.append
        statuses = self._statuses
        urls = self._urls
        seconds = self._seconds
        tails = self._tails
        last_seq = self.last_seq
        firsts = self.first_rejected
        for i, obj in enumerate(objs):
            if type(obj) is not dict:
                reason = obj[0] if type(obj) is tuple else "not-an-object"
                _reject(rejected, firsts, reason, base + i)
                continue
            seq = obj.get("seq")
            if type(seq) is int:
                if "url" not in obj:
                    if lines is not None and type(obj.get("lost")) is float:
                        self.last_seq = last_seq
                        last_seq = self._again(lines[i], records, events,
                                               rejected, base + i)
                        continue
                    control = self._control(obj, seq)
                    if control is not None:
                        if type(control) is str:
                            _reject(rejected, firsts, control, base + i)
                        else:
                            last_seq = self.last_seq
                            events.append((len(records), control))
                        continue
                last_seq = seq
            elif type(seq) is float and lines is not None:
                self.last_seq = last_seq
                last_seq = self._again(lines[i], records, events,
                                       rejected, base + i)
                continue
            try:
                url = obj["url"]
                client = obj["client"]
                ua = obj["ua"]
                when = obj["time"]
                status = obj["status"]
                sent = obj["bytes-sent"]
            except KeyError:
                _reject(rejected, firsts, "missing-field", base + i)
                continue
            if (
                type(url) is not str
                or type(client) is not str
                or type(ua) is not str
                or type(when) is not str
                or type(status) is not int
                or type(sent) is not int
                or not 0 <= sent < MAX_BYTES
            ):
                if lines is not None and float in (type(status), type(sent)):
                    self.last_seq = last_seq
                    last_seq = self._again(lines[i], records, events,
                                           rejected, base + i)
                    continue
                _reject(rejected, firsts, "wrong-type", base + i)
                continue
            if status not in statuses:
                _reject(rejected, firsts, "status", base + i)
                continue
            if "url-truncated" in obj:  # the exporter cut the URL (max_url_bytes): not its stream
                _reject(rejected, firsts, "url-truncated", base + i)
                continue
            streamer = urls.get(url)
            if streamer is None:
                streamer = self._streamer(url)
            if type(streamer) is str:
                _reject(rejected, firsts, streamer, base + i)
                continue
            head = seconds.get(when[:19])
            offset = tails.get(when[19:])
            if head is None or offset is None:
                t = self.seconds(when)
                if t is None:
                    _reject(rejected, firsts, "bad-time", base + i)
                    continue
            else:
                t = head - offset
            append((t, streamer, client, ua, sent))
        self.last_seq = last_seq
        return records, events

    def _again(self, line: bytes, records: List[Record], events: List[Tuple[int, Parsed]],
               rejected: Dict[str, int], at: int) -> Optional[int]:
        """Classify one line decoded by the standard library into the lists; the last
        sequence number after it."""
        more, also = self._classify([self._decode_line(line)], rejected, None, at)
        events.extend((len(records) + at, event) for at, event in also)
        records.extend(more)
        return self.last_seq

    def _control(self, obj: dict, seq: int) -> Union[Gap, Heartbeat, str, None]:
        """A gap or heartbeat line (a reason if it is a bad one); None for any other line."""
        lost = obj.get("lost")
        if type(lost) is int and lost > 0:
            self.last_seq = seq - 1
            return Gap(lost, seq)
        if "hb" in obj:
            return self._heartbeat(seq, obj)
        return None

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
