"""The nginx-lua exporter (nginx/sfive.lua and its snippets) against a real private nginx.

Requests are made with real HTTP clients (Twisted's Agent, curl, a raw socket); the exporter's
lines are checked against nginx's own access log (a log_format with $bytes_sent).
"""

from __future__ import annotations

import re
import socket
import time
from datetime import datetime

import pytest
import pytest_twisted
import treq
from support import exporter_layout, wait_for
from twisted.internet import defer, threads, utils
from twisted.web.http_headers import Headers

from lab.nginx import (
    LOCATION_SNIPPET,
    MEDIA_FILES,
    SNIPPET,
    burst,
    fetch,
    make_agent,
    pid_alive,
    subscribe,
)

pytestmark = pytest.mark.timeout(30)

SEG1 = "/live/hls/foo-high/seg1.ts"
ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d$")
FIELDS = ["seq", "time", "client", "ua", "url", "status", "bytes-sent"]
HEARTBEAT = ["seq", "hb", "oldest", "oldest-time"]


def as_log(record):
    """An exporter record in the access log's terms, for comparison."""
    return (record["client"], record["ua"], record["url"], record["status"],
            record["bytes-sent"])


def from_log(entry):
    return (entry["client"], entry["ua"], entry["uri"], entry["status"], entry["bytes_sent"])


def seqs(records):
    return [r["seq"] for r in records]


#: each record its own batch, so that seq follows the order of one-by-one requests
UNBATCHED = {"batch_size": 1}


@defer.inlineCallbacks
def exported(server, count):
    """Wait until the exporter's ring holds count records (they reach it up to flush_interval
    after the access log)."""
    _, stream = yield subscribe(server, after=0, v=2)
    yield wait_for(lambda: any(hb["seq"] >= count for hb in stream.heartbeats()),
                   what=f"{count} records in the ring")
    stream.close()


def ring_of(response):
    """The X-Sfive-Ring header of an exporter response."""
    return response.headers.getRawHeaders(b"x-sfive-ring", [b""])[0].decode()


def epoch(record):
    return datetime.fromisoformat(record["time"]).timestamp()


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
    yield exported(nginx, 6)
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
    nginx = nginx_factory(ring_size=4, knobs=UNBATCHED)
    for i in range(10):  # one by one, so that seq follows the user agents
        yield fetch(nginx.url(SEG1), ua=f"v{i + 1}")
    yield exported(nginx, 10)
    _, stream = yield subscribe(nginx, after=1)
    yield wait_for(lambda: len(stream.lines) >= 5, what="gap line and 4 records")
    assert stream.lines[0] == {"lost": 5, "seq": 7}
    assert seqs(stream.lines[1:]) == [7, 8, 9, 10]
    assert [line["ua"] for line in stream.lines[1:]] == ["v7", "v8", "v9", "v10"]
    assert stream.raw[0] == b'{"lost":5,"seq":7}'
    stream.close()


@pytest_twisted.inlineCallbacks
def test_live_subscriber_lapped_by_the_ring_gets_a_gap_line(nginx_factory):
    nginx = nginx_factory(ring_size=4, knobs={"poll_interval": 1.5, **UNBATCHED})
    _, stream = yield subscribe(nginx)  # it polled once and now sleeps for 1.5 s
    for i in range(10):
        yield fetch(nginx.url(SEG1), ua=f"v{i + 1}")
    assert stream.lines == []
    yield wait_for(lambda: len(stream.lines) >= 5, what="gap line and 4 records")
    assert stream.lines[0] == {"lost": 6, "seq": 7}
    assert [line["ua"] for line in stream.lines[1:]] == ["v7", "v8", "v9", "v10"]
    stream.close()


