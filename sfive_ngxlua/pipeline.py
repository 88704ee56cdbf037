"""Exporter bytes → lines → records → model: the one ingest path of the service and replay."""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Tuple

from twisted.logger import Logger

from .datasets import start_time
from .lines import LineSplitter
from .model import IntervalModel
from .records import Gap, Heartbeat, Record, RecordParser
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
                 on_time: Optional[Callable[[int], None]] = None) -> None:
        """``on_time``: for replay, where time comes from the records: called with a record's
        time whenever it makes the next interval due."""
        self.on_time = on_time
        self.stats = stats
        self.model = model
        self.parser = RecordParser(settings)
        self.splitter = LineSplitter(settings.max_line_length)
        self.heartbeat: Optional[Heartbeat] = None
        self.last_time: Optional[int] = None
        """The time of the last record read (accepted or not)."""
        self._gap: Optional[Tuple[int, int, Optional[int]]] = None

    def feed(self, data: bytes) -> None:
        """Take a chunk of the stream, cut anywhere."""
        blocks = self.splitter.feed_blocks(data)
        if blocks is None:
            self.feed_lines(self.splitter.feed(data))
            self._count_too_long()
            return
        self._feed_parsed(blocks, self.parser.parse_blocks)

    def feed_split(self, splitter: LineSplitter, data: bytes) -> list:
        """``feed`` through the caller's own splitter (the file follower reads several files at
        once, each with its own partial line); returns the complete lines."""
        blocks = splitter.feed_blocks(data)
        if blocks is None:
            lines = splitter.feed(data)
            self.feed_lines(lines)
            self._count_too_long(splitter)
            return lines
        self._feed_parsed(blocks, self.parser.parse_blocks)
        return [line for block in blocks for line in block.split(b"\n") if line]

    def feed_lines(self, lines: list) -> None:
        """Take complete lines (no line ends)."""
        self._feed_parsed(lines, self.parser.parse_lines)

    def _feed_parsed(self, lines: list, parse: Callable) -> None:
        stats = self.stats
        rejected: Dict[str, int] = {}
        records, events = parse(lines, rejected)
        stats.lines += len(records) + sum(rejected.values()) + len(events)
        if rejected:
            counts = stats.rejected
            for reason, n in rejected.items():
                counts[reason] += n
        done = 0
        for at, event in events:
            if at > done:
                self._add(records, done, at)
                done = at
            if type(event) is Heartbeat:
                stats.lines -= 1
                stats.heartbeats += 1
                self.heartbeat = event
                if self._gap is not None:
                    self._gap_ends(event.time)
            else:
                assert type(event) is Gap
                stats.lost += event.lost
                self._gap_begins(event)
        if done < len(records):
            self._add(records, done, len(records))

    def _add(self, records: List[Record], start: int, end: int) -> None:
        """Records ``start`` to ``end`` into the model; replay's intervals are closed as the
        records' time makes them due."""
        if self._gap is not None:
            self._gap_ends(records[start][0])
        self.last_time = records[end - 1][0]
        if start or end < len(records):
            records = records[start:end]
        model = self.model
        on_time = self.on_time
        if on_time is None:
            model.add_records(records)
            return
        while records:
            # before the first record the model has no due time: stop after that record
            due = model.due_at if model.reported is not None else -math.inf
            taken = model.add_records(records, due)
            time = records[taken - 1][0]
            if time >= due:
                on_time(time)
            if taken == len(records):
                return
            records = records[taken:]

    def _gap_begins(self, gap: Gap) -> None:
        if self._gap is not None:
            self._gap_ends(None)
        self._gap = (gap.lost, gap.seq, self.last_time)

    def _gap_ends(self, after: Optional[float]) -> None:
        """Log the records lost in a gap with the time range they belong to."""
        assert self._gap is not None
        lost, seq, before = self._gap
        self._gap = None
        self.log.warn(
            "the exporter lost {lost} records (sequence {first_seq} to {last_seq}): requests "
            "logged between {since} and {until} are missing from the intervals; nginx's "
            "access log has them", lost=lost, first_seq=seq - lost, last_seq=seq - 1,
            since="(unknown)" if before is None else start_time(int(before)),
            until="(unknown)" if after is None else start_time(math.ceil(after)),
            before=before, after=after)

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
