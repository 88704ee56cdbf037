"""The C accelerator (``sfive_ngxlua._speedups``): built where it must be, its time parser
against the Python one, its memory and reference counts, its errors.

The differential test of its records, rejections and events against the Python full path is
tests/test_decode_paths.py (the accelerator is one of the decoders compared there).
"""

from __future__ import annotations

import calendar
import gc
import json
import os
import subprocess
import sys
import sysconfig
import tracemalloc
from collections import Counter
from datetime import datetime
from pathlib import Path

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from support import Exporter
from twisted.internet import reactor, task
from twisted.logger import formatEvent, globalLogPublisher

from sfive_ngxlua import records
from sfive_ngxlua.records import RecordParser, default_decoder
from sfive_ngxlua.service import build
from sfive_ngxlua.settings import Settings
from sfive_ngxlua.sinks import CallableSink
from sfive_ngxlua.stats import Stats

speedups = records._speedups
needs_speedups = pytest.mark.skipif(
    speedups is None, reason="the C accelerator is not built (scripts/setup builds it: "
    "setup.py build_ext --inplace, which needs gcc and the Python headers)")

SETTINGS = Settings(streamers=(("av", "hls", "high"),), hostname="h",
                    nameformat="/[^/]+/(?P<format>hls|dash)/(?P<content>.+)-(?P<quality>[^-]+)/.*")
ROOT = Path(__file__).resolve().parent.parent


def test_the_accelerator_is_built_in_the_tree_and_in_the_installed_package(tmp_path):
    """Under CI a build that silently fell back to pure Python fails here (setup.py declares the
    extension optional, so a failed compile does not fail the install)."""
    if speedups is None:
        pytest.skip("the C accelerator is not built in the source tree")
    assert Path(speedups.__file__).parent == ROOT / "sfive_ngxlua"
    assert RecordParser(SETTINGS).decoder == "c" or os.environ.get(records.PURE_ENV)
    site = sysconfig.get_paths()["purelib"]
    got = subprocess.run(
        [sys.executable, "-I", "-c", "import sfive_ngxlua; print(sfive_ngxlua.__file__)\n"
         "try:\n import sfive_ngxlua._speedups as s; print(s.__file__)\n"
         "except ImportError as e:\n print(e)"],
        cwd=tmp_path, capture_output=True, text=True, check=True).stdout.split("\n")
    if not got[0].startswith(site):
        pytest.skip(f"sfive_ngxlua is not installed in {site} (scripts/setup installs it)")
    if not got[1].startswith(site):
        pytest.skip(f"the package installed in {site} has no C accelerator: {got[1]}")


def test_the_pure_path_is_forced_by_the_environment(monkeypatch):
    monkeypatch.setenv(records.PURE_ENV, "1")
    assert default_decoder() in ("orjson", "json")
    assert RecordParser(SETTINGS).decoder in ("orjson", "json")
    monkeypatch.setenv(records.PURE_ENV, "0")
    assert default_decoder() == ("c" if speedups is not None else default_decoder())
    with pytest.raises(ValueError, match="not available"):
        RecordParser(SETTINGS, decoder="simdjson")


