"""The status page ``/`` and the health check ``/healthz`` on the metrics endpoint.

Both read ``Stats`` at request time, like the metrics. The page is one self-contained HTML
document (inline style and SVG charts, no script, no external asset: it works on an air-gapped
edge) that refreshes itself once per interval. It shows configured streams, reasons and
component names, and rejected URLs, never a client address or user agent.
"""

from __future__ import annotations

import math
import time
from html import escape
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import Resource
from twisted.web.server import Request

from . import __version__
from .records import REASONS
from .settings import Settings
from .stats import Point, Stats, StreamFigures

DROP_REASONS = ("queue-full", "too-large", "sink-error", "commit-failed", "other")
"""Reasons a dataset is dropped, listed from the start; "other": counted without a reason."""
FAILING = frozenset({"retrying", "failed"})
"""Component states in which /healthz answers 503."""
STALE_INTERVALS = 3
"""/healthz answers 503 when no interval was reported for this many intervals (plus the
grace), counted from the start before the first report."""
HOUR = 3600.0


def components(settings: Settings, stats: Stats) -> Iterator[Tuple[str, str, bool]]:
    """Each component of this configuration (and any other that published a state or an
    error): its name, its current state ("unknown" before it published one), and whether it
    is failing."""
    expected = ["follow" if settings.file else "fetch", "report", "sink"]
    if settings.state_dir:
        expected.append("checkpoint")
    names = expected + sorted((set(stats.states) | set(stats.errors)) - set(expected))
    for name in names:
        state = stats.states.get(name, "unknown")
        yield name, state, state in FAILING


def health(settings: Settings, stats: Stats, now: float,
           started: Optional[float] = None) -> Tuple[bool, str]:
    """/healthz's verdict and its one-line reason.

    Unhealthy: a component is retrying or failed; the running interval is known not to be
    covered; the hub does not take datasets (not connected, or its queue is full); no interval
    was reported for ``STALE_INTERVALS`` intervals. Coverage not known yet (``covered`` None,
    e.g. before the source first vouched) is not a failure: the report check catches a source
    that never does.
    """
    failing = [f"{name} is {state} ({stats.errors.get(name, 0)} errors)"
               for name, state, bad in components(settings, stats) if bad]
    if failing:
        return False, "; ".join(failing)
    if stats.covered is False:
        return False, "the running interval is not covered (the source has not vouched for it)"
    if settings.socket or settings.hub:
        if not stats.hub_connected:
            return False, f"not connected to the hub at {settings.socket or settings.hub}"
        if stats.queued >= settings.queue_limit:
            return False, f"the hub queue is full ({stats.queued} datasets)"
    since = stats.last_report if stats.last_report is not None else started
    limit = STALE_INTERVALS * settings.duration + settings.grace
    if since is not None and now - since > limit:
        what = "no interval reported" if stats.last_report is not None else \
            "no interval reported since the start"
        return False, f"{what} for {now - since:.0f}s (more than {limit:.0f}s)"
    if stats.covered is None:
        return True, "ok (coverage of the running interval not known yet)"
    return True, "ok"


class HealthResource(Resource):
    """``/healthz``: 200 and "ok", or 503 and the reason, one line of plain text."""

    isLeaf = True

    def __init__(self, settings: Settings, stats: Stats, clock: IReactorTime,
                 started: Optional[float] = None) -> None:
        super().__init__()
        self.settings, self.stats, self.clock, self.started = settings, stats, clock, started

    def render_GET(self, request: Request) -> bytes:
        ok, reason = health(self.settings, self.stats, self.clock.seconds(), self.started)
        request.setResponseCode(200 if ok else 503)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        return reason.encode("utf-8") + b"\n"

    render_HEAD = render_GET


class NotFound(Resource):
    """404 for every other path, in one line that names the three there are."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setResponseCode(404)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return b"not found: the status page is /, the metrics /metrics, the health /healthz\n"

    render_HEAD = render_GET


class StatusPage(Resource):
    """``/``: the service at a glance, for a person with a browser; the root of the site,
    with ``/metrics`` and ``/healthz`` as its children."""

    def __init__(self, settings: Settings, stats: Stats, clock: IReactorTime,
                 started: Optional[float] = None) -> None:
        super().__init__()
        self.settings, self.stats, self.clock, self.started = settings, stats, clock, started

    def getChild(self, path: bytes, request: Request) -> Resource:
        return self if path == b"" else NotFound()

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        return render(self.settings, self.stats, self.clock.seconds(), self.started).encode()


def _when(t: Optional[float]) -> str:
    if t is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"  # pragma: no cover


def _row(*cells: str, header: bool = False) -> str:
    tag = "th" if header else "td"
    return "<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in cells) + "</tr>"


def last_hour(history: Sequence[Point], now: float, duration: int) -> List[Point]:
    """The points of the last hour: at most an hour's worth of intervals, and none that
    started more than an hour ago where the start is known."""
    slots = max(1, math.ceil(HOUR / duration))
    points = list(history)[-slots:]
    return [p for p in points if p[0] is None or p[0] >= now - HOUR]


CHART_COLUMNS = 180
"""The chart's columns at most: more intervals than that share a column (its peak shown)."""