@pytest.mark.parametrize("ring_bytes", [None, 32768], ids=["counted", "dict-full"])
@pytest_twisted.inlineCallbacks
def test_a_small_dict_keeps_the_newest_records_and_its_identity(nginx_factory, ring_bytes):
    # a 32 KB dict and ring_size 1000: the bytes bind; the oldest batches go (the dict's own
    # eviction never runs: the ring's identity and counters stay), the newest are all there.
    # With ring_bytes the whole dict, the dict is full before the count says so: safe_set's
    # "no memory" makes the oldest go as well.
    knobs = {"pending_timeout": 30, **UNBATCHED}
    if ring_bytes is not None:
        knobs["ring_bytes"] = ring_bytes
    nginx = nginx_factory(ring_size=1000, dict_size="32k", knobs=knobs)
    response, _ = yield subscribe(nginx, v=2)
    ring = ring_of(response)
    for _ in range(5):
        yield make_requests(nginx, 20)
    yield wait_for(lambda: len(nginx.access_log()) >= 100, what="100 requests logged")
    response, stream = yield subscribe(nginx, after=0, v=2)
    yield wait_for(lambda: any(line.get("seq") == 100 for line in stream.heartbeats()),
                   what="a heartbeat at the newest record")
    records = stream.records()
    assert 10 < len(records) < 90, "the dict held an unexpected number of records"
    first = records[0]["seq"]
    assert stream.lines[0] == {"lost": first - 1, "seq": first}
    assert seqs(records) == list(range(first, 101)), "the newest records are kept"
    assert all(hb["oldest"] >= first for hb in stream.heartbeats()[-1:])
    assert ring_of(response) == ring
    assert "no room" not in nginx.error_log()
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



# --- protocol 2: ring identity, start rules, heartbeats, draining at exit ---------------------


class Load:
    """Viewers requesting SEG1 without pause (concurrency at a time, each with its own user
    agent) until stop(); requests refused by a stopping nginx are simply not counted."""

    def __init__(self, server, concurrency=8, prefix="load"):
        self.server, self.concurrency, self.prefix = server, concurrency, prefix
        self.made = 0
        self.stopping = False
        self.done = self._run()

    @defer.inlineCallbacks
    def _run(self):
        while not self.stopping:
            batch = [fetch(self.server.url(SEG1), ua=f"{self.prefix}-{self.made + i}")
                     for i in range(self.concurrency)]
            self.made += self.concurrency
            yield defer.DeferredList(batch, consumeErrors=True)

    def stop(self):
        self.stopping = True
        return self.done


def exported_uas(records):
    uas = [r["ua"] for r in records]
    assert len(uas) == len(set(uas)), "a record was delivered twice"
    return set(uas)


def logged_uas(server, prefix):
    return {e["ua"] for e in server.access_log() if e["ua"].startswith(prefix)}


def check_heartbeats(lines):
    """Heartbeat promises over a stream: S is the last delivered seq, T is kept."""
    delivered, last_t = 0, 0.0
    for i, line in enumerate(lines):
        if "hb" in line:
            assert line["seq"] == delivered, f"heartbeat {line} after seq {delivered}"
            assert line["hb"] >= last_t, "T went back"
            last_t = line["hb"]
            late = [r for r in lines[i + 1:] if "time" in r and epoch(r) < last_t]
            assert not late, f"{len(late)} records older than T={last_t} after {line}: {late[0]}"
        elif "lost" in line:
            delivered = line["seq"] - 1
        else:
            assert line["seq"] == delivered + 1 or delivered == 0
            delivered = line["seq"]


@pytest_twisted.inlineCallbacks
def test_ring_identity_survives_a_reload_and_changes_with_a_restart(nginx):
    response, stream = yield subscribe(nginx, v=2)
    assert response.headers.getRawHeaders(b"x-sfive-protocol") == [b"2"]
    ring = ring_of(response)
    assert re.fullmatch(r"[0-9a-f]{16}", ring)
    yield make_requests(nginx, 3)
    yield wait_for(lambda: len(stream.records()) >= 3, what="3 records")
    nginx.reload()
    yield wait_for(lambda: stream.reason is not None, what="the old worker to end the stream")
    response, stream = yield subscribe(nginx, v=2, ring=ring, after=3)
    assert ring_of(response) == ring
    yield make_requests(nginx, 1)
    yield wait_for(lambda: stream.records(), what="a record after the reload")
    assert seqs(stream.records()) == [4]
    stream.close()

    nginx.stop()
    nginx.start()
    response, stream = yield subscribe(nginx, v=2, ring=ring, after=4)
    assert re.fullmatch(r"[0-9a-f]{16}", ring_of(response)) and ring_of(response) != ring
    yield make_requests(nginx, 2)
    yield wait_for(lambda: len(stream.records()) >= 2, what="records of the new ring")
    assert seqs(stream.records()) == [1, 2], "a new ring is read from its first record"
    stream.close()