EDGES = [
    # leap years: every 4th, not every 100th, every 400th
    "2024-02-29T12:00:00Z", "2023-02-29T12:00:00Z", "1900-02-29T00:00:00Z",
    "2000-02-29T23:59:59Z", "2100-02-28T23:59:59Z", "2100-02-29T00:00:00Z",
    "2026-04-30T00:00:00Z", "2026-04-31T00:00:00Z", "2026-12-31T23:59:59Z",
    "2026-01-00T00:00:00Z", "2026-00-10T00:00:00Z", "2026-13-10T00:00:00Z",
    # the ends of the years datetime knows
    "0001-01-01T00:00:00Z", "0001-01-01T00:00:00+00:01", "0001-01-01T00:00:00-23:59",
    "9999-12-31T23:59:59Z", "9999-12-31T23:59:59-23:59", "9999-12-31T23:59:59+23:59",
    "0000-06-01T00:00:00Z", "1969-12-31T23:59:59Z", "1970-01-01T00:00:00Z",
    # offsets
    "2026-11-28T10:00:00+01:00", "2026-11-28T10:00:00+0100", "2026-11-28T04:30:00-05:30",
    "2026-11-28T10:00:00-00:00", "2026-11-28T10:00:00+23:59", "2026-11-28T10:00:00+24:00",
    "2026-11-28T10:00:00+01:60", "2026-11-28T10:00:00+01", "2026-11-28T10:00:00+1:00",
    "2026-11-28T10:00:00+01:00:00", "2026-11-28T10:00:00+01:0", "2026-11-28T10:00:00 +01:00",
    # fractions
    "2026-11-28T10:00:00.1Z", "2026-11-28T10:00:00,5Z", "2026-11-28T10:00:00.123456789Z",
    "2026-11-28T10:00:00.1234567890Z", "2026-11-28T10:00:00.Z", "2026-11-28T10:00:00..1Z",
    "2026-11-28T10:00:00.999999999+01:00",
    # times of day
    "2026-11-28T23:59:59Z", "2026-11-28T24:00:00Z", "2026-11-28T24:30:00Z", "2026-11-28T10:60:00Z",
    "2026-11-28T10:00:60Z", "2026-11-28T10:00:61Z",
    # other spellings: the Python path decides them
    "2026-11-28T10:00:00", "2026-11-28T10:00:00z", "2026-11-28 10:00:00Z",
    "20261128T100000Z", "2026-W48-5T10:00:00Z", "2026-11-28T10:00Z", "2026-11-28",
    "2026-11-28T10:00:00Z ", " 2026-11-28T10:00:00Z", "2026-11-28T10:00:00ZZ",
    "\uff12\uff10\uff12\uff16-11-28T10:00:00Z", "2026-11-28T10:00:0\u0661Z",
    "+2026-11-28T10:00:00Z",
    "2026-1-28T10:00:00Z", "", "Z", "2026-11-28T10:00:00\u00a0Z",
]
COMMON = [e for e in EDGES if e in (
    "2024-02-29T12:00:00Z", "2000-02-29T23:59:59Z", "2100-02-28T23:59:59Z",
    "0001-01-01T00:00:00+00:01", "0001-01-01T00:00:00-23:59", "9999-12-31T23:59:59Z",
    "9999-12-31T23:59:59+23:59", "1969-12-31T23:59:59Z", "2026-11-28T10:00:00+0100",
    "2026-11-28T04:30:00-05:30", "2026-11-28T10:00:00-00:00", "2026-11-28T10:00:00.1Z",
    "2026-11-28T10:00:00,5Z", "2026-11-28T10:00:00.123456789Z", "2026-11-28T23:59:59Z",
    "2026-11-28T10:00:00.999999999+01:00")]


@needs_speedups
@pytest.mark.parametrize("when", EDGES)
def test_the_c_time_parser_gives_what_the_python_one_gives_or_leaves_it(when):
    """Where the C parser gives a second, it is RecordParser.seconds'; the common forms it gives
    itself, everything unusual it leaves (None) to RecordParser.seconds."""
    python = RecordParser(SETTINGS, decoder="json").seconds(when)
    c = speedups.seconds(when.encode())
    if when in COMMON:
        assert c == python and c is not None
    else:
        assert c is None or c == python


@needs_speedups
@settings(max_examples=500, deadline=None, database=None)
@given(moment=st.datetimes(datetime(1, 1, 2), datetime(9999, 12, 30)),
       offset=st.integers(-(24 * 60 - 1), 24 * 60 - 1), digits=st.integers(0, 9),
       colon=st.booleans(), comma=st.booleans())
def test_the_c_time_parser_on_any_common_time(moment, offset, digits, colon, comma):
    """Any second of years 1-9999, any offset, 0-9 fraction digits: the C parser's second is
    RecordParser.seconds' and the calendar's."""
    head = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if len(head) != 19:  # strftime does not pad years before 1000 everywhere
        head = f"{moment.year:04d}" + head[head.index("-"):]
    fraction = ("," if comma else ".") + f"{moment.microsecond:06d}000"[:digits] if digits else ""
    sign = "-" if offset < 0 else "+"
    hours, minutes = divmod(abs(offset), 60)
    tail = "Z" if offset == 0 and colon else f"{sign}{hours:02d}{':' if colon else ''}{minutes:02d}"
    when = head + fraction + tail
    want = calendar.timegm(moment.replace(microsecond=0).timetuple()) - offset * 60
    assert speedups.seconds(when.encode()) == want
    assert RecordParser(SETTINGS, decoder="json").seconds(when) == want


