"""Exporter bytes → lines → records → model: the one ingest path of the service and replay."""

from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

from twisted.logger import Logger

from .lines import LineSplitter
from .model import IntervalModel
from .records import Gap, Heartbeat, Record, RecordParser, start_time
from .settings import Settings
from .stats import Stats


class Pipeline:
    """Feeds exporter output into the interval model and counts every line's fate in ``stats``.

    Heartbeat lines (protocol v2) are counted apart from the record lines (``stats.heartbeats``,
    not in ``stats.lines``); the last one is ``heartbeat``, the fetcher's watermark. Records the
    exporter's ring lost (a gap line) are logged with the time range they belong to: from the
    last record read before the gap to the first record (or heartbeat) after it.
    """

    log = Logger()

    def __init__(self, settings: Settings, stats: Stats, model: IntervalModel,
                 on_time: Optional[Callable[[int], None]] = None,
                 repair_utf8: Optional[bool] = None) -> None:
        """``on_time``: for replay, where time comes from the records: called with a record's
        time whenever it makes the next interval due. ``repair_utf8`` (RecordParser): for
        nginx's access log; None repairs when the settings name one to follow (``--file``)."""
        self.on_time = on_time
        self.stats = stats
        self.model = model
        if repair_utf8 is None:
            repair_utf8 = bool(settings.file)
        self.parser = RecordParser(settings, repair_utf8=repair_utf8)
        self.addresses = settings.client_ip.addresses(settings.duration, stats)
        """--client-ip's work on each record's client (None: full addresses)."""
        self.splitter = LineSplitter(settings.max_line_length)
        self.heartbeat: Optional[Heartbeat] = None
        self.last_time: Optional[int] = None
        """The time of the last record read (accepted or not)."""
        self._gap: Optional[Tuple[int, int, Optional[int]]] = None
        self.handled = 0
        """How many lines the last ``feed_lines`` folded into the model and counted: all of
        them, or, if it raised, those before the line that raised (the caller reads again from
        that line; ``last_seq`` is the sequence number before it)."""

    def feed(self, data: bytes) -> None:
        """Take a chunk of the stream, cut anywhere."""
        self.feed_lines(self.splitter.feed(data))
        self._count_too_long()

    def feed_split(self, splitter: LineSplitter, data: bytes, skip: int = 0) -> list:
        """``feed`` through the caller's own splitter (the file follower reads several files at
        once, each with its own partial line); returns the complete lines. The first ``skip``
        lines are not fed (they were, before a feed that raised)."""
        self.handled = 0
        lines = splitter.feed(data)
        self.feed_lines(lines[skip:] if skip else lines)
        self._count_too_long(splitter)
        return lines

    def feed_lines(self, lines: list) -> None:
        """Take complete lines (no line ends)."""
        stats = self.stats
        parse = self.parser.parse
        add = self.model.add
        if self.addresses is not None:
            add = self.addresses.wrap(add)
        on_time = self.on_time
        due = math.inf if on_time is None else -math.inf
        gap = self._gap is not None
        start_seq = self.parser.last_seq
        last = None
        stats.lines += len(lines)
        rest = iter(lines)
        try:
            for line in rest:
                result = parse(line)
                if type(result) is Record:
                    last = result
                    if gap:
                        self._gap_ends(result.time)
                        gap = False
                    if add(result) and result.time >= due:
                        on_time(result.time)
                        due = self.model.due_at
                elif type(result) is str:
                    stats.rejected[result] += 1
                elif type(result) is Heartbeat:
                    stats.lines -= 1
                    stats.heartbeats += 1
                    self.heartbeat = result
                    if gap:
                        self._gap_ends(result.time)
                        gap = False
                elif type(result) is Gap:
                    stats.lost += result.lost
                    if last is not None:
                        self.last_time = last.time
                    self._gap_begins(result)
                    gap = True
        except Exception:
            self._rewind(lines, len(lines) - sum(1 for _ in rest) - 1, start_seq)
            raise
        finally:
            if last is not None:
                self.last_time = last.time
        self.handled = len(lines)

    def _rewind(self, lines: list, done: int, start_seq: Optional[int]) -> None:
        """Line ``done`` raised: un-count it and the lines after it, and set ``last_seq`` back
        to the last line handled before it, so that reading on from there neither skips nor
        counts anything twice."""
        self.handled = done
        self.stats.lines -= len(lines) - done
        parser = self.parser
        for line in reversed(lines[:done]):
            parser.last_seq = None
            parser.parse(line)
            if parser.last_seq is not None:
                return
        parser.last_seq = start_seq

    def _gap_begins(self, gap: Gap) -> None:
        if self._gap is not None:
            self._gap_ends(None)
        self._gap = (gap.lost, gap.seq, self.last_time)

    def _gap_ends(self, after: Optional[float]) -> None:
        """Log the records lost in a gap with the time range they belong to."""
        assert self._gap is not None
        lost, seq, before = self._gap
        self._gap = None
        self.lose(before, after if after is not None else before)
        self.log.warn(
            "the exporter lost {lost} records (sequence {first_seq} to {last_seq}): requests "
            "logged between {since} and {until} are missing from the intervals; nginx's "
            "access log has them", lost=lost, first_seq=seq - lost, last_seq=seq - 1,
            since="(unknown)" if before is None else start_time(int(before)),
            until="(unknown)" if after is None else start_time(math.ceil(after)),
            before=before, after=after)

    def lose(self, since: Optional[float], until: Optional[float]) -> None:
        """A source announces a loss (records between ``since`` and ``until``, event time;
        None: not known): the intervals it overlaps are partial (model.lose)."""
        self.model.lose(since, until)

    def cut(self) -> int:
        """The stream broke: discard the partial line (never parse half a record)."""
        self._count_too_long()
        if self._gap is not None:
            self._gap_ends(None)
        return self.splitter.reset()

    def _count_too_long(self, splitter: Optional[LineSplitter] = None) -> None:
        """Count the over-long lines ``splitter`` (default: the pipeline's own) skipped."""
        splitter = splitter if splitter is not None else self.splitter
        if splitter.too_long:
            self.stats.lines += splitter.too_long
            self.stats.rejected["too-long"] += splitter.too_long
            splitter.too_long = 0

    @property
    def last_seq(self) -> int | None:
        """The exporter sequence number of the last line read, for resuming after a cut."""
        return self.parser.last_seq

    def resume_after(self, seq: Optional[int]) -> None:
        """Read on after sequence number ``seq`` (a checkpoint's; None: a new ring, whose
        numbers start again)."""
        self.parser.last_seq = seq

    def time_of(self, line: bytes) -> Optional[int]:
        """The UTC second of a line's time field (RecordParser.time_of)."""
        return self.parser.time_of(line)