@pytest_twisted.inlineCallbacks
def test_another_ring_streams_from_the_first_record_this_ring_holds(nginx_factory):
    nginx = nginx_factory(ring_size=4, knobs=UNBATCHED)
    for i in range(10):
        yield fetch(nginx.url(SEG1), ua=f"v{i + 1}")
    yield exported(nginx, 10)
    response, other = yield subscribe(nginx, v=2, ring="0123456789abcdef", after=9)
    _, same = yield subscribe(nginx, v=2, ring=ring_of(response), after=8)
    _, fresh = yield subscribe(nginx, v=2, ring="0123456789ABCDEF")
    for stream in (other, same, fresh):
        yield wait_for(lambda s=stream: s.heartbeats(), what="a first heartbeat")
    assert other.lines[:5] == [{"lost": 6, "seq": 7}] + other.records()[:4]
    assert [r["ua"] for r in other.records()] == ["v7", "v8", "v9", "v10"]
    assert seqs(same.records()) == [9, 10] and not any("lost" in r for r in same.lines)
    assert seqs(fresh.records()) == [7, 8, 9, 10]
    for stream in (other, same, fresh):
        stream.close()
    status, body = yield fetch(nginx.url("/sfive?v=2&ring=nothex"))
    assert status == 400 and b"'ring' must be a ring identity" in body
    status, body = yield fetch(nginx.url("/sfive?v=two"))
    assert status == 400 and b"'v' must be a protocol version" in body


@pytest_twisted.inlineCallbacks
def test_v1_subscribers_get_todays_lines_only(nginx_factory):
    nginx = nginx_factory(ring_size=4, knobs={"heartbeat_interval": 0.05})
    response, v1 = yield subscribe(nginx)
    # the headers whatever ?v asks (the tests' fake exporters answer so too)
    assert response.headers.getRawHeaders(b"x-sfive-protocol") == [b"2"]
    assert re.fullmatch(r"[0-9a-f]{16}", ring_of(response))
    _, v2 = yield subscribe(nginx, v=2)
    yield make_requests(nginx, 3)
    yield wait_for(lambda: len(v1.lines) >= 3 and len(v2.heartbeats()) >= 5,
                   what="3 records and a few heartbeats")
    assert all(list(line) == FIELDS for line in v1.lines)
    assert v1.raw == [r for r in v2.raw if b'"hb":' not in r]
    nginx.reload()
    yield wait_for(lambda: v1.reason is not None and v2.reason is not None,
                   what="both streams to end")
    assert all(list(line) == FIELDS for line in v1.lines)
    last = v2.lines[-1]
    assert list(last) == HEARTBEAT and last["seq"] == 3, "a last heartbeat ends the stream"
    assert re.fullmatch(rb'\{"seq":3,"hb":\d+\.\d{1,3},"oldest":1,"oldest-time":\d+\.\d{3}\}',
                        v2.raw[-1])


@pytest_twisted.inlineCallbacks
def test_heartbeats_keep_their_promises_over_a_busy_run(nginx_factory):
    nginx = nginx_factory(workers=2, knobs={"heartbeat_interval": 0.1})
    _, stream = yield subscribe(nginx, v=2)
    load = Load(nginx, concurrency=16)
    yield wait_for(lambda: load.made >= 600, timeout=20, what="600 requests")
    yield load.stop()
    yield wait_for(lambda: len(logged_uas(nginx, "load-")) == load.made, what="the access log")
    yield wait_for(lambda: len(stream.records()) >= load.made, what="every record")
    newest = max(epoch(r) for r in stream.records())
    yield wait_for(lambda: stream.heartbeats()[-1]["hb"] > newest, what="T to pass the records")
    assert exported_uas(stream.records()) == logged_uas(nginx, "load-")
    assert len({e["pid"] for e in nginx.access_log()}) == 2, "one worker served everything"
    check_heartbeats(stream.lines)
    beats = stream.heartbeats()
    assert len(beats) >= 5 and beats[-1]["seq"] == stream.records()[-1]["seq"]
    stream.close()


#: seconds a graceful stop or a reload may take with a subscriber streaming: the exporter's
#: bound is drain_max (2) + DRAIN_GRACE (0.5) + GUARD_POLL (0.25); the rest is for a loaded
#: 2-core machine. A write waiting for a stalled subscriber held the worker for 60-91 s.
EXIT_DEADLINE = 15