def _block(n: int = 20) -> bytes:
    """Lines of every fate the accelerator meets: records (escapes, non-ASCII, invalid UTF-8),
    rejections it counts (status, url-truncated, URL) and lines it leaves (invalid JSON, a gap,
    a heartbeat, a bad time)."""
    def line(seq, **kw):
        obj = {"seq": seq, "time": "2026-11-28T10:00:00.003+01:00", "client": "10.0.0.1",
               "ua": 'Mozilla "quoted" \u00e9', "url": "/live/hls/av-high/1.ts", "status": 200,
               "bytes-sent": 1000 + seq, **kw}
        return json.dumps(obj).encode()

    lines = []
    for i in range(n):
        lines += [line(i), line(i, status=404), line(i, url=f"/nope/{i}"),
                  line(i, **{"url-truncated": True}), line(i, ua="\ud83d\ude00"),
                  line(i)[:-1] + b',"x":"\xff"}', b'{"seq":%d,"lost":2}' % i,
                  b'{"seq":%d,"hb":1764320400}' % i, line(i, time="yesterday"), b"{nope",
                  line(i, url=f"/live/hls/av-high/{'x' * 300}{i}")]
    return b"\n".join(lines)


@needs_speedups
@pytest.mark.parametrize("repair", [False, True])
def test_no_memory_is_kept_by_many_calls(repair):
    """Reference counts: thousands of calls over lines of every fate keep no memory
    (tracemalloc sees every object the C code allocates through Python's allocator), and the
    objects the calls share (the cached streamer, the URL cache) get their references back."""
    parser = RecordParser(SETTINGS, repair_utf8=repair, decoder="c")
    blocks = [_block()]
    streamer = ("av", "hls", "high")

    def run(times):
        for _ in range(times):
            rejected = Counter()
            records_, events = parser.parse_blocks(blocks, rejected)
            assert len(records_) == 60 + 20 * repair and len(events) == 40
            records_, events = parser.parse_lines(blocks[0].split(b"\n"), rejected)

    run(50)
    key = parser._urls["/live/hls/av-high/1.ts"]
    assert key == streamer
    gc.collect()
    refs = sys.getrefcount(key), sys.getrefcount(parser._urls)
    tracemalloc.start()
    try:
        run(10)
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        run(500)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 64 * 1024, f"{grown} bytes kept by 500 calls over 220 lines each"
    assert (sys.getrefcount(key), sys.getrefcount(parser._urls)) == refs
    many = [b"\n".join([b'{"time":"2026-11-28T10:00:00Z","client":"c","ua":"u","url":"/u",'
                         b'"status":404,"bytes-sent":1}'] * 400)]  # counts beyond small ints
    tracemalloc.start()
    try:
        parser.parse_blocks(many, Counter())
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(100):
            rejected = Counter()
            parser.parse_blocks(many, rejected)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert rejected == {"status": 400} and grown < 64 * 1024, grown


@needs_speedups
def test_an_error_in_the_url_look_up_is_raised_and_nothing_is_half_done():
    parser = RecordParser(SETTINGS, decoder="c")

    def broken(url):
        raise RuntimeError("boom")

    parser._streamer = broken
    parser.last_seq = 7
    with pytest.raises(RuntimeError, match="boom"):
        parser.parse_blocks([_block(1)], Counter())
    with pytest.raises(TypeError):
        speedups.scan(["not bytes"], True, 0, 0, 0, None, False, [], {}, {}, {}, broken,
                      frozenset(), None)
    with pytest.raises(TypeError):
        speedups.scan([], True, 0, 0, 0, None, False, [], {}, {}, {}, broken, frozenset())