def columns(points: Sequence[Point], duration: int) -> Dict[int, Tuple[int, int]]:
    """The chart's columns (of at most CHART_COLUMNS over the hour's interval slots, the last
    point in the last slot): column → the peak viewers and bytes of its points."""
    slots = max(1, math.ceil(HOUR / duration))
    width = min(slots, CHART_COLUMNS)
    first = slots - len(points)  # the oldest point's slot; slot k is in column k*width//slots
    clients = [p[1] for p in points]
    sent = [p[2] for p in points]
    peaks: Dict[int, Tuple[int, int]] = {}
    for column in range(max(0, first) * width // slots, width):
        lo = max(0, -(-column * slots // width) - first)
        hi = -(-(column + 1) * slots // width) - first
        if lo < hi:
            peaks[column] = (max(clients[lo:hi]), max(sent[lo:hi]))
    return peaks


def chart(points: Sequence[Point], duration: int, label: str) -> str:
    """An inline SVG chart of one stream's last hour: bytes as bars, viewers as a line, from
    left (an hour ago) to right (the last interval); intervals that share a column show their
    peak. One path per series keeps the page small."""
    width, height, pad, axis = 360, 64, 2, 12
    plot = height - axis - pad
    step = (width - 2 * pad) / min(max(1, math.ceil(HOUR / duration)), CHART_COLUMNS)
    peaks = columns(points, duration)
    peak_clients = max((c for c, _ in peaks.values()), default=0)
    peak_bytes = max((b for _, b in peaks.values()), default=0)
    top_clients, top_bytes = max(peak_clients, 1), max(peak_bytes, 1)
    base = pad + plot
    bars, line = [], []
    for column, (most_clients, most_bytes) in sorted(peaks.items()):
        x = pad + column * step
        h = plot * most_bytes / top_bytes
        if h > 0:
            bars.append(f"M{x:.1f} {base}v{-h:.1f}h{max(step, 2):.1f}v{h:.1f}z")
        y = base - plot * most_clients / top_clients
        line.append(f"{x + max(step, 2) / 2:.1f},{y:.1f}")
    peak = (f"peak {peak_clients} viewers, {_bytes(peak_bytes)}" if points
            else "no intervals yet")
    title = f"{escape(label)}: the last hour, {len(points)} intervals, {peak}"
    return (f'<svg class="chart" role="img" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" data-points="{len(points)}">'
            f"<title>{title}</title>"
            f'<rect class="frame" x="0" y="0" width="{width}" height="{base}"/>'
            f'<path class="bytes" d="{"".join(bars)}"/>'
            f'<polyline class="viewers" points="{" ".join(line)}"/>'
            f'<text x="{pad}" y="{height - 2}">1 h ago</text>'
            f'<text x="{width / 2:.0f}" y="{height - 2}" text-anchor="middle">{peak}</text>'
            f'<text x="{width - pad}" y="{height - 2}" text-anchor="end">now</text></svg>')


STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; background: #fff; }
h1 { font-size: 1.4em; margin: 0 0 .2em; } h2 { font-size: 1.1em; margin: 1.4em 0 .4em; }
table { border-collapse: collapse; } td, th { padding: .25em .7em; text-align: left;
  border-bottom: 1px solid #ddd; vertical-align: top; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
.ok { color: #176317; font-weight: bold; } .bad { color: #b00020; font-weight: bold; }
.muted { color: #777; } code { font-size: .95em; }
svg.chart .frame { fill: #f6f6f6; stroke: #ccc; }
svg.chart text { font-size: 9px; fill: #777; }
svg.chart .bytes { fill: #8fb8de; } svg.chart .viewers { fill: none; stroke: #c0392b;
  stroke-width: 1.5; }
.legend-bytes { color: #4a7fb0; } .legend-viewers { color: #c0392b; }
ul.samples { margin: 0; padding-left: 1.2em; } ul.samples code { word-break: break-all; }
"""


def _yes(flag: bool, yes: str, no: str) -> str:
    return f'<span class="ok">{yes}</span>' if flag else f'<span class="bad">{no}</span>'


def _state(state: str, bad: bool) -> str:
    kind = "bad" if bad else "muted" if state == "unknown" else "ok"
    return f'<span class="{kind}">{escape(state)}</span>'


def render(settings: Settings, stats: Stats, now: float, started: Optional[float] = None) -> str:
    """The status page as one HTML document."""
    s = stats
    ok, reason = health(settings, s, now, started)
    connected = s.source_connected
    out: List[str] = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="refresh" content="{settings.duration}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>sfive-ngxlua on {escape(settings.hostname)}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>sfive-ngxlua on {escape(settings.hostname)}</h1>",
        f'<p id="health">Health: {_yes(ok, "healthy", "unhealthy")} '
        f"&mdash; {escape(reason)} <span class=\"muted\">(<a href=\"healthz\">/healthz</a>, "
        f'<a href="metrics">/metrics</a>; version {escape(__version__)}; '
        f"{escape(_when(now))}; refreshes every {settings.duration}s)</span></p>",
        "<h2>Service</h2>", '<table id="service">',
    ]
    if settings.file:
        source = f"file <code>{escape(settings.file)}</code>"
    else:
        source = f"exporter <code>{escape(settings.url)}</code>"
        if s.exporter_protocol:
            source += f" (protocol {s.exporter_protocol})"
    out.append(_row("Source", source, _yes(connected, "connected", "not connected")))
    if settings.socket or settings.hub:
        hub = f"<code>{escape(settings.socket or settings.hub or '')}</code>"
        out.append(_row("Hub", hub, _yes(s.hub_connected, "connected", "not connected")))
        out.append(_row("Hub queue", f"{s.queued} of at most {settings.queue_limit} datasets",
                        f"{s.datasets_sent} sent, {s.datasets_dropped} dropped"))
    else:
        out.append(_row("Hub", "none: datasets go to standard output",
                        f"{s.datasets_sent} sent"))
    lag = "unknown" if s.watermark_lag is None else f"{s.watermark_lag:.1f}s"
    out.append(_row("Watermark lag", lag, f"{s.held} intervals held, {s.held_early} reported "
                    "early"))
    if settings.state_dir:
        state = (f"<code>{escape(settings.state_dir)}</code>",
                 _yes(not s.state_errors, "no errors", f"{s.state_errors} errors"))
    else:
        state = ("none (a restart loses the running interval and the queue)", "")
    out.append(_row("State dir", *state))
    covered = {None: "not known yet", True: "covered so far", False: "not covered"}[s.covered]
    out.append(_row("Intervals", f"running interval: {covered}; last report "
                    f"{escape(_when(s.last_report))}",
                    f"{s.intervals_covered} covered, {s.intervals_partial} partial, "
                    f"{s.intervals_withheld} withheld ({s.records_withheld} records)"))
    out.append(_row("Lines", f"{s.lines} read, {s.accepted} accepted, "
                    f"{sum(s.rejected.values())} rejected",
                    f"{s.late} late, {s.lost} lost, {s.before_start} before the start"))
    out.append("</table>")

    out += ["<h2>Components</h2>", '<table id="components">',
            _row("Component", "State", '<span class="n">Errors</span>', header=True)]
    for name, current, bad in components(settings, s):
        out.append(_row(escape(name), _state(current, bad), str(s.errors.get(name, 0))))
    out.append("</table>")

    out += [f"<h2>Streams</h2><p class=\"muted\">The last interval of {settings.duration}s; "
            'the chart: the last hour, <span class="legend-bytes">bytes</span> as bars, '
            '<span class="legend-viewers">viewers</span> as a line.</p>',
            '<table id="streams">',
            _row("Stream", '<span class="n">Viewers</span>', '<span class="n">Bytes</span>',
                 '<span class="n">Bytes since start</span>', "Last hour", header=True)]
    none = StreamFigures()
    for streamer in settings.streamers:
        figures = s.streams.get(streamer, none)
        name = "/".join(streamer)
        points = last_hour(figures.history, now, settings.duration)
        out.append(f'<tr class="stream" data-stream="{escape(name)}">'
                   f"<td><code>{escape(name)}</code></td>"
                   f'<td class="n viewers">{figures.clients}</td>'
                   f'<td class="n bytes" title="{figures.bytes} bytes">{_bytes(figures.bytes)}</td>'
                   f'<td class="n">{_bytes(figures.bytes_total)}</td>'
                   f"<td>{chart(points, settings.duration, name)}</td></tr>")
    out.append("</table>")

    out += ["<h2>Rejections</h2>", '<table id="rejections">',
            _row("Reason", '<span class="n">Lines</span>', "Recent URLs", header=True)]
    reasons = list(REASONS) + sorted((set(s.rejected) | set(s.rejected_samples)) -
                                     set(REASONS))
    for reason in reasons:
        samples = s.rejected_samples.get(reason, ())
        urls = ("<ul class=\"samples\">" + "".join(
            f"<li><code>{escape(url)}</code></li>" for url in reversed(samples)) + "</ul>"
            if samples else '<span class="muted">&ndash;</span>')
        out.append(f'<tr data-reason="{escape(reason)}"><td>{escape(reason)}</td>'
                   f'<td class="n">{s.rejected.get(reason, 0)}</td><td>{urls}</td></tr>')
    out.append("</table>")

    out += ["<h2>Dropped datasets</h2>", '<table id="drops">',
            _row("Reason", '<span class="n">Datasets</span>', header=True)]
    unexplained = max(0, s.datasets_dropped - sum(s.drops.values()))
    for reason in list(DROP_REASONS) + sorted(set(s.drops) - set(DROP_REASONS)):
        n = s.drops.get(reason, 0) + (unexplained if reason == "other" else 0)
        out.append(f'<tr><td>{escape(reason)}</td><td class="n">{n}</td></tr>')
    out.append("</table></body></html>")
    return "\n".join(out)