@pytest_twisted.inlineCallbacks
def test_a_reload_while_workers_log_loses_nothing(nginx):
    response, old = yield subscribe(nginx, v=2)
    load = Load(nginx)
    yield wait_for(lambda: load.made >= 100, what="100 requests")
    old_workers = yield threads.deferToThread(nginx.reload)
    yield wait_for(lambda: old.reason is not None, what="the old stream to end after draining")
    assert old.done.result and list(old.lines[-1]) == HEARTBEAT
    yield wait_for(lambda: not any(map(pid_alive, old_workers)), timeout=EXIT_DEADLINE,
                   what="the old workers to exit under load")
    _, new = yield subscribe(nginx, v=2, ring=ring_of(response), after=old.lines[-1]["seq"])
    made = load.made
    yield wait_for(lambda: load.made >= made + 50, what="50 requests after the reload")
    yield load.stop()
    yield wait_for(lambda: len(logged_uas(nginx, "load-")) == load.made, what="the access log")
    records = old.records() + new.records()
    yield wait_for(lambda: len(old.records()) + len(new.records()) >= load.made,
                   what="every record")
    records = old.records() + new.records()
    assert exported_uas(records) == logged_uas(nginx, "load-")
    assert seqs(records) == list(range(1, len(records) + 1))
    check_heartbeats(old.lines)
    new.close()


SLOW = "/slow/big.bin"


@pytest_twisted.inlineCallbacks
def test_a_graceful_stop_while_workers_log_loses_nothing(nginx_factory):
    # slow downloads still running when nginx is told to quit are logged only after the
    # stream's own worker has begun to exit: it must drain them (drain_quiet is made long
    # enough here for a busy machine)
    nginx = nginx_factory(
        knobs={"drain_quiet": 2, "drain_max": 4},
        files={**MEDIA_FILES, SLOW.lstrip("/"): bytes(1400)},
        extra_server="        location /slow/ { limit_rate 1k; }")  # the last 600 bytes: ~1 s
    _, stream = yield subscribe(nginx, v=2)
    load = Load(nginx)
    yield wait_for(lambda: load.made >= 100, what="100 requests")
    slow = yield defer.gatherResults([
        make_agent().request(b"GET", nginx.url(SLOW).encode(),
                             Headers({b"user-agent": [f"load-slow-{i}".encode()]}))
        for i in range(4)])  # their headers came: they are running
    took = yield threads.deferToThread(nginx.quit, EXIT_DEADLINE)
    assert nginx.forced_stops == 0 and took < EXIT_DEADLINE, f"the stop took {took:.1f}s"
    bodies = yield defer.gatherResults([treq.content(r) for r in slow])
    assert [len(b) for b in bodies] == [1400] * 4
    yield wait_for(lambda: stream.reason is not None, what="the stream to end")
    yield load.stop()
    assert stream.done.result and list(stream.lines[-1]) == HEARTBEAT
    logged = logged_uas(nginx, "load-")
    assert len(logged) >= 50 and {f"load-slow-{i}" for i in range(4)} <= logged
    assert exported_uas(stream.records()) == logged
    check_heartbeats(stream.lines)


#: records of ~2 KB each: 8 MB of stream, more than the kernel buffers a stalled subscriber's
#: connection (nginx's send buffer grows to 4 MB here, the reader's stays at 128 KB unread)
STALLED, STALLED_UA = 4000, 2000
STALL_WARNING = "did not take the stream's end within"


