"""Misconfiguration said out loud: conditions that make the service count nothing (or less than
it should) while it seems to run normally, each warned about once when it begins and once when
it ends.

The reporter feeds ``Conditions.check`` the Stats at each report; it compares them with the last
report's and returns what to log. The conditions (README, "What the warnings mean"):

- ``nothing-accepted``: lines were read, none of them accepted;
- ``unknown-streamer``: records of a stream that is not among -S;
- a format reason (FORMAT_REASONS): more than FORMAT_SHARE of the lines rejected for it.

``url-mismatch`` alone is no warning: a log at ``http{}`` level sees other sites' requests.
Hysteresis: a condition is raised on one report that shows it and cleared only after
CLEAR_AFTER reports in a row that read lines and do not (for a format reason: at most
CLEAR_SHARE of the lines); reports without lines say nothing either way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Optional, Tuple

from .records import RecordParser
from .settings import Settings, StreamerKey
from .stats import Stats

FORMAT_REASONS = ("invalid-utf8", "invalid-json", "not-an-object", "missing-field", "wrong-type",
                  "bad-time")
"""Rejections that mean the lines are not written in the sfive format (nginx/sfive-log.conf)."""
WARNINGS = ("nothing-accepted", "unknown-streamer", *FORMAT_REASONS, "not-sfive-log",
            "not-an-exporter")
"""Every warning (``Stats.warnings``), so that the metrics can list them all from the start; the
last two are the sources' (follow.py, fetch.py)."""
FORMAT_SHARE = 0.01
"""A format reason above this share of a report's lines raises its warning..."""
CLEAR_SHARE = 0.001
"""... and at most this share, CLEAR_AFTER reports in a row, clears it."""
CLEAR_AFTER = 3
EXAMPLES = 3
"""Example URLs per warning (the most recent of the reason's samples)."""
EXAMPLE_CHARS = 100
LOG_CONF = "nginx/sfive-log.conf"
_MEANING = {
    "invalid-utf8": "lines that are not UTF-8",
    "invalid-json": "lines that are not JSON",
    "not-an-object": "lines that are JSON but not an object",
    "missing-field": "records without one of the fields url, client, ua, time, status, "
                     "bytes-sent",
    "wrong-type": "records with a field of another type than the sfive format's",
    "bad-time": "records whose time is not ISO 8601 with a UTC offset ($time_iso8601)",
}
_REQUEST = re.compile(rb'^\S+ \S+ \S+ \[[^\]]+\] "[A-Z]+ (\S+)')
"""nginx's text formats (``combined``, ``main``, ``common``): the request line's URL."""


class Change(NamedTuple):
    """One change of condition: ``raised`` (a warning) or not (it cleared: an info line)."""

    condition: str
    raised: bool
    text: str


@dataclass
class Condition:
    """One condition's hysteresis: whether it is raised, and the clean reports since."""

    active: bool = False
    clean: int = 0

    def update(self, bad: bool, clean: bool) -> Optional[bool]:
        """Feed one report (``bad``: it shows the condition; ``clean``: it shows it absent).
        True when the condition is raised now, False when it clears now, else None."""
        if bad:
            self.clean = 0
            if not self.active:
                self.active = True
                return True
        elif clean and self.active:
            self.clean += 1
            if self.clean >= CLEAR_AFTER:
                self.active = False
                self.clean = 0
                return False
        return None


