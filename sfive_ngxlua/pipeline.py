"""Exporter bytes → lines → records → model: the one ingest path of the service and replay."""

from __future__ import annotations

import math
from typing import Callable, Optional

from .lines import LineSplitter
from .model import IntervalModel
from .records import Gap, Record, RecordParser
from .settings import Settings
from .stats import Stats


class Pipeline:
    """Feeds exporter output into the interval model and counts every line's fate in ``stats``."""

    def __init__(self, settings: Settings, stats: Stats, model: IntervalModel,
                 on_time: Optional[Callable[[int], None]] = None) -> None:
        """``on_time``: for replay, where time comes from the records: called with a record's
        time whenever it makes the next interval due."""
        self.on_time = on_time
        self.stats = stats
        self.model = model
        self.parser = RecordParser(settings)
        self.splitter = LineSplitter(settings.max_line_length)

    def feed(self, data: bytes) -> None:
        """Take a chunk of the stream, cut anywhere."""
        self.feed_lines(self.splitter.feed(data))
        self._count_too_long()

    def feed_split(self, splitter: LineSplitter, data: bytes) -> list:
        """``feed`` through the caller's own splitter (the file follower reads several files at
        once, each with its own partial line); returns the complete lines."""
        lines = splitter.feed(data)
        self.feed_lines(lines)
        self._count_too_long(splitter)
        return lines

    def feed_lines(self, lines: list) -> None:
        """Take complete lines (no line ends)."""
        stats = self.stats
        parse = self.parser.parse
        add = self.model.add
        on_time = self.on_time
        due = math.inf if on_time is None else -math.inf
        stats.lines += len(lines)
        for line in lines:
            result = parse(line)
            if type(result) is Record:
                if add(result) and result.time >= due:
                    on_time(result.time)
                    due = self.model.due_at
            elif type(result) is str:
                stats.rejected[result] += 1
            elif type(result) is Gap:
                stats.lost += result.lost

    def cut(self) -> int:
        """The stream broke: discard the partial line (never parse half a record)."""
        self._count_too_long()
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