@pytest.mark.timeout(150)
@pytest.mark.parametrize("how", ["reload", "quit"])
@pytest_twisted.inlineCallbacks
def test_a_stalled_subscriber_does_not_hold_the_exiting_worker(nginx, how):
    # a subscriber that stops reading (stopped, hung, its machine overloaded) while requests
    # go on: the stream's write waits for it. Before the guard, the exiting worker waited in
    # that write for send_timeout (60 s) and as long again to send the response's end: a
    # reload left the old worker "shutting down" and a stop took 91 s (Debian's unit TERMs
    # after 5 s). Now the stream is cut drain_max + 0.5 s into the exit; after a reload the
    # subscriber resumes from the ring and loses nothing.
    response, stream = yield subscribe(nginx, v=2)
    stream.transport.pauseProducing()
    paths = [f"/stalled/{i}" for i in range(STALLED)]
    uas = [f"stalled-{i}-".ljust(STALLED_UA, "x") for i in range(STALLED)]
    answered = yield threads.deferToThread(burst, nginx, paths, uas)
    assert answered == STALLED
    yield exported(nginx, STALLED)
    began = time.monotonic()
    if how == "reload":
        old_workers = yield threads.deferToThread(nginx.reload)
        yield wait_for(lambda: not any(map(pid_alive, old_workers)), timeout=EXIT_DEADLINE,
                       what="the old workers to exit with a stalled subscriber")
    else:
        yield threads.deferToThread(nginx.quit, EXIT_DEADLINE)
        assert nginx.forced_stops == 0, "the graceful stop needed TERM"
    took = time.monotonic() - began
    assert took < EXIT_DEADLINE, f"the {how} took {took:.1f}s"
    assert STALL_WARNING in nginx.error_log(), "the subscriber's write was not held up"
    stream.transport.resumeProducing()
    yield wait_for(lambda: stream.reason is not None, what="the cut stream to end")
    assert stream.done.result is False, "a cut stream must not look like a clean end"
    assert not [line for line in stream.lines if "lost" in line]
    records = stream.records()
    assert len(records) < STALLED and seqs(records) == list(range(1, len(records) + 1))
    if how == "reload":  # the ring is kept: the subscriber resumes where it was cut
        _, new = yield subscribe(nginx, v=2, ring=ring_of(response),
                                 after=stream.lines[-1]["seq"])
        yield wait_for(lambda: len(records) + len(new.records()) >= STALLED, timeout=30,
                       what="the rest from the ring")
        records += new.records()
        new.close()
        assert seqs(records) == list(range(1, STALLED + 1))
        assert exported_uas(records) == logged_uas(nginx, "stalled-")
    else:  # what it had not taken went with nginx; what it took is the access log's
        assert exported_uas(records) <= logged_uas(nginx, "stalled-")


# --- per-worker batching ------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_records_still_buffered_when_a_worker_exits_are_delivered(nginx_factory):
    # a long flush_interval: the records are still in their workers' buffers when nginx is
    # reloaded, then stopped; the exiting workers' timers run at once and store them
    nginx = nginx_factory(knobs={"flush_interval": 1, "batch_size": 1000})
    response, stream = yield subscribe(nginx, v=2)
    yield make_requests(nginx, 6, prefix="reload")
    nginx.reload()
    yield wait_for(lambda: stream.reason is not None, what="the old stream to end")
    _, new = yield subscribe(nginx, v=2, ring=ring_of(response), after=stream.lines[-1]["seq"])
    yield make_requests(nginx, 5, prefix="quit")
    yield threads.deferToThread(nginx.quit)
    yield wait_for(lambda: new.reason is not None, what="the new stream to end")
    records = stream.records() + new.records()
    assert exported_uas(records) == logged_uas(nginx, "reload-") | logged_uas(nginx, "quit-")
    assert len(records) == 11 and seqs(records) == list(range(1, 12))
    assert list(new.lines[-1]) == HEARTBEAT and new.lines[-1]["seq"] == 11


@pytest_twisted.inlineCallbacks
def test_two_workers_batches_interleave_in_sequence_order(nginx_factory):
    nginx = nginx_factory(workers=2, knobs={"batch_size": 8})
    _, stream = yield subscribe(nginx, v=2)
    load = Load(nginx, concurrency=16)
    yield wait_for(lambda: load.made >= 400, timeout=20, what="400 requests")
    yield load.stop()
    yield wait_for(lambda: len(stream.records()) >= load.made, what="every record")
    records = stream.records()
    assert seqs(records) == list(range(1, load.made + 1))
    assert exported_uas(records) == logged_uas(nginx, "load-")
    worker = {e["ua"]: e["pid"] for e in nginx.access_log()}
    runs = [worker[r["ua"]] for r in records]
    switches = sum(1 for a, b in zip(runs, runs[1:]) if a != b)
    assert len(set(runs)) == 2 and switches >= 4, "the two workers' batches did not interleave"


