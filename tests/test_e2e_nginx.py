"""The whole chain: real viewers -> private nginx with the exporter -> the service -> a hub socket.

The service is built by makeService from a parsed command line and runs on the real reactor
(1-second intervals), reading the real nginx stream and sending to a real unix datagram socket.
What the hub receives must equal, per interval and streamer, what nginx's own access log says.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections import defaultdict
from datetime import datetime, timezone

import pytest
import pytest_twisted
from support import DatagramHub, wait_for
from twisted.internet import defer, task

from lab.nginx import MEDIA_FILES, fetch
from sfive_ngxlua.service import makeService
from sfive_ngxlua.settings import DEFAULT_NAMEFORMAT, Options

pytestmark = pytest.mark.timeout(90)

STREAMERS = {(c, f, q) for c in ("foo", "bar") for f in ("hls", "dash") for q in ("high", "low")}
FILES = {**MEDIA_FILES, "live/hls/baz-high/seg1.ts": b"x" * 5000}  # a streamer not configured
STATUSES = (200, 206)


def start_service(nginx, hub, grace=1):
    """The service as twistd builds it, with 1 s intervals, reporting to hub. Exactness rests on
    the exporter's watermark (protocol 2 heartbeats), not on timing: an interval is reported
    once the service has read everything nginx logged up to its end plus grace, however busy
    the machine is."""
    options = Options()
    options.parseOptions(["-S", "foo,bar/hls,dash/high,low", "-u", nginx.url("/sfive"),
                          "-s", hub.path, "-n", "edge1", "-t", "e2e", "-d", "1",
                          "--grace", str(grace)])
    service = makeService(options)
    service.startService()
    return service


def interval_of(entry):
    return int(float(entry["msec"]))


def expected_from_access_log(log):
    """(interval start, streamer) -> {(ip, ua): bytes}, as the service should count them."""
    pattern = re.compile(DEFAULT_NAMEFORMAT)
    out = defaultdict(lambda: defaultdict(int))
    for entry in log:
        match = pattern.match(entry["uri"])
        if entry["status"] not in STATUSES or match is None:
            continue
        streamer = (match["content"], match["format"], match["quality"])
        if streamer in STREAMERS:
            out[(interval_of(entry), streamer)][(entry["client"], entry["ua"])] += \
                entry["bytes_sent"]
    return out


def by_interval(datasets):
    """(interval start, streamer) -> {(ip, ua): bytes}, checking each dataset's own totals."""
    out = {}
    for d in datasets:
        start = int(datetime.strptime(d["start-time"], "%Y-%m-%dT%H:%M:%SZ")
                    .replace(tzinfo=timezone.utc).timestamp())
        sid = d["streamer-id"]
        key = (start, (sid["content-id"], sid["format"], sid["quality"]))
        assert key not in out, f"two datasets for {key}"
        clients = {(c["ip"], c["user-agent"]): c["bytes-sent"] for c in d["data"]["clients"]}
        assert len(clients) == len(d["data"]["clients"])
        assert d["data"]["client-count"] == len(clients)
        assert d["data"]["bytes-sent"] == sum(clients.values())
        out[key] = clients
    return out


def assert_exact(datasets, log):
    """Every (interval, streamer) in the hub's datasets equals the access log; none missing."""
    got = by_interval(datasets)
    expected = expected_from_access_log(log)
    assert expected, "no countable requests in the access log"
    missing = set(expected) - set(got)
    assert not missing, f"no dataset for {sorted(missing)}"
    for key, clients in got.items():
        assert clients == dict(expected.get(key, {})), key
    assert {streamer for _, streamer in got} == STREAMERS


@defer.inlineCallbacks
def viewers(nginx, tag):
    """A mix of viewers: three client addresses, several players, 200s, 206s, 404s, HEADs."""
    requests = [
        ("127.0.0.1", "Mozilla/5.0 Firefox/120.0", "/live/hls/foo-high/index.m3u8", {}, "GET"),
        ("127.0.0.1", "Mozilla/5.0 Firefox/120.0", "/live/hls/foo-high/seg1.ts", {}, "GET"),
        ("127.0.0.1", "Mozilla/5.0 Firefox/120.0", "/live/hls/foo-high/seg2.ts", {}, "GET"),
        ("127.0.0.1", "VLC/3.0.18", "/live/hls/foo-low/seg1.ts", {}, "GET"),
        ("127.0.0.2", "ExoPlayerLib/2.18.1", "/live/dash/bar-low/seg.m4s",
         {"Range": "bytes=0-4095"}, "GET"),
        ("127.0.0.2", "ExoPlayerLib/2.18.1", "/live/dash/bar-low/seg1.m4s",
         {"Range": "bytes=4096-"}, "GET"),
        ("127.0.0.2", "ExoPlayerLib/2.18.1", "/live/dash/bar-low/seg9.m4s", {}, "GET"),
        ("127.0.0.3", "AppleCoreMedia/1.0", "/live/hls/foo-high/seg1.ts", {}, "HEAD"),
        ("127.0.0.3", "AppleCoreMedia/1.0", "/live/hls/foo-high/seg1.ts",
         {"Range": "bytes=100-199"}, "GET"),
        ("127.0.0.3", "AppleCoreMedia/1.0", "/live/hls/baz-high/seg1.ts", {}, "GET"),
        ("127.0.0.3", "curl/7.88.1", "/index.html", {}, "GET"),
    ]
    statuses = yield defer.gatherResults([
        fetch(nginx.url(path), ua=f"{ua} {tag}", headers=headers, method=method, bind=ip)
        for ip, ua, path, headers, method in requests])
    return sorted(status for status, _ in statuses)