@dataclass
class Conditions:
    """The conditions of one service, fed by its reporter."""

    settings: Settings
    parser: Optional[RecordParser] = None
    """For "parsed as" (its ``url_match``); default: one of its own under ``settings``."""
    state: Dict[str, Condition] = field(default_factory=dict)
    _lines: int = 0
    _rejected: Dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.parser is None:
            self.parser = RecordParser(self.settings)

    def check(self, stats: Stats) -> List[Change]:
        """What changed since the last report; counts each raised one in ``stats.warnings``."""
        lines = stats.lines - self._lines
        rejected = {r: n - self._rejected.get(r, 0) for r, n in stats.rejected.items()}
        self._lines = stats.lines
        self._rejected = dict(stats.rejected)
        if lines <= 0:
            return []
        refused = sum(rejected.values())
        out: List[Change] = []
        changes = [("nothing-accepted", refused >= lines, refused < lines),
                   ("unknown-streamer", rejected.get("unknown-streamer", 0) > 0,
                    rejected.get("unknown-streamer", 0) == 0)]
        for reason in FORMAT_REASONS:
            share = rejected.get(reason, 0) / lines
            changes.append((reason, share > FORMAT_SHARE, share <= CLEAR_SHARE))
        for name, bad, clean in changes:
            changed = self.state.setdefault(name, Condition()).update(bad, clean)
            if changed is None:
                continue
            if changed:
                stats.warnings[name] += 1
                text = self._raised(name, stats, lines, rejected)
            else:
                text = self._cleared(name)
            out.append(Change(name, changed, text))
        return out

    def _raised(self, name: str, stats: Stats, lines: int, rejected: Dict[str, int]) -> str:
        if name == "nothing-accepted":
            reasons = sorted(((n, r) for r, n in rejected.items() if n > 0), reverse=True)
            why = ", ".join(f"{r} {n}" for n, r in reasons) or "none rejected"
            examples = "; ".join(self.examples(stats, r) for _, r in reasons[:2]
                                 if stats.rejected_samples.get(r))
            fix = (f"write the log in the sfive format ({LOG_CONF})"
                   if reasons and reasons[0][1] in FORMAT_REASONS else "check -F and -S")
            return (f"nothing counted: none of the {lines} lines read since the last report "
                    f"was accepted ({why}); the datasets hold no viewers: {fix} "
                    f"(sfive-ngxlua-check with the service's options shows what counts)"
                    + (f"; e.g. {examples}" if examples else ""))
        n = rejected.get(name, 0)
        examples = self.examples(stats, name)
        tail = f"; e.g. {examples}" if examples else ""
        if name == "unknown-streamer":
            return (f"{n} records since the last report are of streams not among -S (not "
                    f"counted): add them with -S, or fix -F{tail}")
        return (f"{n} of the {lines} lines since the last report ({100 * n / lines:.0f}%) were "
                f"rejected as {name}: {_MEANING[name]}; the log must be written in the sfive "
                f"format ({LOG_CONF}){tail}")

    @staticmethod
    def _cleared(name: str) -> str:
        if name == "nothing-accepted":
            return "records are counted again (nothing-accepted cleared)"
        return (f"no more {name} rejections for {CLEAR_AFTER} reports ({name} cleared)"
                if name == "unknown-streamer" else
                f"{name} rejections are back below {CLEAR_SHARE:.1%} of the lines "
                f"({name} cleared)")

    def examples(self, stats: Stats, reason: str) -> str:
        """Up to EXAMPLES of the reason's recent URLs, each with what -F made of it."""
        seen: List[str] = []
        for url in reversed(stats.rejected_samples.get(reason, ())):
            if url not in seen:
                seen.append(url)
            if len(seen) == EXAMPLES:
                break
        return ", ".join(f"{reason} {_cut(url)} ({self.parsed_as(url)})" for url in seen)

    def parsed_as(self, url: str) -> str:
        """What the name format (-F) makes of ``url``, and whether that is among -S."""
        assert self.parser is not None
        m = self.parser.url_match(url)
        key = None if m is None else (m.group("content"), m.group("format"), m.group("quality"))
        return parsed_as(key, self.settings)


def parsed_as(key: Optional[StreamerKey], settings: Settings) -> str:
    """What the name format (-F) made of a URL (``key``: its content, format and quality, or
    None where -F does not match it), and whether that is among -S (the warnings' examples
    and sfive-ngxlua-check's)."""
    if key is None:
        return "not matched by -F"
    among = key in settings.streamers
    return f"parsed as {'/'.join(key)}" + ("" if among else ", which is not among -S")


def rejected_url(parser: RecordParser, line: bytes) -> Optional[str]:
    """The URL of a rejected line, for the samples: its ``url`` field, or the request's URL of a
    line in one of nginx's text formats; never anything else of the line."""
    url = parser.url_of(line)
    if url is None:
        m = _REQUEST.match(line)
        if m is not None:
            url = m.group(1).decode("utf-8", "replace")
    return url


def records_read(stats: Stats) -> int:
    """Lines read that were exporter lines in form (records, heartbeats, gap lines), whatever
    their content: whether a source is an exporter at all."""
    bad = sum(stats.rejected.get(r, 0) for r in FORMAT_REASONS) + stats.rejected.get("too-long", 0)
    return stats.lines + stats.heartbeats - bad


def text_log(line: bytes) -> bool:
    """Whether ``line`` is in one of nginx's text formats (``combined``, ``main``, ``common``)."""
    return _REQUEST.match(line) is not None


def not_sfive(parser: RecordParser, lines: List[bytes]) -> Optional[str]:
    """Why a log whose first lines are ``lines`` is not in the sfive format, or None if most of
    them are records (rejected or not for what they say, not for their form)."""
    verdict = format_verdict(parser, lines)
    if verdict is None:
        return None
    what, bad = verdict
    if what == TEXT_LOG:
        return "its lines are in one of nginx's text formats (combined?), not JSON"
    return f"{bad} of its first {len(lines)} lines are {_MEANING[what]} ({what})"


TEXT_LOG = "text-log"
"""``format_verdict``'s name for lines in one of nginx's text formats."""


def format_verdict(parser: RecordParser, lines: List[bytes]) -> Optional[Tuple[str, int]]:
    """None if most of ``lines`` are records in the sfive format (whatever they say); else
    what they are (TEXT_LOG, or the commonest of FORMAT_REASONS) and how many are not in the
    format. The one rule for the follower's check of a file and sfive-ngxlua-check's."""
    if not lines:
        return None
    seq = parser.last_seq
    try:
        reasons = [parser.parse(line) for line in lines]
    finally:
        parser.last_seq = seq
    bad = [r for r in reasons if isinstance(r, str) and r in FORMAT_REASONS]
    if 2 * len(bad) <= len(lines):
        return None
    if sum(map(text_log, lines)) * 2 > len(lines):
        return TEXT_LOG, len(bad)
    return max(set(bad), key=bad.count), len(bad)


def _cut(url: str) -> str:
    return url if len(url) <= EXAMPLE_CHARS else url[:EXAMPLE_CHARS - 1] + "\u2026"
