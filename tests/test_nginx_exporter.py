"""The nginx-lua exporter (nginx/sfive.lua and its snippets) against a real private nginx.

Requests are made with real HTTP clients (Twisted's Agent, curl, a raw socket); the exporter's
lines are checked against nginx's own access log (a log_format with $bytes_sent).
"""

from __future__ import annotations

import re
import socket
from datetime import datetime

import pytest
import pytest_twisted
from support import exporter_layout, wait_for
from twisted.internet import defer, utils

from lab.nginx import (
    LOCATION_SNIPPET,
    MEDIA_FILES,
    SNIPPET,
    fetch,
    pid_alive,
    subscribe,
)

pytestmark = pytest.mark.timeout(30)

SEG1 = "/live/hls/foo-high/seg1.ts"
ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d$")
FIELDS = ["seq", "time", "client", "ua", "url", "status", "bytes-sent"]


def as_log(record):
    """An exporter record in the access log's terms, for comparison."""
    return (record["client"], record["ua"], record["url"], record["status"],
            record["bytes-sent"])


def from_log(entry):
    return (entry["client"], entry["ua"], entry["uri"], entry["status"], entry["bytes_sent"])


def seqs(records):
    return [r["seq"] for r in records]


@defer.inlineCallbacks
def make_requests(server, count, prefix="viewer"):
    """count concurrent GETs of SEG1, each with its own user agent; returns the statuses."""
    results = yield defer.gatherResults(
        [fetch(server.url(SEG1), ua=f"{prefix}-{i}") for i in range(count)])
    return [status for status, _ in results]


def test_snippets_restrict_the_endpoint_and_name_the_install_dir():
    location = LOCATION_SNIPPET.read_text()
    body = location[location.index("location = /sfive"):]
    rules = re.findall(r"^\s*((?:allow|deny) [^;]+);", body, re.M)
    assert rules == ["allow 127.0.0.1", "allow ::1", "deny all"]
    assert "lua_check_client_abort on;" in body
    assert re.search(r"log_by_lua_block \{\s*\}", body), "the stream's own requests are logged"
    http = SNIPPET.read_text()
    assert re.search(r"^lua_shared_dict sfive \d+m;", http, re.M)
    assert 'lua_package_path "/usr/share/sfive-ngxlua/nginx/?.lua;;";' in http
    assert 'log_by_lua_block { require("sfive").log() }' in http


@pytest_twisted.inlineCallbacks
def test_lines_match_the_access_log(nginx):
    _, stream = yield subscribe(nginx)
    requests = [
        (SEG1, "Mozilla/5.0 (X11; Linux x86_64) Firefox/120.0", {}),
        ("/live/hls/foo-high/index.m3u8", "AppleCoreMedia/1.0.0.20G75", {}),
        ("/live/hls/foo-high/seg2.ts", "VLC/3.0.18 LibVLC/3.0.18", {}),
        ("/live/dash/bar-low/seg.m4s", "ExoPlayerLib/2.18.1", {"Range": "bytes=0-999"}),
        ("/live/dash/bar-low/seg1.m4s", "ExoPlayerLib/2.18.1", {"Range": "bytes=100-"}),
        ("/live/hls/nothing-high/seg9.ts", "VLC/3.0.18 LibVLC/3.0.18", {}),
        ("/live/dash/bar-low/manifest.mpd", None, {}),
    ]
    statuses = []
    for path, ua, headers in requests:
        status, body = yield fetch(nginx.url(path), ua=ua, headers=headers)
        statuses.append(status)
    assert statuses == [200, 200, 200, 206, 206, 404, 200]
    out, err, code = yield utils.getProcessOutputAndValue(
        "curl", ["-s", "-o", "/dev/null", "-r", "10-19", nginx.url(SEG1)])
    assert code == 0, err
    total = len(requests) + 1

    yield wait_for(lambda: len(stream.lines) >= total, what=f"{total} exported lines")
    yield wait_for(lambda: len(nginx.access_log()) >= total, what="access log lines")
    lines, log = stream.lines, nginx.access_log()
    assert len(lines) == len(log) == total, "the /sfive request itself must not be exported"
    for line, entry in zip(lines, log):
        assert list(line) == FIELDS
        assert as_log(line) == from_log(entry)
        assert ISO_MS.match(line["time"]), line["time"]
        exported = datetime.fromisoformat(line["time"]).timestamp()
        assert abs(exported - float(entry["msec"])) < 0.0015
    assert seqs(lines) == list(range(lines[0]["seq"], lines[0]["seq"] + total))
    assert stream.raw == [exporter_layout(line) for line in lines], "bench/gen.py's layout"
    assert lines[5]["status"] == 404 and lines[6]["ua"] == ""
    assert lines[3]["bytes-sent"] > 1000 > lines[3]["bytes-sent"] - 400
    assert lines[0]["bytes-sent"] > len(MEDIA_FILES[SEG1.lstrip("/")])
    assert lines[7]["ua"].startswith("curl/") and lines[7]["status"] == 206
    stream.close()


