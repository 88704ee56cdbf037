"""The real chain's parts, for the tests that disrupt it (test_disruption, test_chaos): a TCP
proxy in front of nginx that cuts and refuses, the hub's datagram socket read all the time (or
away), the service as a ``twistd`` subprocess (so that it can be sent SIGTERM and SIGKILL),
viewers making real requests to 127.0.0.1, and the truth (nginx's access log) per interval,
streamer and client.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Sequence

from support import DatagramHub, wait_for
from twisted.internet import defer, reactor, task
from twisted.protocols import portforward

from lab.nginx import fetch
from sfive_ngxlua.settings import DEFAULT_NAMEFORMAT

TWISTD = str(Path(sys.executable).with_name("twistd"))
STREAMERS = {("foo", "hls", "high"), ("foo", "hls", "low"), ("bar", "dash", "low")}
SPECS = ["-S", "foo/hls/high,low", "-S", "bar/dash/low"]
VIEWERS = [  # (bind address, user agent, path, headers)
    ("127.0.0.1", "Firefox/120.0", "/live/hls/foo-high/seg1.ts", {}),
    ("127.0.0.1", "Firefox/120.0", "/live/hls/foo-high/seg2.ts", {}),
    ("127.0.0.2", "VLC/3.0.18", "/live/hls/foo-low/seg1.ts", {}),
    ("127.0.0.3", "ExoPlayerLib/2.18.1", "/live/dash/bar-low/seg.m4s",
     {"Range": "bytes=0-4095"}),
    ("127.0.0.3", "ExoPlayerLib/2.18.1", "/live/dash/bar-low/seg1.m4s", {}),
    ("127.0.0.4", "AppleCoreMedia/1.0", "/live/hls/foo-high/missing.ts", {}),  # 404
]


# -- the parts -----------------------------------------------------------------------------------


class _Tracked(portforward.ProxyServer):
    def connectionMade(self) -> None:
        self.factory.proxy.open.add(self)
        super().connectionMade()

    def connectionLost(self, reason: object = None) -> None:
        self.factory.proxy.open.discard(self)
        super().connectionLost(reason)


class Proxy:
    """A TCP proxy in front of nginx on a fixed port: ``refuse()`` cuts every connection and
    stops listening (connections are refused), ``accept()`` listens again; ``target`` can be
    moved (an nginx restarted on another port)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.open: set = set()
        self.number = 0
        self.port = None
        self.accept()

    def accept(self) -> None:
        factory = portforward.ProxyFactory("127.0.0.1", self.target)
        factory.protocol = _Tracked
        factory.proxy = self
        factory.noisy = False
        self.port = reactor.listenTCP(self.number, factory, interface="127.0.0.1")
        self.number = self.port.getHost().port

    def retarget(self, port: int) -> None:
        self.target = port
        if self.port is not None:  # else accept() listens with the new target
            self.port.factory.port = port

    def refuse(self) -> defer.Deferred:
        for conn in list(self.open):
            conn.transport.abortConnection()
        port, self.port = self.port, None
        return defer.maybeDeferred(port.stopListening)

    def url(self) -> str:
        return f"http://127.0.0.1:{self.number}/sfive"

    def close(self) -> defer.Deferred:
        return self.refuse() if self.port is not None else defer.succeed(None)


