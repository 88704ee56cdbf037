"""Record rules: what counts, and the reason for everything that does not."""

import json

import pytest

from sfive_ngxlua.records import Gap, Heartbeat, Record, RecordParser
from sfive_ngxlua.settings import Settings

SETTINGS = Settings(streamers=(("av", "hls", "high"), ("av", "dash", "low")), hostname="h")
GOOD = {"time": "2026-11-28T10:00:00+01:00", "client": "10.0.0.1", "ua": "ua",
        "url": "/live/hls/av-high/1.ts", "status": 200, "bytes-sent": 10}
T = 1795856400  # 2026-11-28T09:00:00Z


def parse(obj, parser=None):
    raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return (parser or RecordParser(SETTINGS)).parse(raw)


def with_(**kw):
    obj = dict(GOOD)
    for k, v in kw.items():
        k = k.replace("_", "-")
        if v is KeyError:
            del obj[k]
        else:
            obj[k] = v
    return obj


def test_a_good_record():
    assert parse(GOOD) == Record(T, ("av", "hls", "high"), "10.0.0.1", "ua", 10)


@pytest.mark.parametrize("when, expected", [
    ("2026-11-28T09:00:00Z", T),
    ("2026-11-28T09:00:00.999Z", T),
    ("2026-11-28T10:00:00.123456+01:00", T),
    ("2026-11-28T04:30:00-04:30", T),
    ("2026-11-28T10:00:00+0100", T),
    ("20261128T090000Z", T),
    ("2026-11-28T09:00:00,5+00:00", T),
])
def test_iso_times_with_offsets(when, expected):
    assert parse(with_(time=when)).time == expected


@pytest.mark.parametrize("when", [
    "2026-11-28T10:00:00", "2026-11-28 10:00:00", "yesterday", "2026-13-01T00:00:00Z",
    "2026-02-30T00:00:00Z", "2026-11-28T25:00:00Z", "2026-11-28T10:00:00+25:00", "",
    "2026-11-28T10:00:00+01:00junk", "00010101T000000+0100",
])
def test_bad_times(when):
    assert parse(with_(time=when)) == "bad-time"


@pytest.mark.parametrize("line, reason", [
    (b"{not json", "invalid-json"),
    (b"", "invalid-json"),
    (b"[1, 2]", "not-an-object"),
    (b'"text"', "not-an-object"),
    (b'{"time": "\xff"}', "invalid-utf8"),
    (b'{"url": "a\x00b"}', "invalid-json"),
    (b"[" * 100000, "invalid-json"),
])
def test_broken_lines(line, reason):
    assert parse(line) == reason


@pytest.mark.parametrize("field", ["url", "client", "ua", "time", "status", "bytes-sent"])
def test_missing_fields(field):
    obj = dict(GOOD)
    del obj[field]
    assert parse(obj) == "missing-field"


@pytest.mark.parametrize("kw", [
    {"status": "200"}, {"status": 200.0}, {"status": True}, {"bytes_sent": "lots"},
    {"bytes_sent": -5}, {"bytes_sent": 1.5}, {"bytes_sent": True}, {"bytes_sent": 10**30},
    {"url": 5}, {"client": None}, {"ua": ["x"]}, {"time": 0},
])
def test_wrong_types(kw):
    assert parse(with_(**kw)) == "wrong-type"


def test_status_url_and_streamer_filters():
    assert parse(with_(status=404)) == "status"
    assert parse(with_(status=206)).bytes_sent == 10
    assert parse(with_(url="/live/flv/av-high/1")) == "url-mismatch"
    assert parse(with_(url="/live/hls/other-high/1.ts")) == "unknown-streamer"
    assert parse(with_(url="/live/dash/av-low/x.m4s")).streamer == ("av", "dash", "low")


def test_configured_statuses():
    parser = RecordParser(Settings(streamers=SETTINGS.streamers, statuses=frozenset({304})))
    assert parse(with_(status=304), parser).bytes_sent == 10
    assert parse(with_(status=200), parser) == "status"


def test_sequence_numbers_and_gap_lines():
    parser = RecordParser(SETTINGS)
    assert parser.last_seq is None
    parse(with_(seq=7), parser)
    assert parser.last_seq == 7
    assert parse(with_(seq=8, status=404), parser) == "status"
    assert parser.last_seq == 8
    assert parse({"lost": 5, "seq": 14}, parser) == Gap(5, 14)
    assert parser.last_seq == 13, "seq 14 itself is still to come: resume after 13"


def test_heartbeat_lines_are_the_watermark_and_move_the_sequence():
    parser = RecordParser(SETTINGS)
    assert parse(b'{"seq":12,"hb":1795856400.125}', parser) == Heartbeat(12, 1795856400.125)
    assert parser.last_seq == 12, "everything up to S has been delivered: resume after S"
    assert parse({"seq": 13, "hb": 1795856401}, parser) == Heartbeat(13, 1795856401.0)
    assert type(parse({"seq": 13, "hb": 1795856401}, parser).time) is float


@pytest.mark.parametrize("line, reason", [
    ({"seq": 1, "hb": "1795856400"}, "wrong-type"), ({"seq": 1, "hb": None}, "wrong-type"),
    ({"seq": 1, "hb": True}, "wrong-type"), ({"seq": 1, "hb": -1}, "wrong-type"),
    ({"seq": 1, "hb": 1e300}, "wrong-type"), (b'{"seq":1,"hb":NaN}', "invalid-json"),
    (b'{"seq":1,"hb":Infinity}', "invalid-json"),
])
def test_bad_heartbeats_are_rejected_and_do_not_move_the_sequence(line, reason):
    parser = RecordParser(SETTINGS)
    assert parse(line, parser) == reason
    assert parser.last_seq is None


def test_a_heartbeat_without_a_sequence_number_is_no_heartbeat():
    assert parse({"hb": 1795856400}) == "missing-field"


def test_caches_do_not_change_answers():
    parser = RecordParser(SETTINGS)
    for _ in range(3):
        assert parse(GOOD, parser).time == T
        assert parse(with_(time="2026-11-28T10:00:00.5+02:00"), parser).time == T - 3600
        assert parse(with_(url="/x/hls/zz-high/1"), parser) == "unknown-streamer"
