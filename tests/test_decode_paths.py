"""The piece-at-a-time decoding (one decoder call for many lines) against one line at a time.

``RecordParser.parse_lines`` and ``parse_blocks`` decide many lines in one call: by the C
accelerator (``sfive_ngxlua._speedups``) where it is built, which leaves every line it cannot
decide to the Python full path; else a piece at a time, by orjson where it is installed and by
the standard library's decoder otherwise, falling back to one line at a time where a piece
fails. ``parse`` decodes one line alone: the reference. On arbitrary and hostile lines, every
decoder the parser may pick and every piece size must give the same records, rejection
reasons, gaps, heartbeats and sequence numbers as ``parse`` of each line, with and without
UTF-8 repair.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sfive_ngxlua import records as records_module
from sfive_ngxlua.records import Gap, Heartbeat, Record, RecordParser
from sfive_ngxlua.settings import Settings

SETTINGS = Settings(streamers=(("av", "hls", "high"), ("av", "dash", "low")), hostname="h",
                    nameformat="/[^/]+/(?P<format>hls|dash)/(?P<content>.+)-(?P<quality>[^-]+)/.*")

DECODERS = ["json"] + (["orjson"] if records_module.orjson is not None else []) + (
    ["c"] if records_module._speedups is not None else [])

texts = st.one_of(
    st.sampled_from(["1.2.3.4", "ua", "Mozilla/5.0 (X11)", "/live/hls/av-high/1.ts",
                     "/live/dash/av-low/2.m4s", "/live/hls/zz-high/1.ts", "/x",
                     "2026-11-28T10:00:00.003+01:00", "2026-11-28T09:00:01Z",
                     "2026-11-28T10:00:00", "yesterday", "{", "}", "},\n{", '"', "\\",
                     "\ud800", "\x00", "\u2028", "é", ""]),
    st.text(max_size=12))
numbers = st.one_of(
    st.sampled_from([200, 206, 304, 0, -1, 2**53, 2**63, 2**64, 10**30, -(10**20), 1.0, 1.5,
                     1e300, 7]),
    st.integers(-5, 10**6))
values = st.one_of(texts, numbers, st.none(), st.booleans(), st.lists(numbers, max_size=2),
                   st.dictionaries(st.sampled_from(["a", "url"]), numbers, max_size=2))
keys = st.sampled_from(["seq", "time", "client", "ua", "url", "status", "bytes-sent", "lost",
                        "hb", "x", "url-truncated", "oldest", "oldest-time"])


@st.composite
def record_lines(draw) -> bytes:
    """An exporter-like object: right fields mostly, any order, duplicates, wrong types."""
    pairs = []
    base = {"seq": draw(st.integers(0, 50)), "time": draw(st.sampled_from(
        ["2026-11-28T10:00:00.003+01:00", "2026-11-28T09:00:01Z", "2026-11-28T09:00:05,5Z"])),
        "client": draw(texts), "ua": draw(texts), "url": draw(st.sampled_from(
            ["/live/hls/av-high/1.ts", "/live/dash/av-low/2.m4s", "/live/hls/zz-high/1.ts",
             "/x"])), "status": draw(st.sampled_from([200, 206, 404])),
        "bytes-sent": draw(st.integers(0, 10**7))}
    for key, value in base.items():
        if not draw(st.integers(0, 15)) == 0:
            pairs.append((key, value))
    if draw(st.integers(0, 7)) == 0:  # the exporter cut the URL (max_url_bytes)
        pairs.append(("url-truncated", draw(st.one_of(st.just(True), values))))
    for _ in range(draw(st.integers(0, 2))):
        pairs.append((draw(keys), draw(values)))
    pairs = draw(st.permutations(pairs))
    body = ",".join(json.dumps(k) + ":" + (json.dumps(v, ensure_ascii=draw(st.booleans())))
                    for k, v in pairs)
    return ("{" + body + "}").encode("utf-8", "surrogatepass")


TIMES = [
    "2026-11-28T10:00:00.003+01:00", "2026-11-28T09:00:01Z", "2026-11-28T09:00:05,5Z",
    "2026-11-28T10:00:00+0100", "2026-11-28T04:30:00-05:30", "2024-02-29T23:59:59.123456789Z",
    "2023-02-29T00:00:00Z", "2026-11-28T09:00:01.1234567890Z", "0000-01-01T00:00:00Z",
    "0001-01-01T00:00:00+00:01", "9999-12-31T23:59:59-23:59", "2026-11-28T24:00:00Z",
    "2026-11-28T10:00:60Z", "2026-11-28T10:00:00+24:00", "2026-11-28T10:00:00+01:60",
    "2026-11-28T10:00:00z", "2026-11-28 10:00:00Z", "20261128T100000Z", "2026-W48-5T10:00:00Z",
    "\uff12\uff10\uff12\uff16-11-28T10:00:00Z", "2026-11-28T10:00:00", "2026-11-28T10:00:00Z ",
    "2026-11-28T10:00:00.Z", "2026-13-01T00:00:00Z", "2026-11-31T00:00:00Z",
    "1969-12-31T23:59:59-00:01", "2026-11-28T10:00:00+01", "2026-11-28T10:00:00+01:00:00",
    "2026-11-28T24:30:00Z",
]
"""Times of every kind: the common forms (the accelerator's), leap days, offsets, fractions,
the ends of the years, invalid dates and ISO 8601's rarer spellings (the Python path's)."""
RAW_NUMBERS = [b"-0", b"0", b"01", b"-01", b"1.", b"1.0", b"1e5", b"1E+2", b"2.5E-3", b"-",
               b"1e", b"1e+", b".5", b"123456789012345678", b"999999999999999999",
               b"1234567890123456789", b"9" * 30, b"9007199254740991", b"9007199254740992",
               b"true", b"false", b"null", b"NaN", b"-Infinity", b"Infinity", b"[]", b"{}",
               b"[200]", b'{"a":1}', b"tru", b"nul", b"+1", b"0x10"]
"""Number spellings and literals where the exporter writes an integer."""
INSERTS = [b"\xff", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf",
           b"\xf0\x9f\x98", b"\xe0\x80\x80", b"\xf8\x88\x80\x80\x80", b"\x80", b"\xc3\xa9",
           b"\xf0\x9f\x98\x80", b"\\ud800", b"\\udc00", b"\\ud83d\\ude00", b"\\ude00\\ud83d",
           b"\\ud800\\u0041", b"\\ud800x", b"\\x", b"\\u12", b"\\U0041", b"\\u00zz", b"\\u00E9",
           b"\x01", b"\x7f", b"\t", b"\\/", b"\\b", b"\\f", b'\\"', b"\\\\", b"\\", b'"']
"""Raw bytes and escapes inserted into strings: invalid UTF-8 of every kind, surrogate escapes
(pairs, lone, reversed), bad escapes, control characters, quotes."""
SHORT = {'"': b'\\"', "\\": b"\\\\", "/": b"\\/", "\b": b"\\b", "\f": b"\\f", "\n": b"\\n",
         "\r": b"\\r", "\t": b"\\t"}


def _string(draw, text: str, hostile: bool = True) -> bytes:
    """``text`` as a JSON string: mostly as the exporter writes it, now and then with its
    characters as short or \\u escapes (astral ones as surrogate pairs) and something hostile
    inside (``INSERTS``)."""
    escapes = _once_in(draw, 4)
    out = []
    for ch in text:
        cp = ord(ch)
        how = draw(st.integers(0, 3)) if escapes else 3
        if how == 0 and ch in SHORT:
            out.append(SHORT[ch])
        elif how == 1 or ch in '"\\' or cp < 0x20 or 0xD800 <= cp < 0xE000:
            units = [cp] if cp < 0x10000 else [0xD800 + (cp - 0x10000 >> 10),
                                               0xDC00 + (cp - 0x10000 & 0x3FF)]
            hex_ = "%04X" if draw(st.booleans()) else "%04x"
            out.append(b"".join(b"\\u" + (hex_ % u).encode() for u in units))
        else:
            out.append(ch.encode("utf-8"))
    if hostile and _once_in(draw, 40):
        out.insert(draw(st.integers(0, len(out))), draw(st.sampled_from(INSERTS)))
    return b'"' + b"".join(out) + b'"'


def _once_in(draw, odds: int) -> bool:
    """True about once in ``odds`` draws (Hypothesis favours the ends of a range, and
    shrinks towards its start: 1 is neither)."""
    return draw(st.integers(0, odds - 1)) == 1


def _rarely(draw, strategy, common, odds: int = 25):
    """A draw of ``strategy`` about once in ``odds``, else of ``common``."""
    return draw(strategy if _once_in(draw, odds) else common)


@st.composite
def raw_record_lines(draw) -> bytes:
    """Exporter and access-log lines spelled every way JSON allows, and some ways it does not:
    escapes (in keys too), \\u surrogates, raw invalid UTF-8, number spellings and literals,
    blanks between tokens, a CR or a blank at the end, duplicate and reordered keys. Mostly one
    such thing at a time, so that most lines are of the common shape."""
    raw = st.sampled_from(RAW_NUMBERS)
    urls = st.sampled_from(["/live/hls/av-high/1.ts", "/live/dash/av-low/2.m4s",
                            "/live/hls/zz-high/1.ts", "/x", "/live/hls/av-high/" + "x" * 300])
    fields = {
        "seq": _rarely(draw, raw, st.integers(-3, 50)),
        "time": _rarely(draw, raw, st.sampled_from(TIMES if _once_in(draw, 3) else TIMES[:6]),
                        30),
        "client": _rarely(draw, raw, texts),
        "ua": _rarely(draw, raw, texts),
        "url": _rarely(draw, st.one_of(raw, texts), urls),
        "status": _rarely(draw, st.one_of(raw, st.sampled_from([-200, 0, 1023, 1024, 2**40])),
                          st.sampled_from([200, 206, 404])),
        "bytes-sent": _rarely(draw, raw, st.integers(-2, 10**7)),
    }
    pairs = [(k, v) for k, v in fields.items() if not _once_in(draw, 30)]
    if _once_in(draw, 7):
        pairs.append(("url-truncated", draw(st.sampled_from([b"true", b"null", b"0", "x"]))))
    for _ in range(_rarely(draw, st.integers(1, 2), st.just(0), 4)):
        key = draw(keys)
        pairs.append((key, fields.get(key, draw(raw))))
    if _once_in(draw, 4):
        pairs = draw(st.permutations(pairs))
    blanks = _rarely(draw, st.just(st.sampled_from([b"", b"", b" ", b"\t", b"\r", b" \t"])),
                     st.just(st.just(b"")), 6)
    odd_keys = _once_in(draw, 10)

    def value(v) -> bytes:
        if type(v) is bytes:
            return v
        return _string(draw, v) if type(v) is str else str(v).encode()

    body = b",".join(draw(blanks) + (_string(draw, k) if odd_keys else json.dumps(k).encode())
                     + draw(blanks) + b":" + draw(blanks) + value(v) + draw(blanks)
                     for k, v in pairs)
    line = draw(blanks) + b"{" + body + b"}" + draw(blanks)
    return line + _rarely(draw, st.sampled_from([b"\r", b" ", b"\r\r", b"\x0b", b"\x0c"]),
                          st.just(b""))


control_lines = st.one_of(
    st.builds(lambda seq, lost: json.dumps({"seq": seq, "lost": lost}).encode(),
              st.integers(0, 99), st.one_of(st.integers(-1, 9), st.just(10**21), st.just(2.0))),
    st.builds(lambda seq, hb: json.dumps({"seq": seq, "hb": hb}).encode(),
              st.one_of(st.integers(0, 99), st.just(10**20)),
              st.one_of(st.integers(0, 2**41), st.floats(allow_nan=False), st.just("x"))),
    st.builds(lambda seq, hb, oldest, since: json.dumps(
        {"seq": seq, "hb": hb, "oldest": oldest, "oldest-time": since}).encode(),
              st.integers(0, 99), st.integers(0, 2**31),
              st.one_of(st.integers(-1, 99), st.just(2**40), st.just(10**20), st.just(3.0),
                        st.just("7"), st.none()),
              st.one_of(st.integers(-1, 2**31), st.floats(allow_nan=False), st.just(2.0**40),
                        st.just(10**20), st.just("x"), st.none())),
    st.sampled_from([b'{"seq":5,"hb":NaN}', b'{"seq":5,"hb":Infinity}', b'{"seq":1e400}',
                     b'{"seq":123456789012345678901,"url":"/x"}']),
)
hostile = st.sampled_from([
    b'{"a":1},{"b":2}', b'{"x":[{}', b'{}]}', b'{"a":"x}', b'{"a":1', b'{"a":1,}', b'{"a":01}',
    b'{"a":"\t"}', b'{"a":"\\ud800"}', b'{"a":"\xff"}', b'{"a":"\xed\xa0\x80"}', b"[1, 2, 3]",
    b'"just a string"', b"not json at all", b'{"seq":1,,}', b" {}", b"{} ", b"{}\x0b",
    b"\xef\xbb\xbf{}", b"{" + b"[" * 50 + b"]" * 50 + b"}", b'{"a":' + b"1" * 5000 + b"}",
    b'{"a":[1}', b'{"a"}', b"{}", b"{\"url\":\"}\"}",
])


def _mutate(data: st.DataObject, line: bytes) -> bytes:
    how = data.draw(st.integers(0, 5))
    if how == 0 and len(line) > 1:
        return line[: data.draw(st.integers(1, len(line) - 1))]
    if how == 1:
        at = data.draw(st.integers(0, len(line)))
        return line[:at] + data.draw(st.binary(min_size=1, max_size=3)).replace(b"\n", b"") \
            + line[at:]
    return line


lines_strategy = st.lists(st.one_of(record_lines(), raw_record_lines(), control_lines, hostile,
                                    st.binary(min_size=1, max_size=20)), max_size=40)


def reference(lines, repair):
    """``parse`` of each line, with the sequence number after each."""
    parser = RecordParser(SETTINGS, decoder="json")
    parser.repair_utf8 = repair
    out = []
    for line in lines:
        out.append((parser.parse(line), parser.last_seq))
    return out, parser.last_seq


def bulk(lines, repair, decoder, piece, cuts=None, firsts=None, blanks=()):
    """``parse_lines`` of the lines, or with ``cuts`` ``parse_blocks`` of the lines joined
    into blocks at those line numbers (each reason's first line into ``firsts``), with empty
    lines (which are no lines) where ``blanks`` says."""
    parser = RecordParser(SETTINGS, decoder=decoder)
    parser.repair_utf8 = repair
    rejected = Counter()
    if cuts is None:
        records, events = parser.parse_lines(lines, rejected)
    else:
        bounds = [0, *sorted({c % (len(lines) + 1) for c in cuts}), len(lines)]
        pieces = [lines[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]
        for n, at in enumerate(blanks):
            if pieces:
                piece_lines = pieces[n % len(pieces)]
                piece_lines.insert(at % (len(piece_lines) + 1), b"")
        blocks = [b"\n".join(piece_lines) for piece_lines in pieces]
        records, events = parser.parse_blocks(blocks, rejected)
        starts, n = [], 0
        for piece_lines in pieces:
            starts.append(n)
            n += sum(1 for line in piece_lines if line)
        assert parser.block_starts == starts, "each block's first line number"
    if firsts is not None:
        firsts.update(parser.first_rejected)
    return records, events, rejected, parser.last_seq


@settings(max_examples=600, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data(), base=lines_strategy, repair=st.booleans(),
       piece=st.sampled_from([1, 2, 3, 7, 32]), decoder=st.sampled_from(DECODERS),
       cuts=st.one_of(st.none(), st.lists(st.integers(0, 50), max_size=4)),
       blanks=st.lists(st.integers(0, 50), max_size=3))
@example(data=None, base=[b'{"a":1},{"b":2}', b'{"x":[{}', b'{}]}'], repair=False, piece=32,
         decoder=DECODERS[-1], cuts=None, blanks=[])
@example(data=None, base=[b'{"a":1},{"b":2}', b'{"x":[{}', b'{}]}'], repair=False, piece=32,
         decoder=DECODERS[-1], cuts=[], blanks=[0, 3])
def test_every_decoder_and_piece_size_agrees_with_one_line_at_a_time(
        data, base, repair, piece, decoder, cuts, blanks):
    lines = [line.replace(b"\n", b"") or b"{}" for line in
             (base if data is None else [_mutate(data, line) for line in base])]
    old = records_module.PIECE
    records_module.PIECE = piece
    firsts = {}
    try:
        got_records, got_events, got_rejected, got_seq = bulk(lines, repair, decoder, piece,
                                                              cuts, firsts, blanks)
    finally:
        records_module.PIECE = old
    want, want_seq = reference(lines, repair)
    want_records = [r for r, _ in want if type(r) is Record]
    want_events, n = [], 0
    for r, _ in want:
        if type(r) is Record:
            n += 1
        elif type(r) in (Gap, Heartbeat):
            want_events.append((n, r))
    want_rejected = Counter(r for r, _ in want if type(r) is str)
    assert got_records == want_records
    assert [(at, type(e), tuple(e)) for at, e in got_events] == \
        [(at, type(e), tuple(e)) for at, e in want_events]
    assert got_rejected == want_rejected
    assert got_seq == want_seq
    want_firsts = {}
    for i, (r, _) in enumerate(want):
        if type(r) is str:
            want_firsts.setdefault(r, i)
    assert firsts == want_firsts, "each reason's first line (the rejection samples')"


def _agree(lines, repair, alone=True):
    """Every decoder's blocks and lines of ``lines`` against ``parse`` of each line (and, with
    ``alone``, of each line by itself: the sequence number after each line)."""
    if alone:
        for line in lines:
            _agree([line], repair, False)
    want, want_seq = reference(lines, repair)
    want_records = [r for r, _ in want if type(r) is Record]
    want_rejected = Counter(r for r, _ in want if type(r) is str)
    for decoder in DECODERS:
        for cuts in (None, [], [len(lines) // 2]):
            firsts = {}
            records, _, rejected, seq = bulk(lines, repair, decoder, 32, cuts, firsts)
            assert (records, rejected, seq) == (want_records, want_rejected, want_seq), \
                (decoder, cuts, repair)
            assert firsts == {r: i for i, (r, _) in reversed(list(enumerate(want)))
                              if type(r) is str}


GOOD_LINE = (b'{"seq":%d,"time":"2026-11-28T10:00:00.003+01:00","client":"10.0.0.1",'
             b'"ua":"Mozilla/5.0 (X11)","url":"/live/hls/av-high/1.ts","status":200,'
             b'"bytes-sent":1234}')


@pytest.mark.parametrize("repair", [False, True])
@pytest.mark.parametrize("where", ["client", "ua", "url", "time", "key", "other"])
def test_every_hostile_string_piece_in_every_place(where, repair):
    """Each of ``INSERTS`` (invalid UTF-8 of every kind, surrogate and bad escapes, control
    characters, quotes) at the start, middle and end of a string in each place of a good line:
    the same records, rejections and sequence numbers from every decoder as line by line."""
    lines = []
    for n, insert in enumerate(INSERTS):
        for at in (0, 3, None):
            line = GOOD_LINE % n
            if where in ("client", "ua", "url", "time"):
                start = line.index(b'"%s":"' % where.encode()) + len(where) + 4
            elif where == "key":
                start = line.index(b'"status"') + 1
            else:
                line = line[:-1] + b',"x":"abcdef"}'
                start = line.index(b'"x":"') + 5
            end = line.index(b'"', start)
            cut = end if at is None else start + at
            lines.append(line[:cut] + insert + line[cut:])
    _agree(lines, repair)


@pytest.mark.parametrize("repair", [False, True])
@pytest.mark.parametrize("field", ["seq", "status", "bytes-sent", "client", "url", "x"])
def test_every_number_spelling_in_every_field(field, repair):
    """Each of ``RAW_NUMBERS`` (JSON's number spellings, what it refuses, literals, nesting) as
    the value of each field of a good line, and the times of ``TIMES``."""
    lines = []
    for n, raw in enumerate(RAW_NUMBERS):
        obj = json.loads(GOOD_LINE % n)
        obj[field] = "@"
        lines.append(json.dumps(obj, separators=(",", ":")).encode().replace(b'"@"', raw))
    for when in TIMES:
        obj = json.loads(GOOD_LINE % 1)
        obj["time"] = when
        lines.append(json.dumps(obj, separators=(",", ":"), ensure_ascii=repair).encode())
    _agree(lines, repair)


@pytest.mark.parametrize("repair", [False, True])
def test_a_good_line_with_something_before_or_after_it(repair):
    """What json reads as more than the line's object, or as blanks around it."""
    lines = []
    for n, (before, after) in enumerate([
            (b"", b""), (b"", b"}"), (b"", b" }"), (b"", b',{"a":1}'), (b"", b"{}"),
            (b"", b" "), (b"", b"\r"), (b"", b"\t\r\n"), (b"", b"\x0b"), (b"", b"\x85"),
            (b"", b"\xc2\x85"), (b"", b"\xc2\xa0"), (b"", b"\xe3\x80\x80"), (b"", b"x"),
            (b"", b"\x00"), (b" ", b""), (b"\t", b""), (b"\r", b""), (b"\xef\xbb\xbf", b""),
            (b"{", b"}"), (b"[", b"]"), (b"", b"]"), (b"x", b"")]):
        lines.append(before + GOOD_LINE % n + after)
    lines += [(GOOD_LINE % 99)[:n] for n in range(1, len(GOOD_LINE % 99))]
    _agree(lines, repair)


def test_heartbeat_history_and_truncated_urls_on_every_decoder_path():
    """The ring's history in heartbeats (``oldest``, ``oldest-time``) and the exporter's
    ``url-truncated`` rejection come out of every way of decoding: one line, lines in pieces,
    blocks, each by every decoder."""
    url = "/live/hls/av-high/1.ts"
    record = {"seq": 3, "time": "2026-11-28T09:00:01Z", "client": "c", "ua": "u", "url": url,
              "status": 200, "bytes-sent": 5}
    lines = [json.dumps({"seq": 1, "hb": 1764320400, "oldest": 1, "oldest-time": 1764320000.5}),
             json.dumps({"seq": 2, "hb": 1764320401, "oldest": 2}),
             json.dumps({**record, "url-truncated": True}), json.dumps(record),
             json.dumps({"seq": 4, "hb": 1764320402, "oldest": 2**64, "oldest-time": 1})]
    lines = [line.encode() for line in lines]
    beats = [(0, Heartbeat(1, 1764320400.0, 1, 1764320000.5)),
             (0, Heartbeat(2, 1764320401.0, 2, None)), (1, Heartbeat(4, 1764320402.0))]
    want = (beats, Counter({"url-truncated": 1}), 4)
    parser = RecordParser(SETTINGS)
    assert [parser.parse(line) for line in lines] == [
        beats[0][1], beats[1][1], "url-truncated",
        (parser.seconds(record["time"]), ("av", "hls", "high"), "c", "u", 5), beats[2][1]]
    for decoder in DECODERS:
        for cuts in (None, [], [1, 3], [2]):
            records, events, rejected, seq = bulk(lines, False, decoder, 32, cuts)
            assert len(records) == 1 and (events, rejected, seq) == want, (decoder, cuts)
            assert [tuple(e) for _, e in events] == [tuple(e) for _, e in beats]


def test_a_line_that_is_two_objects_is_not_taken_for_two_lines():
    """The shape checks exist for this: joined into one array, these three lines would give
    three objects (``{"a":1}``, ``{"b":2}``, ``{"x":[{},{}]}``) though none of them is one."""
    lines = [b'{"a":1},{"url":"/live/hls/av-high/1.ts"}', b'{"x":[{}', b'{}]}']
    for decoder in DECODERS:
        for cuts in (None, []):
            records, events, rejected, _ = bulk(lines, False, decoder, 32, cuts)
            assert (records, events, rejected) == ([], [], Counter({"invalid-json": 3}))


@settings(max_examples=300, deadline=None, database=None)
@given(data=st.binary(max_size=300).map(lambda b: b.replace(b"x", b"\n")),
       cuts=st.lists(st.integers(0, 300), max_size=6), size=st.sampled_from([5, 20, 4096]),
       limit=st.sampled_from([8, 30, 65536]))
def test_the_splitters_blocks_are_its_lines(data, cuts, size, limit):
    """``feed_blocks`` gives the lines ``feed`` gives, whenever it takes the chunk."""
    from sfive_ngxlua.lines import LineSplitter

    one, other = LineSplitter(limit), LineSplitter(limit)
    bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    for a, b in zip(bounds, bounds[1:]):
        chunk = data[a:b]
        blocks = other.feed_blocks(chunk, size)
        got = other.feed(chunk) if blocks is None else \
            [line for block in blocks for line in block.split(b"\n") if line]
        assert all(len(block) <= min(size, limit) for block in blocks or ())
        assert got == one.feed(chunk)
        assert (other.pending, other.too_long) == (one.pending, one.too_long)


def test_the_pipeline_samples_rejections_once_per_reason_and_read_on_both_paths():
    """A read's first rejected line of each reason gives its URL to the samples, whether the
    read goes in as lines or as blocks; the next read samples again."""
    from sfive_ngxlua.model import IntervalModel
    from sfive_ngxlua.pipeline import Pipeline
    from sfive_ngxlua.stats import Stats

    def rec(url, status=200):
        return json.dumps({"seq": 1, "time": "2026-11-28T09:00:01Z", "client": "c", "ua": "u",
                           "url": url, "status": status, "bytes-sent": 5}).encode()

    lines = [rec("/live/hls/av-high/1.ts"), rec("/a?token=x", 404), rec("/b", 404),
             rec("/nope"), rec("/c", 404), rec("/live/hls/av-high/1.ts", 200)[:-1]]
    for path in ("lines", "blocks"):
        stats = Stats()
        pipeline = Pipeline(SETTINGS, stats, IntervalModel(SETTINGS, stats))
        for _ in range(2):
            if path == "lines":
                pipeline.feed_lines(lines)
            else:
                pipeline.feed(b"\n".join(lines) + b"\n")
        assert stats.rejected == {"status": 6, "url-mismatch": 2, "invalid-json": 2}, path
        assert {k: list(v) for k, v in stats.rejected_samples.items()} == {
            "status": ["/a?\u2026", "/a?\u2026"], "url-mismatch": ["/nope", "/nope"]}, path
        assert stats.accepted == 2 and stats.lines == 12
