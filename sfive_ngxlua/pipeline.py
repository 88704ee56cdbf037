"""Exporter bytes → lines → records → model: the one ingest path of the service and replay."""

from __future__ import annotations

import bisect
import math
from typing import Callable, Dict, List, Optional, Tuple

from twisted.logger import Logger

from .conditions import rejected_url
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
        self._sample_at: Dict[str, int] = {}
        """Per rejection reason, the line count from which on its next rejection is sampled:
        one sample per reason and read (``_sample``)."""
        self.handled = 0
        """How many lines the last ``feed_lines`` folded into the model and counted: all of
        them, or, if it raised, those before the line that raised (the caller reads again from
        that line; ``last_seq`` is the sequence number before it)."""
        self._folded = 0
        self._adding = False
        """Records of the current feed in the model so far, and whether ``add_records`` is
        running (if it raises, ``model.taken`` says how many more it took)."""

    def feed(self, data: bytes) -> None:
        """Take a chunk of the stream, cut anywhere."""
        blocks = self.splitter.feed_blocks(data)
        if blocks is None:
            self.feed_lines(self.splitter.feed(data))
            self._count_too_long()
            return
        self._feed_parsed(blocks, True)

    def feed_split(self, splitter: LineSplitter, data: bytes, skip: int = 0) -> list:
        """``feed`` through the caller's own splitter (the file follower reads several files at
        once, each with its own partial line); returns the complete lines. The first ``skip``
        lines are not fed (they were, before a feed that raised)."""
        self.handled = 0
        blocks = None if skip else splitter.feed_blocks(data)
        if blocks is None:
            lines = splitter.feed(data)
            self.feed_lines(lines[skip:] if skip else lines)
            self._count_too_long(splitter)
            return lines
        self._feed_parsed(blocks, True)
        return _cut(blocks)

    def feed_lines(self, lines: list) -> None:
        """Take complete lines (no line ends)."""
        self._feed_parsed(lines, False)

    def _feed_parsed(self, lines: list, blocks: bool) -> None:
        """Lines (or, with ``blocks``, blocks of lines) into the model, each line's fate counted;
        ``last_seq`` moves on only as far as the model has folded (``_rewind``)."""
        stats = self.stats
        parser = self.parser
        parse = parser.parse_blocks if blocks else parser.parse_lines
        start_seq = parser.last_seq
        lines0, beats0, lost0 = stats.lines, stats.heartbeats, stats.lost
        rejected: Dict[str, int] = {}
        self._folded = 0
        self._adding = False
        done = events_done = 0
        parsed = False
        try:
            records, events = parse(lines, rejected)
            stats.lines += len(records) + sum(rejected.values()) + len(events)
            if rejected:
                counts = stats.rejected
                for reason, n in rejected.items():
                    counts[reason] += n
            parsed = True
            if rejected:
                sample_at = self._sample_at
                due = [reason for reason in rejected if stats.lines >= sample_at.get(reason, 0)]
                if due:
                    self._sample(due, lines, blocks)
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
                events_done += 1
            if done < len(records):
                self._add(records, done, len(records))
        except Exception:
            if not parsed:  # nothing handled
                parser.last_seq = start_seq
                stats.lines = lines0
                self.handled = 0
                raise
            folded = self._folded + (self.model.taken if self._adding else 0)
            self._rewind(_cut(lines) if blocks else lines,
                         folded, events_done, start_seq, rejected, (lines0, beats0, lost0))
            raise
        self.handled = len(records) + sum(rejected.values()) + len(events)

    def _add(self, records: List[Record], start: int, end: int) -> None:
        """Records ``start`` to ``end`` into the model (their clients as --client-ip says);
        replay's intervals are closed as the records' time makes them due."""
        if self._gap is not None:
            self._gap_ends(records[start][0])
        self.last_time = records[end - 1][0]
        if start or end < len(records):
            records = records[start:end]
        if self.addresses is not None:
            records = self._private(records)
        self._folded = start
        self.add_records(records)

    def add_records(self, records: List[Record]) -> None:
        """Records already past --client-ip into the model (``feed`` ends here; a parallel
        replay's leader adds the records a worker read), replay's intervals closed as they
        become due."""
        model = self.model
        on_time = self.on_time
        self._adding = True
        model.taken = 0
        if on_time is None:
            model.add_records(records)
            self._adding = False
            return
        while records:
            # before the first record the model has no due time: stop after that record
            due = model.due_at if model.reported is not None else -math.inf
            taken = model.add_records(records, due)
            self._adding = False
            self._folded += taken
            time = records[taken - 1][0]
            if time >= due:
                on_time(time)
            if taken == len(records):
                return
            records = records[taken:]
            self._adding = True
            model.taken = 0

    def _private(self, records: List[Record]) -> List[Record]:
        """The records with their clients as --client-ip says (the model gets plain tuples in
        Record layout)."""
        out: List[Record] = []
        put = self.addresses.wrap(out.append)  # type: ignore[union-attr,arg-type]
        for record in records:
            put(record)
        return out

    def _sample(self, reasons: List[str], lines: List[bytes], blocks: bool) -> None:
        """Keep the URL of the first line rejected for each of ``reasons`` among the reason's
        samples (stats.sample_rejection: the URL only, never the line's client or user agent).
        """
        firsts = self.parser.first_rejected
        for reason in reasons:
            self._sample_at[reason] = self.stats.lines + 1
            i = firsts[reason]
            line = _line_at(lines, self.parser.block_starts, i) if blocks else lines[i]
            url = rejected_url(self.parser, line)
            if url is not None:
                self.stats.sample_rejection(reason, url)

    def _rewind(self, lines: List[bytes], folded: int, events_done: int,
                start_seq: Optional[int], rejected: Dict[str, int],
                before: Tuple[int, int, int]) -> None:
        """Handling raised at record ``folded`` or event ``events_done`` (whichever line comes
        first): un-count that line and the lines after it, and set ``last_seq`` back to the
        last line handled before it, so that reading on from there neither skips nor counts
        anything twice. (The lines are parsed again one by one to find it.)"""
        stats = self.stats
        parser = self.parser
        parser.last_seq = start_seq
        seq = start_seq
        n_records = n_events = beats = lost = 0
        kept: Dict[str, int] = {}
        done = 0
        for line in lines:
            result = parser.parse(line)
            if type(result) is str:
                kept[result] = kept.get(result, 0) + 1
            elif type(result) is Heartbeat or type(result) is Gap:
                if n_events == events_done:
                    break
                n_events += 1
                if type(result) is Heartbeat:
                    beats += 1
                else:
                    lost += result.lost
            else:
                if n_records == folded:
                    break
                n_records += 1
            seq = parser.last_seq
            done += 1
        else:
            seq = parser.last_seq
        parser.last_seq = seq
        self.handled = done
        lines0, beats0, lost0 = before
        stats.lines = lines0 + done - beats
        stats.heartbeats = beats0 + beats
        stats.lost = lost0 + lost
        counts = stats.rejected
        for reason, n in rejected.items():
            counts[reason] -= n - kept.get(reason, 0)
            if not counts[reason]:
                del counts[reason]  # as if never counted

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


def _cut(blocks: List[bytes]) -> List[bytes]:
    """The lines of blocks (``LineSplitter.feed_blocks``), without the empty ones."""
    return [line for block in blocks for line in block.split(b"\n") if line]


def _line_at(blocks: List[bytes], starts: List[int], i: int) -> bytes:
    """Line ``i`` of blocks (as ``_cut`` numbers them), each block's first line numbered in
    ``starts`` (``RecordParser.block_starts``): only the block it is in is cut."""
    at = bisect.bisect_right(starts, i) - 1
    return [line for line in blocks[at].split(b"\n") if line][i - starts[at]]
