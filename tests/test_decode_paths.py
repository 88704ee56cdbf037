"""The piece-at-a-time decoding (one decoder call for many lines) against one line at a time.

``RecordParser.parse_lines`` decodes lines a piece at a time, by orjson where it is installed
and by the standard library's decoder otherwise, and falls back to one line at a time where a
piece fails; ``parse`` decodes one line alone. On arbitrary and hostile lines, every decoder
the parser may pick and every piece size must give the same records, rejection reasons, gaps,
heartbeats and sequence numbers as ``parse`` of each line, with and without UTF-8 repair.
"""

from __future__ import annotations

import json
from collections import Counter

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sfive_ngxlua import records as records_module
from sfive_ngxlua.records import Gap, Heartbeat, Record, RecordParser
from sfive_ngxlua.settings import Settings

SETTINGS = Settings(streamers=(("av", "hls", "high"), ("av", "dash", "low")), hostname="h",
                    nameformat="/[^/]+/(?P<format>hls|dash)/(?P<content>.+)-(?P<quality>[^-]+)/.*")

DECODERS = ["stdlib"] + (["orjson"] if records_module.orjson is not None else [])

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


lines_strategy = st.lists(st.one_of(record_lines(), control_lines, hostile,
                                    st.binary(min_size=1, max_size=20)), max_size=40)


def reference(lines, repair):
    """``parse`` of each line, with the sequence number after each."""
    parser = RecordParser(SETTINGS)
    parser.repair_utf8 = repair
    parser.fast_decoder = False
    out = []
    for line in lines:
        out.append((parser.parse(line), parser.last_seq))
    return out, parser.last_seq


def bulk(lines, repair, decoder, piece, cuts=None, firsts=None):
    """``parse_lines`` of the lines, or with ``cuts`` ``parse_blocks`` of the lines joined
    into blocks at those line numbers (each reason's first line into ``firsts``)."""
    parser = RecordParser(SETTINGS)
    parser.repair_utf8 = repair
    parser.fast_decoder = decoder == "orjson"
    rejected = Counter()
    if cuts is None:
        records, events = parser.parse_lines(lines, rejected)
    else:
        bounds = [0, *sorted({c % (len(lines) + 1) for c in cuts}), len(lines)]
        blocks = [b"\n".join(lines[a:b]) for a, b in zip(bounds, bounds[1:]) if b > a]
        records, events = parser.parse_blocks(blocks, rejected)
    if firsts is not None:
        firsts.update(parser.first_rejected)
    return records, events, rejected, parser.last_seq


@settings(max_examples=400, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), base=lines_strategy, repair=st.booleans(),
       piece=st.sampled_from([1, 2, 3, 7, 32]), decoder=st.sampled_from(DECODERS),
       cuts=st.one_of(st.none(), st.lists(st.integers(0, 50), max_size=4)))
@example(data=None, base=[b'{"a":1},{"b":2}', b'{"x":[{}', b'{}]}'], repair=False, piece=32,
         decoder=DECODERS[-1], cuts=None)
@example(data=None, base=[b'{"a":1},{"b":2}', b'{"x":[{}', b'{}]}'], repair=False, piece=32,
         decoder=DECODERS[-1], cuts=[])
def test_every_decoder_and_piece_size_agrees_with_one_line_at_a_time(
        data, base, repair, piece, decoder, cuts):
    lines = [line.replace(b"\n", b"") or b"{}" for line in
             (base if data is None else [_mutate(data, line) for line in base])]
    old = records_module.PIECE
    records_module.PIECE = piece
    firsts = {}
    try:
        got_records, got_events, got_rejected, got_seq = bulk(lines, repair, decoder, piece,
                                                              cuts, firsts)
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