@pytest_twisted.inlineCallbacks
def test_a_subscriber_resuming_inside_a_batch_misses_nothing_after_it(nginx_factory):
    nginx = nginx_factory(workers=1, knobs={"flush_interval": 1, "batch_size": 1000})
    yield make_requests(nginx, 20)  # one worker, within a second: one batch of 20
    yield exported(nginx, 20)
    streams = []
    for after in (0, 1, 7, 13, 19):
        _, stream = yield subscribe(nginx, v=2, after=after)
        streams.append((after, stream))
    for after, stream in streams:
        yield wait_for(lambda s=stream: s.heartbeats(), what="a heartbeat")
        assert seqs(stream.records()) == list(range(after + 1, 21)), f"after={after}"
        assert not any("lost" in line for line in stream.lines)
        stream.close()


@pytest_twisted.inlineCallbacks
def test_old_batches_are_deleted_and_a_lapped_subscriber_gets_a_gap(nginx_factory):
    nginx = nginx_factory(ring_size=30, dict_size="64k", knobs={"batch_size": 8})
    for _ in range(30):
        yield make_requests(nginx, 20)  # 600 records (~140 KB): 20 times the ring
    yield exported(nginx, 600)
    _, stream = yield subscribe(nginx, v=2, after=0)
    yield wait_for(lambda: any(hb["seq"] == 600 for hb in stream.heartbeats()),
                   what="the newest record")
    gap, *rest = [line for line in stream.lines if "hb" not in line]
    assert gap == {"lost": 570, "seq": 571}
    assert seqs(rest) == list(range(571, 601))
    assert "too small" not in nginx.error_log(), "old batches were not deleted"
    stream.close()


@pytest_twisted.inlineCallbacks
def test_a_reload_from_the_one_slot_per_record_exporter_starts_a_new_ring(nginx_factory,
                                                                          tmp_path):
    # an upgrade: nginx runs the exporter of protocol 1 (one dict slot per record), the package
    # brings this one, nginx is reloaded: no old slot may stay behind in the dict
    old = tmp_path / "exporter"
    old.mkdir()
    (old / "sfive.conf").write_text(OLD_CONF)
    (old / "sfive.lua").write_text(OLD_LUA)
    nginx = nginx_factory(source_dir=old)
    _, stream = yield subscribe(nginx)
    yield make_requests(nginx, 3)
    yield wait_for(lambda: len(stream.lines) >= 3, what="3 records of the old exporter")
    (old / "sfive.lua").write_text((SNIPPET.parent / "sfive.lua").read_text())
    old_workers = nginx.reload()
    yield wait_for(lambda: not any(map(pid_alive, old_workers)), what="the old workers to exit")
    response, stream = yield subscribe(nginx, v=2, after=3)
    assert re.fullmatch(r"[0-9a-f]{16}", ring_of(response))
    yield make_requests(nginx, 2)
    yield wait_for(lambda: len(stream.records()) >= 2, what="records of the new ring")
    assert seqs(stream.records()) == [1, 2]
    stream.close()


OLD_CONF = """lua_shared_dict sfive 64m;
lua_package_path "/usr/share/sfive-ngxlua/nginx/?.lua;;";
init_by_lua_block { require("sfive").configure({ dict = "sfive", ring_size = 100000, }) }
log_by_lua_block { require("sfive").log() }
"""

# the log phase of the exporter of protocol 1, as it stored records (the serving part follows
# from the stream's point of view the same ring)
OLD_LUA = """
local M = {}
local config = { dict = "sfive", ring_size = 100000 }
function M.configure(opts) for k, v in pairs(opts) do config[k] = v end return M end
function M.log()
    local dict = ngx.shared[config.dict]
    local seq = dict:incr("seq", 1, 0)
    dict:set(seq % config.ring_size, string.format('{"seq":%d,"time":"%s","client":"%s",'
        .. '"ua":"%s","url":"%s","status":%d,"bytes-sent":%d}', seq,
        "2026-01-01T00:00:00.000+00:00", ngx.var.remote_addr, ngx.var.http_user_agent or "",
        ngx.var.uri, ngx.var.status, ngx.var.bytes_sent))
end
function M.serve()
    local dict = ngx.shared[config.dict]
    local cursor = (dict:get("seq") or 0) + 1
    ngx.header.content_type = "application/x-ndjson"
    ngx.send_headers()
    ngx.flush(true)
    while not ngx.worker.exiting() do
        local line = dict:get(cursor % config.ring_size)
        if line and line:find('{"seq":' .. cursor .. ",", 1, true) == 1 then
            ngx.print(line, "\\n")
            ngx.flush(true)
            cursor = cursor + 1
        else
            ngx.sleep(0.05)
        end
    end
end
return M
"""