class Hub:
    """The hub's datagram socket, read all the time (as the real hub does), or away."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.earlier: list = []
        self.hub = None
        self.reader = task.LoopingCall(self._read)
        self.open()
        self.reader.start(0.02)

    def open(self) -> None:
        self.hub = DatagramHub(self.path)

    def away(self) -> None:
        """Close and remove the socket (the service's sends are refused)."""
        self._read()
        self.earlier += self.hub.datagrams
        self.hub.close()
        self.hub = None

    def _read(self) -> None:
        if self.hub is not None:
            self.hub.read()

    @property
    def received(self) -> list:
        return self.earlier + (self.hub.datagrams if self.hub is not None else [])

    def datasets(self) -> list:
        return [json.loads(d) for d in self.received]

    def close(self) -> None:
        if self.reader.running:
            self.reader.stop()
        if self.hub is not None:
            self.hub.close()


class Service:
    """``twistd -n sfive-ngxlua`` with 1 s intervals and a state dir, as a subprocess, reading
    the exporter at ``url`` (or ``source``: other source options, e.g. ``("--file", PATH)``,
    with ``specs`` for its streamers)."""

    def __init__(self, tmp_path: Path, url: str, hub: str, *extra: str,
                 source: Optional[Sequence[str]] = None,
                 specs: Sequence[str] = SPECS) -> None:
        self.logfile = tmp_path / "service.log"
        source = ["-u", url] if source is None else list(source)
        self.args = [TWISTD, "-n", "--pidfile=", "-l", str(self.logfile), "sfive-ngxlua",
                     *specs, *source, "-s", hub, "-n", "edge1", "-d", "1",
                     "--state-dir", str(tmp_path / "state"), *extra]
        self.proc = None
        self.starts = 0

    def launch(self) -> None:
        """Start the process (without waiting for anything)."""
        self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self.starts += 1

    def start(self) -> defer.Deferred:
        """Start and wait until it is connected to the exporter."""
        connected = self.log().count("connected to http")
        self.launch()
        return wait_for(lambda: self.log().count("connected to http") > connected
                        or self._died(), timeout=30, what="the service to connect")

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _died(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"the service exited ({self.proc.returncode}):\n"
                                 + self.log()[-3000:])
        return False

    def stop(self, sig: int = signal.SIGTERM) -> defer.Deferred:
        """Send ``sig`` and wait for the process to end."""
        self.proc.send_signal(sig)
        return wait_for(lambda: self.proc.poll() is not None, timeout=30,
                        what="the service to exit")

    def log(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def figures(self) -> dict:
        """The counters since start of the last per-interval log line (this process's)."""
        lines = [line for line in self.log().splitlines() if ") reported: " in line]
        assert lines, self.log()[-3000:]
        return {k: int(v) for k, v in re.findall(r" total\.([a-z_]+)=(\d+)\b", lines[-1])}

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class Viewers:
    """Requests to nginx, one after the other, for as long as they run (through ``base``, which
    the test may move)."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.made = 0
        self.failed = 0
        self._running = True
        self.done = self._run()

    @defer.inlineCallbacks
    def _run(self):
        i = 0
        while self._running:
            bind, ua, path, headers = VIEWERS[i % len(VIEWERS)]
            i += 1
            try:
                yield fetch(self.base + path, ua=ua, headers=headers, bind=bind)
                self.made += 1
            except Exception:
                self.failed += 1
            yield task.deferLater(reactor, 0.03, lambda: None)

    def stop(self) -> defer.Deferred:
        self._running = False
        return self.done


# -- the truth -----------------------------------------------------------------------------------


def start_of(dataset: dict) -> int:
    return int(datetime.strptime(dataset["start-time"], "%Y-%m-%dT%H:%M:%SZ")
               .replace(tzinfo=timezone.utc).timestamp())


def expected_from(log: list) -> dict:
    """(interval start, streamer) -> {(ip, ua): bytes} of the access log."""
    pattern = re.compile(DEFAULT_NAMEFORMAT)
    out: dict = defaultdict(lambda: defaultdict(int))
    for entry in log:
        match = pattern.match(entry["uri"])
        if entry["status"] not in (200, 206) or match is None:
            continue
        streamer = (match["content"], match["format"], match["quality"])
        if streamer in STREAMERS:
            out[(int(float(entry["msec"])), streamer)][(entry["client"], entry["ua"])] += \
                entry["bytes_sent"]
    return out


def received(datasets: list, duplicates: int = 0) -> dict:
    """(interval start, streamer) -> clients; ``duplicates`` datasets at most may come twice,
    identical (a delivery in flight at a SIGKILL: one per kill, each dataset is deleted from
    the queue before the next goes out)."""
    out: dict = {}
    raw: dict = {}
    for d in datasets:
        sid = d["streamer-id"]
        key = (start_of(d), (sid["content-id"], sid["format"], sid["quality"]))
        assert d["duration-ms"] == 1000, f"a partial dataset {key}: {d['duration-ms']} ms"
        clients = {(c["ip"], c["user-agent"]): c["bytes-sent"] for c in d["data"]["clients"]}
        assert d["data"]["client-count"] == len(clients)
        assert d["data"]["bytes-sent"] == sum(clients.values())
        if key in out:
            assert d == raw[key], f"two different datasets for {key}"
            duplicates -= 1
            assert duplicates >= 0, f"two datasets for {key}: more twice than kills"
            continue
        out[key], raw[key] = clients, d
    return out


def assert_exact(datasets: list, log: list, since: int, duplicates: int = 0) -> None:
    """Every interval from ``since`` to the last reported one: the hub's datasets equal the
    access log's clients and bytes, for every streamer, none missing."""
    got = received(datasets, duplicates)
    last = max(start for start, _ in got)
    expected = {k: dict(v) for k, v in expected_from(log).items() if since <= k[0] <= last}
    assert expected, "no countable requests in the access log"
    for start in range(since, last + 1):
        for streamer in STREAMERS:
            key = (start, streamer)
            assert key in got, f"no dataset for {key}"
            assert got[key] == expected.get(key, {}), key


def lost_lines(truth: list, files: list) -> list:
    """The access log's entries in none of ``files`` (the sfive format, nginx/sfive-log.conf),
    counted as a multiset: the lines copytruncate's window lost."""
    written: Counter = Counter()
    for name in files:
        with open(name, "rb") as f:
            for raw in f:
                obj = json.loads(raw)
                written[(int(datetime.fromisoformat(obj["time"]).timestamp()), obj["client"],
                         obj["ua"], obj["url"], obj["bytes-sent"])] += 1
    lost = []
    for entry in truth:
        key = (int(float(entry["msec"])), entry["client"], entry["ua"], entry["uri"],
               entry["bytes_sent"])
        if written[key] > 0:
            written[key] -= 1
        else:
            lost.append(entry)
    return lost
