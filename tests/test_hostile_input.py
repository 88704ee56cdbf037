"""Hostile and broken exporter output, sent through the real HTTP path cut at arbitrary chunk
boundaries: every bad line is counted under its reason, the connection is kept, nothing raises,
and memory stays bounded (line buffer, client lists, user agents, URL cache)."""

from __future__ import annotations

import random
import tracemalloc
from collections import Counter

import pytest
import pytest_twisted
import simplejson
from helpers.faults import T0, URL, iso, line, record, settings
from support import wait_for
from twisted.logger import LogLevel

from sfive_ngxlua.model import OVERFLOW_CLIENT
from sfive_ngxlua.records import RecordParser

pytest_plugins = ("helpers.fixtures",)

MAX_LINE = 4096


def dumps(obj: object) -> bytes:
    return simplejson.dumps(obj).encode()


def without(field: str) -> bytes:
    obj = record(T0 + 1)
    del obj[field]
    return dumps(obj)


def hostile_lines() -> list:
    """(line without newline, rejection reason or None if it must be accepted)."""
    good = record(T0 + 2, client="10.9.9.9", sent=1000)
    cases = [
        (b"this is not json", "invalid-json"),
        (b'{"time": "2027-01-01T00:00:00Z", "url": ', "invalid-json"),
        (b"[1, 2, 3]", "not-an-object"),
        (b'"a string"', "not-an-object"),
        (b"42", "not-an-object"),
        (b"null", "not-an-object"),
        (b"[" * 1500 + b"]" * 1500, "invalid-json"),
        (without("url"), "missing-field"),
        (without("bytes-sent"), "missing-field"),
        (without("time"), "missing-field"),
        (b"{}", "missing-field"),
        (dumps(record(T0 + 1, status="200")), "wrong-type"),
        (dumps(record(T0 + 1, sent="lots")), "wrong-type"),
        (dumps(record(T0 + 1, sent=-5)), "wrong-type"),
        (dumps(record(T0 + 1, sent=1.5)), "wrong-type"),
        (dumps(record(T0 + 1, sent=True)), "wrong-type"),
        (dumps(record(T0 + 1, status=True)), "wrong-type"),
        (dumps(record(T0 + 1, sent=10**30)), "wrong-type"),
        (dumps(record(T0 + 1, client=None)), "wrong-type"),
        (dumps(record(T0 + 1, ua=["x"])), "wrong-type"),
        (dumps(record(T0 + 1)).replace(b'"bytes-sent": 100', b'"bytes-sent": NaN'),
         "invalid-json"),
        (dumps({**record(T0 + 1), "time": iso(T0 + 1, "")}), "bad-time"),
        (dumps({**record(T0 + 1), "time": "yesterday at noon"}), "bad-time"),
        (dumps({**record(T0 + 1), "time": "2027-02-30T10:00:00Z"}), "bad-time"),
        (dumps({**record(T0 + 1), "time": "2027-01-01T25:00:00+01:00"}), "bad-time"),
        (dumps({**record(T0 + 1), "time": 1800000001}), "wrong-type"),
        (dumps(record(T0 + 1, status=404)), "status"),
        (dumps(record(T0 + 1, url="/etc/passwd")), "url-mismatch"),
        (dumps(record(T0 + 1, url="/live/hls/other-high/s.ts")), "unknown-streamer"),
        (dumps(record(T0 + 1, ua="x" * (MAX_LINE + 10))), "too-long"),
        (b'{"time": "' + b"\x00" * 20 + b'"}', "invalid-json"),
        (dumps(record(T0 + 1)).replace(b"ua/1", b"ua\x00/1"), "invalid-json"),
        (dumps(record(T0 + 1)).replace(b"ua/1", b"ua\xff\xfe/1"), "invalid-utf8"),
        (b"\xc3\x28 broken", "invalid-utf8"),
        (dumps(record(T0 + 9 * 3600)), "future"),
        (dumps(good), None),
        (dumps(record(T0 + 3, client="\ud800 surrogate", sent=5)), None),
        (dumps({**record(T0 + 4, sent=7), "extra": {"nested": [1, 2]}}), None),
        (dumps({"lost": 3, "seq": 10}), None),
    ]
    return cases


def chunked(data: bytes, rng: random.Random) -> list:
    """Cut anywhere: mostly small pieces, some single bytes, some large."""
    out, i = [], 0
    while i < len(data):
        n = rng.choice([1, 1, 2, 3, 7, 50, 200, 1000, 5000])
        out.append(data[i:i + n])
        i += n
    return out