# --- a ring bounded in bytes: the oldest batches go, never the newest ---------------------------


def ordinary_after_a_burst(nginx, bursts, ua_bytes, ordinary):
    """``bursts`` requests with distinct user agents of ``ua_bytes`` (a scanner: 404s), then
    ``ordinary`` viewers of SEG1, each pipelined as fast as nginx serves them (lab.nginx.burst)."""
    scans = burst(nginx, [f"/scan/{i}" for i in range(bursts)],
                  [f"bot-{i}-".ljust(ua_bytes, "x") for i in range(bursts)])
    viewers = burst(nginx, [SEG1] * ordinary, [f"viewer-{i}" for i in range(ordinary)])
    return scans, viewers


@pytest.mark.timeout(180)
@pytest.mark.parametrize("capped", [True, False], ids=["shipped", "uncapped"])
@pytest_twisted.inlineCallbacks
def test_a_burst_of_huge_user_agents_does_not_starve_the_ordinary_records(nginx_factory, capped):
    # the shipped dict size and ring_size: 12,000 user agents of 7 KB are more than the dict
    # holds. Before the ring was bounded in bytes, the *newest* batches were refused and the
    # ordinary requests after the burst were lost until ring_size records later (488 and 1000
    # of 1000 in two runs). Shipped, the user agents are cut to max_ua_bytes and all fit;
    # uncapped (max_ua_bytes 8192) the byte bound deletes the oldest batches instead.
    knobs = {"pending_timeout": 30} if capped else {"pending_timeout": 30, "max_ua_bytes": 8192}
    nginx = nginx_factory(knobs=knobs)
    response, _ = yield subscribe(nginx, v=2)
    scans, viewers = yield threads.deferToThread(ordinary_after_a_burst, nginx, 12_000, 7000,
                                                 1000)
    assert (scans, viewers) == (12_000, 1000)
    again, stream = yield subscribe(nginx, after=0, v=2)
    yield wait_for(lambda: any(hb["seq"] >= 13_000 for hb in stream.heartbeats()),
                   timeout=60, what="the newest record (no stall on deleted batches)")
    records = stream.records()
    got = {r["ua"] for r in records if r["ua"].startswith("viewer-")}
    lost = 1000 - len(got)
    gaps = [line for line in stream.lines if "lost" in line]
    print(f"ordinary records lost: {lost} of 1000; burst records held {len(records) - len(got)}, "
          f"gaps {gaps}")
    assert lost == 0
    assert seqs(records) == list(range(records[0]["seq"], 13_001)), "a hole after the oldest"
    if capped:
        assert gaps == [] and {len(r["ua"]) for r in records if r["ua"].startswith("bot-")} \
            == {2048}
    else:
        assert gaps == [{"lost": records[0]["seq"] - 1, "seq": records[0]["seq"]}]
        assert stream.heartbeats()[-1]["oldest"] == records[0]["seq"]
    assert ring_of(again) == ring_of(response), "the dict's eviction took the ring's identity"
    assert "no room" not in nginx.error_log()
    stream.close()


@pytest_twisted.inlineCallbacks
def test_a_live_subscriber_lapped_by_the_byte_bound_gets_its_gap_without_a_stall(nginx_factory):
    # ring_size would hold everything, the bytes (16 KB) hold a few dozen records: the deleted
    # batches are below the "gc" marker, so the subscriber (asleep for 1.5 s) learns at once
    # that they are gone instead of waiting pending_timeout (30 s) on each of them
    nginx = nginx_factory(dict_size="1m", knobs={"ring_bytes": 16384, "poll_interval": 1.5,
                                                 "pending_timeout": 30, **UNBATCHED})
    _, stream = yield subscribe(nginx, v=2)
    yield wait_for(lambda: stream.heartbeats(), what="the first heartbeat")
    made = yield threads.deferToThread(burst, nginx, [SEG1] * 400,
                                       [f"v{i}" for i in range(400)])
    assert made == 400
    yield wait_for(lambda: any(hb["seq"] == 400 for hb in stream.heartbeats()), timeout=15,
                   what="the newest record, past the deleted batches")
    records = stream.records()
    gaps = [line for line in stream.lines if "lost" in line]
    assert gaps and sum(g["lost"] for g in gaps) + len(records) == 400
    assert 10 < len(records) < 100 and seqs(records)[-1] == 400
    assert stream.heartbeats()[-1]["oldest"] <= records[-1]["seq"]
    stream.close()