@defer.inlineCallbacks
def settle(nginx, services, hubs):
    """Wait until every logged request is counted and its interval reported, then stop."""
    log = [e for e in nginx.access_log() if e["uri"] != "/sfive"]
    last = max(map(interval_of, log))
    for service in services:
        yield wait_for(lambda s=service: s.stats.lines >= len(log), timeout=30,
                       what="all lines read")
    for hub in hubs:
        yield wait_for(lambda h=hub: sum(
            1 for d in h.read() if d["start-time"] == time.strftime(
                "%Y-%m-%dT%H:%M:%SZ", time.gmtime(last))) == len(STREAMERS),
            timeout=30, what="the last interval reported")
    for service in services:
        yield service.stopService()


@pytest.fixture
def hubs(tmp_path):
    """Make hub sockets that are read all the time, as the real hub does (its queue is short)."""
    made = []

    def make(name="hub"):
        hub = DatagramHub(str(tmp_path / f"{name}.sock"))
        reader = task.LoopingCall(hub.read)
        reader.start(0.02)
        made.append((hub, reader))
        return hub

    yield make
    for hub, reader in made:
        reader.stop()
        hub.close()


@pytest.fixture
def services():
    running = []
    yield running
    for service in running:
        if service.running:
            service.stopService()


@defer.inlineCallbacks
def connected(service):
    yield wait_for(lambda: service.stats.exporter_connected, what="the service to connect")
    assert service.stats.exporter_protocol == 2, "the shipped exporter speaks protocol 2"
    yield wait_for(lambda: time.time() >= service.model.first * service.model.duration,
                   what="the first interval")


@pytest_twisted.inlineCallbacks
def test_two_services_report_exactly_what_nginx_served(nginx_factory, hubs, services):
    nginx = nginx_factory(files=FILES)
    hub_a, hub_b = hubs("a"), hubs("b")
    services += [start_service(nginx, hub_a), start_service(nginx, hub_b)]
    for service in services:
        yield connected(service)
    for round_ in range(3):
        statuses = yield viewers(nginx, f"r{round_}")
        assert statuses == [200] * 6 + [206] * 3 + [404] * 2
        second = int(time.time())
        yield wait_for(lambda s=second: time.time() >= s + 1, what="the next interval")
    yield settle(nginx, services, [hub_a, hub_b])
    log = nginx.access_log()
    assert_exact(hub_a.read(), log)
    assert by_interval(hub_a.read()) == by_interval(hub_b.read())
    for service in services:
        assert service.stats.lost == 0 and service.stats.late == 0
        assert service.stats.rejected["status"] == 6
        assert service.stats.rejected["unknown-streamer"] == 3
        assert service.stats.rejected["url-mismatch"] == 0  # 404 for /index.html: status first


@defer.inlineCallbacks
def watched_with_traffic(nginx_factory, hubs, services):
    """nginx, a hub and a service that has read the first viewers' lines."""
    nginx = nginx_factory(files=FILES)
    hub = hubs()
    # the default grace: while the stream is cut the watermark stands still, so the intervals
    # of the gap are held, and the records ?after brings back find them open (not late)
    service = start_service(nginx, hub)
    services.append(service)
    yield connected(service)
    yield viewers(nginx, "before")
    yield wait_for(lambda: service.stats.lines >= 11, what="the first lines")
    return nginx, hub, service


@defer.inlineCallbacks
def after_one_reconnect(nginx, hub, service):
    """The last round of viewers; then the hub must hold every request of all three rounds,
    exactly once, over one reconnect."""
    yield viewers(nginx, "after")
    yield settle(nginx, [service], [hub])
    assert service.stats.exporter_reconnects == 1
    assert service.stats.lost == service.stats.late == 0
    assert service.stats.lines == 33
    assert_exact(hub.read(), nginx.access_log())


@pytest_twisted.inlineCallbacks
def test_records_of_a_cut_come_back_through_after(nginx_factory, hubs, services):
    nginx, hub, service = yield watched_with_traffic(nginx_factory, hubs, services)
    for pid in nginx.worker_pids():  # the cut: nginx's master replaces the killed workers
        os.kill(pid, signal.SIGKILL)
    yield wait_for(lambda: not service.stats.exporter_connected, what="the service to notice")
    yield wait_for(lambda: len(nginx.worker_pids()) == 2, what="new workers")
    statuses = yield viewers(nginx, "during")
    assert len(statuses) == 11
    yield wait_for(lambda: service.stats.exporter_connected, timeout=30, what="the reconnect")
    yield after_one_reconnect(nginx, hub, service)


@pytest_twisted.inlineCallbacks
def test_reload_does_not_stop_the_chain(nginx_factory, hubs, services):
    nginx, hub, service = yield watched_with_traffic(nginx_factory, hubs, services)
    ring = service.getServiceNamed("fetch").ring
    nginx.reload()
    yield wait_for(lambda: not service.stats.exporter_connected, what="the stream to end")
    yield viewers(nginx, "during")
    yield wait_for(lambda: service.stats.exporter_connected, timeout=30, what="the reconnect")
    # a reload keeps the ring: the service resumes after its sequence number in the same ring
    assert service.getServiceNamed("fetch").ring == ring is not None
    yield after_one_reconnect(nginx, hub, service)