@needs_speedups
@pytest.mark.parametrize("statuses, status, known", [
    (frozenset({200, 206}), 200, True), (frozenset({200, 206}), 404, False),
    (frozenset({200.0}), 200, True), (frozenset({True}), 1, True),
    (frozenset({2**70, 200}), 2**40, False), (frozenset({2**40}), 2**40, True),
    (frozenset({1023}), 1023, True), (frozenset({1024}), 1024, True), (frozenset(), 0, False),
    (frozenset({-5}), -5, True), (frozenset({200}), -1, False), (frozenset({-1}), -1, True),
])
def test_statuses_are_looked_up_as_the_set_does(statuses, status, known):
    """The accelerator reads small int statuses as bits: the set's own answer for any other."""
    line = json.dumps({"time": "2026-11-28T10:00:00Z", "client": "c", "ua": "u",
                       "url": "/live/hls/av-high/1.ts", "status": status, "bytes-sent": 1})
    parser = RecordParser(SETTINGS, decoder="c")
    got, rejected = [], {}
    speedups.scan([line.encode()], False, 0, 0, 0, None, False, got, rejected, {},
                  parser._urls, parser._streamer, statuses, None)
    assert (len(got), rejected) == ((1, {}) if known else (0, {"status": 1}))


@needs_speedups
def test_a_url_look_up_that_drops_the_block_does_not_leave_the_scan_on_freed_bytes():
    """The URL look-up runs Python code (the parser's ``_streamer``) in the middle of a block: the
    scan must hold the block it reads, not a borrowed reference that code can free (here by
    emptying the list of items, its only other reference, and taking the freed memory for
    bytes of the same size)."""
    parser = RecordParser(SETTINGS, decoder="c")
    line = (b'{"time":"2026-11-28T10:00:00Z","client":"c%d","ua":"u",'
            b'"url":"/live/hls/av-high/%d.ts","status":200,"bytes-sent":%d}')
    block = b"\n".join(line % (n, n, n) for n in range(4))
    items = [bytes(bytearray(block))]
    taken = []

    def streamer(url):
        items.clear()
        taken.extend(bytes(bytearray(b"x" * len(block))) for _ in range(8))
        return parser._streamer(url)

    got, rejected = [], {}
    speedups.scan(items, True, 0, 0, 0, None, False, got, rejected, {}, {}, streamer,
                  SETTINGS.statuses, None)
    assert [(r[2], r[4]) for r in got] == [(f"c{n}", n) for n in range(4)] and not rejected


@needs_speedups
def test_a_scan_from_before_its_items_is_refused():
    """``i`` and ``pos`` index the list and the block in C: negative ones would read before
    them (memchr from before the bytes, the list's slot -1), so they are refused."""
    args = (None, False, [], {}, {}, {}, str, frozenset(), None)
    with pytest.raises(ValueError, match="negative"):
        speedups.scan([b'{"a":1}\n{"b":2}'], True, 0, -5, 0, *args)
    with pytest.raises(ValueError, match="negative"):
        speedups.scan([b'{"a":1}'], True, -1, 0, 0, *args)
    with pytest.raises(TypeError):
        speedups.scan([b'{"a":1}'], True, "0", 0, 0, *args)


@pytest_twisted.inlineCallbacks
def test_the_service_logs_its_decoder_at_start():
    """One line at start says which decoder the service's parser uses (real exporter, real
    reactor for the networking, a task.Clock for the timers)."""
    exporter = Exporter().listen()
    clock = task.Clock()
    events = []
    globalLogPublisher.addObserver(events.append)
    stats = Stats()
    service = build(Settings(streamers=(("av", "hls", "high"),), hostname="h",
                             url=exporter.url()), reactor,
                    sink=CallableSink(lambda dataset: None, stats), clock=clock, stats=stats)
    try:
        service.startService()
        said = [e for e in events if e.get("log_format", "").startswith("lines decoded by")]
        decoder = service.pipeline.parser.decoder
        assert [(e["decoder"], formatEvent(e)) for e in said] == [
            (decoder, f"lines decoded by {records.DECODER_NAMES[decoder]} ({decoder})")]
        assert decoder == ("c" if speedups is not None else default_decoder())
    finally:
        globalLogPublisher.removeObserver(events.append)
        yield service.stopService()
        yield exporter.stop()


@pytest.mark.parametrize("options", ["sfive_ngxlua.replay:ReplayOptions",
                                     "sfive_ngxlua.check:CheckOptions",
                                     "sfive_ngxlua.settings:Options"])
def test_version_says_which_decoder(options, capsys):
    module, name = options.split(":")
    cls = getattr(__import__(module, fromlist=[name]), name)
    with pytest.raises(SystemExit):
        cls().parseOptions(["--version"])
    assert capsys.readouterr().out.rstrip().endswith(f"lines decoded by {default_decoder()})")