@pytest_twisted.inlineCallbacks
def test_time_carries_the_servers_utc_offset(nginx_factory):
    nginx = nginx_factory(env={"TZ": "XYZ-5:30"})  # POSIX TZ for UTC+05:30, no tzdata needed
    _, stream = yield subscribe(nginx)
    yield fetch(nginx.url(SEG1))
    yield wait_for(lambda: stream.lines and nginx.access_log(), what="the record")
    time = stream.lines[0]["time"]
    assert time.endswith("+05:30") and ISO_MS.match(time)
    exported = datetime.fromisoformat(time).timestamp()
    assert abs(exported - float(nginx.access_log()[0]["msec"])) < 0.0015
    stream.close()


@pytest_twisted.inlineCallbacks
def test_two_subscribers_each_see_every_line_in_order(nginx):
    _, first = yield subscribe(nginx)
    _, second = yield subscribe(nginx)
    statuses = yield make_requests(nginx, 40)
    assert statuses == [200] * 40
    yield wait_for(lambda: len(first.lines) >= 40 and len(second.lines) >= 40,
                   what="40 lines on both streams")
    assert first.raw == second.raw
    assert seqs(first.lines) == list(range(1, 41))
    assert sorted(line["ua"] for line in first.lines) == sorted(f"viewer-{i}" for i in range(40))
    first.close()
    second.close()


@pytest_twisted.inlineCallbacks
def test_ring_wraps_for_a_live_subscriber(nginx_factory):
    nginx = nginx_factory(ring_size=8)
    _, stream = yield subscribe(nginx)
    for batch in range(6):
        yield make_requests(nginx, 5, prefix=f"b{batch}")
        yield wait_for(lambda b=batch: len(stream.lines) >= 5 * (b + 1), what="the batch")
    assert seqs(stream.lines) == list(range(1, 31))
    assert all("lost" not in line for line in stream.lines)
    stream.close()


@pytest_twisted.inlineCallbacks
def test_after_replays_what_followed(nginx):
    yield make_requests(nginx, 6, prefix="early")
    yield wait_for(lambda: len(nginx.access_log()) >= 6, what="6 requests logged")
    _, replay = yield subscribe(nginx, after=2)
    _, current = yield subscribe(nginx, after=6)
    _, future = yield subscribe(nginx, after=10**12)
    yield wait_for(lambda: len(replay.lines) >= 4, what="the replay")
    yield make_requests(nginx, 2, prefix="late")
    yield wait_for(lambda: min(len(s.lines) for s in (replay, current, future)) >= 2
                   and len(replay.lines) >= 6, what="the new lines")
    assert seqs(replay.lines) == [3, 4, 5, 6, 7, 8]
    assert seqs(current.lines) == seqs(future.lines) == [7, 8]
    early = {line["ua"] for line in replay.lines[:4]}
    assert len(early) == 4 and all(ua.startswith("early-") for ua in early)
    for stream in (replay, current, future):
        stream.close()


@pytest_twisted.inlineCallbacks
def test_after_older_than_the_ring_gets_a_gap_line(nginx_factory):
    nginx = nginx_factory(ring_size=4)
    for i in range(10):  # one by one, so that seq follows the user agents
        yield fetch(nginx.url(SEG1), ua=f"v{i + 1}")
    yield wait_for(lambda: len(nginx.access_log()) >= 10, what="10 requests logged")
    _, stream = yield subscribe(nginx, after=1)
    yield wait_for(lambda: len(stream.lines) >= 5, what="gap line and 4 records")
    assert stream.lines[0] == {"lost": 5, "seq": 7}
    assert seqs(stream.lines[1:]) == [7, 8, 9, 10]
    assert [line["ua"] for line in stream.lines[1:]] == ["v7", "v8", "v9", "v10"]
    assert stream.raw[0] == b'{"lost":5,"seq":7}'
    stream.close()


@pytest_twisted.inlineCallbacks
def test_live_subscriber_lapped_by_the_ring_gets_a_gap_line(nginx_factory):
    nginx = nginx_factory(ring_size=4, knobs={"poll_interval": 1.5})
    _, stream = yield subscribe(nginx)  # it polled once and now sleeps for 1.5 s
    for i in range(10):
        yield fetch(nginx.url(SEG1), ua=f"v{i + 1}")
    assert stream.lines == []
    yield wait_for(lambda: len(stream.lines) >= 5, what="gap line and 4 records")
    assert stream.lines[0] == {"lost": 6, "seq": 7}
    assert [line["ua"] for line in stream.lines[1:]] == ["v7", "v8", "v9", "v10"]
    stream.close()