@pytest_twisted.inlineCallbacks
def test_the_service_knows_the_ring_history_from_the_real_exporter(nginx_factory):
    # the heartbeats name the oldest record held and its time; before, the service read
    # X-Sfive-Ring-Size, which sfive.lua never sent: ring_history was always "-"
    from helpers.faults import Running, settings

    nginx = nginx_factory(ring_size=50, knobs=UNBATCHED)
    _, stream = yield subscribe(nginx, v=2)
    yield wait_for(lambda: stream.heartbeats(), what="a first heartbeat")
    assert stream.lines[0] == {"seq": 0, "hb": stream.lines[0]["hb"]}, "an empty ring: no history"
    yield make_requests(nginx, 20, prefix="early")
    yield wait_for(lambda: len(stream.records()) >= 20, what="the first 20 records")
    yield make_requests(nginx, 40, prefix="late")
    yield wait_for(lambda: len(stream.records()) >= 60, what="all 60 records")
    times = {r["seq"]: epoch(r) for r in stream.records()}
    yield wait_for(lambda: stream.heartbeats()[-1]["hb"] > times[60] + 1, what="a second more")
    run = Running(settings(url=nginx.url("/sfive"))).start()
    try:
        yield wait_for(lambda: run.stats.ring_history, what="the ring's history")
        beat = run.fetch.pipeline.heartbeat
        assert (beat.seq, beat.oldest, run.stats.ring_size) == (60, 11, 50)
        assert beat.time - times[11] - 0.002 <= run.stats.ring_history \
            <= beat.time - times[1] + 0.002
    finally:
        yield run.stop()
        stream.close()


@pytest_twisted.inlineCallbacks
def test_user_agents_and_urls_are_cut_on_a_utf8_boundary(nginx_factory):
    # shipped max_ua_bytes 2048 = 4 x the service's default --max-ua-length 512: even a user
    # agent of 4-byte characters keeps the 512 characters the service counts, as the access log
    # does; a URL over max_url_bytes (64 here) is cut, marked, and rejected by the service
    from sfive_ngxlua.records import RecordParser
    from sfive_ngxlua.settings import Settings

    nginx = nginx_factory(knobs={"max_url_bytes": 64})
    _, stream = yield subscribe(nginx)
    emoji = "\U0001f3a5" * 600                                  # 2400 bytes
    mixed = "a" * 2047 + "é" + "b" * 100                        # the cut would split the é
    yield fetch(nginx.url(SEG1), ua=emoji)
    yield fetch(nginx.url(SEG1), ua=mixed)
    long_url = "/live/hls/foo-high/" + "ü" * 30 + ".ts"         # 19 + 60 + 3 bytes
    yield fetch(nginx.url(long_url.replace("ü", "%C3%BC")), ua="player")
    yield wait_for(lambda: len(stream.lines) >= 3 and len(nginx.access_log()) >= 3,
                   what="3 records")
    first, second, third = stream.lines[:3]
    assert first["ua"] == "\U0001f3a5" * 512 and second["ua"] == "a" * 2047
    log = nginx.access_log()
    for line, entry in zip(stream.lines[:2], log):
        assert line["ua"][:512] == entry["ua"][:512], "the service would count another client"
    assert third["url"] == "/live/hls/foo-high/" + "ü" * 22  # 63 bytes: the 23rd would split
    assert third["url-truncated"] == 82 and third["status"] == 404
    assert list(third) == FIELDS[:5] + ["url-truncated"] + FIELDS[5:]
    parse = RecordParser(Settings(streamers=(("foo", "hls", "high"),))).parse
    assert parse(stream.raw[2]) == "status"
    assert parse(stream.raw[2].replace(b'"status":404', b'"status":200')) == "url-truncated"
    stream.close()