def errors(logs) -> list:
    return [e for e in logs.events
            if e.get("log_level") in (LogLevel.error, LogLevel.critical)
            or "log_failure" in e or e.get("isError")]


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest_twisted.ensureDeferred
async def test_each_bad_line_is_counted_under_its_reason(seed, service, exporter, logs):
    cases = hostile_lines()
    rng = random.Random(seed)
    rng.shuffle(cases)
    stream = b"".join(text + rng.choice([b"\n", b"\r\n", b"\n\n"]) for text, _ in cases)
    run = service(settings(url=exporter.url(), max_line_length=MAX_LINE))
    await wait_for(lambda: exporter.current is not None)
    exporter.send(*chunked(stream, rng))

    await wait_for(lambda: run.stats.lines == len(cases))
    want = Counter(reason for _, reason in cases if reason)
    assert run.stats.rejected == want
    assert run.stats.accepted == 3
    assert run.stats.lost == 3
    assert run.stats.exporter_reconnects == 0, "bad lines never drop the connection"
    assert run.fetch.body is not None

    exporter.send(line(T0 + 5, sent=11))
    await wait_for(lambda: run.stats.accepted == 4)
    run.clock.advance(T0 + 11 - run.clock.seconds())
    await wait_for(lambda: run.datasets)
    high = run.datasets[0]
    assert high["data"]["bytes-sent"] == 1000 + 5 + 7 + 11
    assert high["data"]["client-count"] == 3
    assert not errors(logs)


@pytest_twisted.ensureDeferred
async def test_endless_line_is_skipped_with_bounded_memory(service, exporter, monkeypatch):
    run = service(settings(url=exporter.url(), max_line_length=MAX_LINE))
    await wait_for(lambda: exporter.current is not None)
    splitter = run.fetch.pipeline.splitter
    fed, held = [], []
    feed = splitter.feed

    def watched(data: bytes) -> list:
        fed.append(len(data))
        out = feed(data)
        held.append(splitter.pending)
        return out

    monkeypatch.setattr(splitter, "feed", watched)
    exporter.send(line(T0 + 1))
    await wait_for(lambda: run.stats.accepted == 1)
    endless = 0
    for size in (1, 100, 3000, 65536, 65536, 1, 65536, 65536, 65536, 1000) * 4:
        exporter.send(b"A" * size)
        endless += size
    await wait_for(lambda: sum(fed) >= endless)
    assert run.stats.rejected == Counter({"too-long": 1}), "counted once, when it overflows"
    exporter.send(b"B" * 10, b"\n" + line(T0 + 2, sent=3))
    await wait_for(lambda: run.stats.accepted == 2)

    assert endless > 250 * MAX_LINE
    assert max(held) <= MAX_LINE, "the splitter never holds more than one line's limit"
    assert run.stats.rejected == Counter({"too-long": 1})
    assert splitter.pending == 0


@pytest_twisted.ensureDeferred
async def test_client_cap_folds_into_one_overflow_entry_with_exact_totals(service, exporter):
    cap = 100
    run = service(settings(url=exporter.url(), max_clients=cap, max_ua_length=40))
    await wait_for(lambda: exporter.current is not None)
    rng = random.Random(7)
    long_ua = "L" * 40
    lines = [line(T0 + 1, client="198.51.100.1", ua=long_ua + tail, sent=b)
             for tail, b in (("one", 10), ("two", 20))]
    sent = {("198.51.100.1", long_ua): 30}
    for i in range(600):
        who = rng.randrange(300)
        b = rng.randrange(1, 5000)
        client = (f"192.0.2.{who % 250}", f"agent-{who // 250}")
        sent[client] = sent.get(client, 0) + b
        lines.append(line(T0 + i % 10, client=client[0], ua=client[1], sent=b))
    exporter.send(*lines)
    await wait_for(lambda: run.stats.accepted == len(lines))
    run.clock.advance(T0 + 11 - run.clock.seconds())
    await wait_for(lambda: run.datasets)

    data = run.datasets[0]["data"]
    clients = {(c["ip"], c["user-agent"]): c["bytes-sent"] for c in data["clients"]}
    assert data["client-count"] == len(sent)
    assert data["bytes-sent"] == sum(sent.values())
    assert len(clients) == cap + 1
    overflow = clients.pop(OVERFLOW_CLIENT)
    for client, b in clients.items():
        assert sent[client] == b, "clients within the cap are exact"
    assert overflow == sum(sent.values()) - sum(clients.values())
    assert run.stats.folded > 0
    assert clients[("198.51.100.1", long_ua)] == 30, "user agents cut to 40 characters"
    assert all(len(ua) <= 40 for _, ua in clients)


def test_url_cache_does_not_hold_long_hostile_urls():
    parser = RecordParser(settings())
    lines = [dumps(record(T0, url=f"/x/{i}/" + "y" * 4000)) for i in range(500)]
    lines += [dumps(record(T0, url=URL))] * 10
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for text in lines:
            parser.parse(text)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 200_000, f"{held} bytes kept for 500 distinct 4 KB URLs"