@pytest_twisted.inlineCallbacks
def test_records_evicted_from_a_too_small_dict_count_as_lost(nginx_factory):
    nginx = nginx_factory(ring_size=1000, dict_size="32k", knobs={"pending_timeout": 0.2})
    for _ in range(5):
        yield make_requests(nginx, 20)
    yield wait_for(lambda: len(nginx.access_log()) >= 100, what="100 requests logged")
    _, stream = yield subscribe(nginx, after=0)
    yield wait_for(lambda: stream.lines and stream.lines[-1].get("seq") == 100,
                   what="the newest record")
    gap, *records = stream.lines
    assert 10 < len(records) < 90, "the dict held an unexpected number of records"
    assert gap == {"lost": 100 - len(records), "seq": 101 - len(records)}
    assert seqs(records) == list(range(gap["seq"], 101))
    assert "is too small for ring_size 1000" in nginx.error_log()
    stream.close()


@pytest_twisted.inlineCallbacks
def test_bad_requests_to_the_endpoint(nginx):
    status, body = yield fetch(nginx.url("/sfive?after=ten"))
    assert status == 400 and b"'after' must be a sequence number" in body
    status, body = yield fetch(nginx.url("/sfive?after=-1"))
    assert status == 400
    status, _ = yield fetch(nginx.url("/sfive"), method="POST")
    assert status == 405
    status, _ = yield fetch(nginx.url("/sfive"), method="HEAD")
    assert status == 200


@pytest_twisted.inlineCallbacks
def test_endpoint_is_loopback_only_and_not_exported(nginx):
    _, stream = yield subscribe(nginx)
    status, _ = yield fetch(nginx.url("/sfive"), bind="127.0.0.2")
    assert status == 403
    status, _ = yield fetch(nginx.url(SEG1), ua="marker", bind="127.0.0.2")
    assert status == 200
    yield wait_for(lambda: stream.lines, what="the marker request")
    assert [as_log(line) for line in stream.lines] == [
        ("127.0.0.2", "marker", SEG1, 200, stream.lines[0]["bytes-sent"])]
    logged = [(e["client"], e["uri"], e["status"]) for e in nginx.access_log()]
    assert ("127.0.0.2", "/sfive", 403) in logged
    stream.close()


@pytest_twisted.inlineCallbacks
def test_disconnected_subscriber_is_ended_at_once(nginx):
    _, stream = yield subscribe(nginx)
    stream.close()

    def sfive_entries():
        return [e for e in nginx.access_log() if e["uri"] == "/sfive"]

    # without abort detection the handler would sleep on until the next record
    entries = yield wait_for(sfive_entries, timeout=2, what="the aborted stream's log entry")
    assert len(entries) == 1


@pytest_twisted.inlineCallbacks
def test_arbitrary_bytes_become_valid_json(nginx):
    _, stream = yield subscribe(nginx)
    ua = b'say "hi" \\ \x01\t caf\xc3\xa9 \xff\xfe \xe2\x82 \xf0\x9f\x8e\xa5'
    with socket.create_connection(("127.0.0.1", nginx.port), timeout=5) as sock:
        sock.sendall(b"GET /live/hls/x%22y%FF%0A.ts HTTP/1.1\r\nHost: localhost\r\n"
                     b"User-Agent: " + ua + b"\r\nConnection: close\r\n\r\n")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 404")
    yield wait_for(lambda: stream.lines, what="the exported line")
    line = stream.lines[0]
    assert line["ua"] == 'say "hi" \\ \x01\t café \ufffd\ufffd \ufffd\ufffd 🎥'
    assert line["url"] == '/live/hls/x"y\ufffd\n.ts'
    assert line["status"] == 404
    stream.raw[0].decode("utf-8")
    stream.close()


@pytest_twisted.inlineCallbacks
def test_reload_ends_old_streams_and_keeps_the_sequence(nginx):
    _, old = yield subscribe(nginx)
    yield make_requests(nginx, 3, prefix="before")
    yield wait_for(lambda: len(old.lines) >= 3, what="3 lines before the reload")
    old_workers = nginx.reload()
    yield wait_for(lambda: old.reason is not None, what="the old worker to end the stream")
    assert old.done.result, f"the stream broke instead of ending: {old.reason}"
    yield wait_for(lambda: not any(map(pid_alive, old_workers)),
                   what="the old workers to exit")

    last = old.lines[-1]["seq"]
    _, new = yield subscribe(nginx, after=last)
    yield make_requests(nginx, 3, prefix="after")
    yield wait_for(lambda: len(new.lines) >= 3, what="3 lines after the reload")
    assert seqs(old.lines) == [1, 2, 3]
    assert seqs(new.lines) == [4, 5, 6]
    assert all(line["ua"].startswith("after-") for line in new.lines)
    assert "[error]" not in nginx.error_log().replace("No such file", "")
    new.close()

