"""The service's own figures: one set of counters that the log line and the metrics both read."""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Deque, Dict, Optional, Tuple

from .settings import StreamerKey

HISTORY_POINTS = 720
"""Intervals each stream's history keeps: an hour at 5-second intervals (the status page)."""
SAMPLES_PER_REASON = 10
"""Recent rejected URLs kept per rejection reason (the status page)."""
SAMPLE_CHARS = 200
"""A sampled URL is cut to this many characters."""

Point = Tuple[Optional[float], int, int]
"""One reported interval of one stream: its start (None where the reporter did not say),
clients, bytes."""


def _history() -> Deque[Point]:
    return deque(maxlen=HISTORY_POINTS)


@dataclass
class StreamFigures:
    """One configured streamer's last reported interval, its bytes since start, and its
    recent intervals (bounded, in memory only)."""

    clients: int = 0
    bytes: int = 0
    bytes_total: int = 0
    history: Deque[Point] = field(default_factory=_history)


@dataclass
class Stats:
    """Cumulative counters since start; plain data, updated in place by the components."""

    lines: int = 0
    accepted: int = 0
    rejected: Counter = field(default_factory=Counter)
    late: int = 0
    before_start: int = 0
    lost: int = 0
    folded: int = 0
    datasets_sent: int = 0
    datasets_dropped: int = 0
    datasets_trimmed: int = 0
    queued: int = 0
    exporter_reconnects: int = 0
    exporter_connected: bool = False
    source_connected: bool = False
    """The source is reading: the exporter's stream is open, or the followed file is."""
    hub_connected: bool = False
    hub_reconnects: int = 0
    file_rotations: int = 0
    file_truncations: int = 0
    last_report: Optional[float] = None
    state_errors: int = 0
    heartbeats: int = 0
    exporter_protocol: int = 0
    """1 or 2 once an exporter answered (2: it sends heartbeats and its ring's identity)."""
    ring_size: Optional[int] = None
    """Records the exporter's ring holds, from its last heartbeat (its oldest to its newest)."""
    ring_history: Optional[float] = None
    """Seconds of traffic the ring holds (its last heartbeat's time less its oldest record's):
    how long an outage or a restart may last before records are lost."""
    held: int = 0
    """Intervals due by the clock but not yet by the watermark (the exporter is unreachable
    or its backlog is being read)."""
    held_early: int = 0
    """Held intervals reported before the watermark passed them: the held cap was reached."""
    watermark_lag: Optional[float] = None
    """Seconds between the clock and the watermark at the last report check."""
    streams: Dict[StreamerKey, StreamFigures] = field(default_factory=dict)
    errors: Dict[str, int] = field(default_factory=dict)
    """Unexpected errors per component (lifecycle.Lifecycle.unexpected), since start."""
    states: Dict[str, str] = field(default_factory=dict)
    """Each long-lived component's current state (lifecycle.Lifecycle)."""
    intervals_covered: int = 0
    """Intervals reported whole: the watermark passed them and no announced loss overlaps."""
    intervals_partial: int = 0
    """Intervals reported with what is known: a loss overlaps them, or --max-delay, the held
    cap or a stop cut them short."""
    intervals_withheld: int = 0
    """Intervals not reported: the source never vouched for them (see the README)."""
    records_withheld: int = 0
    """Records that arrived for an interval already given up as withheld (a replay counts
    them; they are not added to another interval)."""
    covered: Optional[bool] = None
    """Whether the running interval is covered so far (None: not known yet); /healthz."""
    drops: Counter = field(default_factory=Counter)
    """Datasets dropped, by reason (queue-full, too-large, sink-error, ...): see drop()."""
    rejected_samples: Dict[str, Deque[str]] = field(default_factory=dict)
    """Recent rejected URLs by reason (bounded, truncated): see sample_rejection(). Never a
    client address or user agent."""

    warnings: Counter = field(default_factory=Counter)
    """Misconfiguration warnings raised, by condition (conditions.py; not-sfive-log and
    not-an-exporter from the sources): each counts once per change of condition."""

    def reject(self, reason: str) -> None:
        self.rejected[reason] += 1

    def sample_rejection(self, reason: str, url: str) -> None:
        """Keep ``url`` among the last few rejected for ``reason``: without its query string
        (it may carry a secure link's token; kept as "?…") and cut to SAMPLE_CHARS."""
        samples = self.rejected_samples.get(reason)
        if samples is None:
            samples = self.rejected_samples[reason] = deque(maxlen=SAMPLES_PER_REASON)
        path, query, _ = url.partition("?")
        if query:
            path += "?\u2026"
        if len(path) > SAMPLE_CHARS:
            path = path[:SAMPLE_CHARS - 1] + "\u2026"
        samples.append(path)

    def drop(self, reason: str, n: int = 1) -> None:
        """Count ``n`` datasets dropped for ``reason`` (and in ``datasets_dropped``)."""
        self.datasets_dropped += n
        self.drops[reason] += n

    def reported(self, streamer: StreamerKey, clients: int, sent: int,
                 start: Optional[float] = None) -> None:
        """Remember a streamer's figures from the interval (starting at ``start``, if given)
        just reported."""
        figures = self.streams.get(streamer)
        if figures is None:
            figures = self.streams[streamer] = StreamFigures()
        figures.clients = clients
        figures.bytes = sent
        figures.bytes_total += sent
        figures.history.append((start, clients, sent))
