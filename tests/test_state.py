"""The state store (--state-dir) on real SQLite files: permissions, the lock, a corrupt or newer
file, a version-1 file, a full disk, a state saved under other settings, the disk queue, and
the service through a stop, a restart and crashes injected where they matter (between closing
an interval and committing it; between sending a dataset and marking it sent).

The exporter is a real HTTP server that keeps a ring and answers ``?after=N`` as nginx/sfive.lua
does; the hub is a real unix datagram socket; timers run on a task.Clock.
"""

from __future__ import annotations

import os
import sqlite3
from collections import Counter
from datetime import datetime

import pytest
import pytest_twisted
import simplejson
from helpers.faults import (
    STREAMERS,
    T0,
    DatagramHub,
    Exporter,
    clock_at,
    heartbeat,
    record,
    settings,
)
from support import wait_for
from twisted.internet import reactor

from sfive_ngxlua.datasets import start_time
from sfive_ngxlua.model import IntervalModel
from sfive_ngxlua.records import Record
from sfive_ngxlua.service import build, makeService, report_saved, restore_model
from sfive_ngxlua.settings import Options
from sfive_ngxlua.stats import Stats
from sfive_ngxlua.store import STATE_FILE, SqliteQueue, StateLocked, StateStore

pytest_plugins = ("helpers.fixtures",)

HIGH = STREAMERS[0]

# The layout release 1 writes, frozen here: a later release must still open such a file.
V1_FILE = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE clients (id INTEGER PRIMARY KEY, k INTEGER NOT NULL, s INTEGER NOT NULL,
                      ip TEXT NOT NULL, ua TEXT NOT NULL);
CREATE INDEX clients_k ON clients (k);
CREATE TABLE counts (id INTEGER PRIMARY KEY, bytes INTEGER NOT NULL);
CREATE TABLE folded (k INTEGER NOT NULL, s INTEGER NOT NULL, h INTEGER NOT NULL,
                     PRIMARY KEY (k, s, h)) WITHOUT ROWID;
CREATE TABLE queue (id INTEGER PRIMARY KEY AUTOINCREMENT, data BLOB NOT NULL);
PRAGMA user_version=1;
"""


def state_settings(tmp_path, **kw):
    return settings(state_dir=str(tmp_path / "state"), **kw)


def opened(tmp_path, stats=None, **kw):
    s = state_settings(tmp_path, **kw)
    stats = stats if stats is not None else Stats()
    return StateStore(s.state_dir, s, stats, clock_at()), s, stats


def restore(store, queue=None):
    """What the service does at its start: the saved model (or None)."""
    return restore_model(store, store.tables.settings, store.stats, queue)[0]


def norm(snapshot):
    """A snapshot with its client lists sorted (their order is not significant)."""
    for streams in snapshot["open"].values():
        for entry in streams.values():
            entry["clients"].sort()
            entry["folded"].sort()
    return snapshot


def rec(t, client="10.0.0.1", ua="ua/1", sent=100, streamer=HIGH):
    return Record(t, streamer, client, ua, sent)


# -- files, lock, damage -----------------------------------------------------------------------


def test_directory_0700_and_files_0600_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        store, s, stats = opened(tmp_path)
        model = IntervalModel(s, stats, start=T0)
        model.add(rec(T0 + 1))
        assert store.checkpoint(model, {"kind": "exporter", "ring": None, "seq": 1})
    finally:
        os.umask(old)
    directory = tmp_path / "state"
    assert directory.stat().st_mode & 0o777 == 0o700
    names = sorted(os.listdir(directory))
    assert names == ["lock", STATE_FILE, STATE_FILE + "-shm", STATE_FILE + "-wal"]
    for name in names:
        assert (directory / name).stat().st_mode & 0o777 == 0o600, name
    store.close()


def test_second_instance_refuses_with_a_clear_message(tmp_path):
    store, s, stats = opened(tmp_path)
    with pytest.raises(StateLocked, match=f"in use by another sfive-ngxlua \\(pid {os.getpid()}"):
        StateStore(s.state_dir, s, Stats())
    options = Options()
    options.parseOptions(["-S", "a/hls/high", "--state-dir", s.state_dir, "-d", "10"])
    with pytest.raises(SystemExit, match="^sfive-ngxlua: state directory .* is in use"):
        makeService(options, reactor)
    store.close()
    StateStore(s.state_dir, s, Stats()).close()  # released at close


def test_corrupt_file_is_moved_aside_counted_and_logged(tmp_path, logs):
    directory = tmp_path / "state"
    directory.mkdir()
    (directory / STATE_FILE).write_bytes(b"this is not a database" * 200)
    store, s, stats = opened(tmp_path)
    aside = [n for n in os.listdir(directory) if n.startswith(STATE_FILE + ".corrupt-")]
    assert len(aside) == 1 and (directory / aside[0]).read_bytes().startswith(b"this is not")
    assert stats.state_errors == 1
    assert logs.matching("cannot be read") and logs.matching(aside[0])
    assert restore(store) is None and store.position() is None
    store.close()


def test_a_newer_schema_is_moved_aside_not_overwritten(tmp_path, logs):
    directory = tmp_path / "state"
    directory.mkdir()
    db = sqlite3.connect(directory / STATE_FILE)
    db.execute("CREATE TABLE future (x)")
    db.execute("PRAGMA user_version=7")
    db.commit()
    db.close()
    store, s, stats = opened(tmp_path)
    assert logs.matching("newer than this release")
    assert [n for n in os.listdir(directory) if ".corrupt-" in n and "-" not in n[-4:]]
    store.close()


def test_a_version_1_file_opens_with_its_model_position_and_queue(tmp_path):
    """The state release 1 writes, made with its frozen layout: the next release reads it."""
    s = state_settings(tmp_path)
    os.makedirs(s.state_dir, mode=0o700)
    db = sqlite3.connect(os.path.join(s.state_dir, STATE_FILE))
    db.executescript(V1_FILE)
    k = T0 // 10
    meta = {
        "settings": {"duration": 10, "streamers": [list(x) for x in STREAMERS], "hostname": "h",
                     "tags": [], "max_clients": 50000, "max_ua_length": 512},
        "model": {"format": 1, "first": k, "reported": k - 1, "live": True},
        "position": {"kind": "exporter", "ring": "00ff00ff00ff00ff", "seq": 41},
        "saved_at": T0 + 5,
    }
    db.executemany("INSERT INTO meta VALUES (?, ?)",
                   [(key, simplejson.dumps(v)) for key, v in meta.items()])
    db.execute("INSERT INTO clients VALUES (7, ?, 0, '10.0.0.1', 'ua/1')", (k,))
    db.execute("INSERT INTO counts VALUES (7, 300)")
    db.execute("INSERT INTO queue (data) VALUES (?)", (b'{"queued":1}\n',))
    db.commit()
    db.close()
    stats = Stats()
    store = StateStore(s.state_dir, s, stats, clock_at())
    queue = store.queue(10)
    model = restore(store, queue)
    assert model is not None and model.first == k
    assert store.position() == meta["position"]
    assert len(queue) == 1 and queue.head() == b'{"queued":1}\n'
    (interval,) = model.close_due(T0 + 11)
    assert interval.streams[HIGH].bytes == {("10.0.0.1", "ua/1"): 300}
    store.close()


# -- checkpoints ---------------------------------------------------------------------------------


def test_checkpoints_are_incremental_and_restore_in_a_new_store(tmp_path):
    store, s, stats = opened(tmp_path, max_clients=2)
    model = IntervalModel(s, stats, start=T0)
    for i in range(5):
        model.add(rec(T0 + 1, client=f"10.0.0.{i}", sent=10 + i))
    assert store.checkpoint(model, {"kind": "exporter", "ring": None, "seq": 5})
    model.add(rec(T0 + 2, client="10.0.0.0", sent=1))
    model.add(rec(T0 + 12, client="10.9.9.9", sent=7))
    assert store.checkpoint(model, {"kind": "exporter", "ring": None, "seq": 7})
    rows = store.db.execute("SELECT count(*) FROM clients").fetchone()[0]
    assert rows == 4  # two clients and the overflow entry, one in the next interval
    store.close()
    store2, _, stats2 = opened(tmp_path, max_clients=2)
    restored = restore(store2)
    assert norm(restored.snapshot()) == norm(model.snapshot())
    assert store2.position()["seq"] == 7
    (a, b) = restored.close_due(T0 + 21)
    assert a.streams[HIGH].count == 5 and a.streams[HIGH].total == 10 + 11 + 12 + 13 + 14 + 1
    assert b.streams[HIGH].bytes == {("10.9.9.9", "ua/1"): 7}
    store2.close()


def test_delivered_clients_and_datasets_do_not_linger_in_the_files(tmp_path):
    store, s, stats = opened(tmp_path)
    queue = store.queue(10)
    model = IntervalModel(s, stats, start=T0)
    model.add(rec(T0 + 1, client="192.0.2.77", ua="SecretPlayer/9"))
    assert store.checkpoint(model, {"kind": "exporter", "ring": None, "seq": 1})
    model.close_due(T0 + 11)
    assert store.checkpoint(model, None, queue, [b"dataset of 192.0.2.78 SecretPlayer/8"])
    while queue.head() is not None:
        queue.sent()
    store.scrub_wal()
    for name in (STATE_FILE, STATE_FILE + "-wal"):
        data = (tmp_path / "state" / name).read_bytes()
        for secret in (b"192.0.2.77", b"SecretPlayer/9", b"192.0.2.78", b"SecretPlayer/8"):
            assert secret not in data, (name, secret)
    store.close()


def test_a_full_disk_keeps_the_state_in_memory_and_writes_all_once_it_works(tmp_path, logs):
    store, s, stats = opened(tmp_path)
    queue = store.queue(10)
    model = IntervalModel(s, stats, start=T0)
    model.add(rec(T0 + 1))
    assert store.checkpoint(model, {"kind": "exporter", "ring": None, "seq": 1})
    pages = store.db.execute("PRAGMA page_count").fetchone()[0]
    store.db.execute(f"PRAGMA max_page_count={pages}")  # SQLITE_FULL from now on
    for i in range(300):
        model.add(rec(T0 + 2, client=f"10.1.{i // 250}.{i % 250}", ua="x" * 200))
    assert not store.checkpoint(model, {"kind": "exporter", "ring": None, "seq": 301}, queue,
                                [b"d1" * 3000])
    assert store.failing and stats.state_errors == 1
    assert len(logs.matching("keeping the state in memory")) == 1
    assert not store.checkpoint(model, {"kind": "exporter", "ring": None, "seq": 301})
    assert len(logs.matching("keeping the state in memory")) == 1, "one line per outage"
    assert queue.head() == b"d1" * 3000, "the dataset waits in memory"
    store.db.execute("PRAGMA max_page_count=1073741823")
    assert store.checkpoint(model, {"kind": "exporter", "ring": None, "seq": 301}, queue)
    assert logs.matching("writable again")
    assert queue.totals() == (1, 6000), "the waiting dataset is written too"
    assert not queue.spill
    store.close()
    store2, _, stats2 = opened(tmp_path)
    assert norm(restore(store2).snapshot()) == norm(model.snapshot())
    assert store2.position()["seq"] == 301
    store2.close()


def test_an_unexpected_commit_error_keeps_the_reports_datasets_for_the_next_checkpoint(
        tmp_path, logs, monkeypatch):
    """The report's transaction fails with an error nobody expected (injected): its
    intervals are out of the model already, so their datasets wait in the queue's memory and
    the next checkpoint writes them with the whole model; counted as the reporter's error,
    with its traceback; nothing dropped."""
    from sfive_ngxlua.datasets import encode
    from sfive_ngxlua.outbox import DurableOutbox

    class Hub:  # the queueing sink's part the outbox uses; it sends nothing here
        flushed = 0

        def encode(self, dataset):
            return encode(dataset)

        def flush(self):
            self.flushed += 1

    class Source:
        def position(self):
            return {"kind": "exporter", "ring": None, "seq": 7}

    store, s, stats = opened(tmp_path)
    queue = store.queue(100)
    model = IntervalModel(s, stats, start=T0)
    model.add(rec(T0 + 1, sent=5))
    model.add(rec(T0 + 12, sent=6))
    assert store.checkpoint(model, {"kind": "exporter", "ring": None, "seq": 1})
    hub = Hub()
    outbox = DurableOutbox(s, store, model, Source(), hub, stats, queue)
    write = store.tables.write

    def broken(*args):
        raise RuntimeError("injected")

    monkeypatch.setattr(store.tables, "write", broken)
    outbox.emit(model.close_due(T0 + 11))
    assert stats.errors["report"] == 1 and stats.datasets_dropped == 0
    assert (len(logs.matching("failed unexpectedly")) == 1
            and "RuntimeError: injected" in logs.everything())
    assert len(queue) == 3 and queue.totals()[0] == 0, "in memory, not yet on disk"
    assert hub.flushed == 1
    monkeypatch.setattr(store.tables, "write", write)
    assert store.checkpoint(model, Source().position(), queue)
    assert queue.totals()[0] == 3 and not queue.spill
    store.close()
    store2, _, _ = opened(tmp_path)
    assert norm(restore(store2).snapshot()) == norm(model.snapshot()), "written in full"
    assert store2.position()["seq"] == 7
    sets = []
    queue2 = store2.queue(100)
    while queue2.head() is not None:
        sets.append(simplejson.loads(queue2.head()))
        queue2.sent()
    assert [d["data"]["bytes-sent"] for d in sets] == [5, 0, 0]
    store2.close()


def test_state_saved_under_another_duration_is_reported_as_saved_then_fresh(tmp_path, logs):
    store, s, stats = opened(tmp_path, duration=10)
    model = IntervalModel(s, stats, start=T0)
    model.add(rec(T0 + 1, sent=5))
    model.add(rec(T0 + 4, client="10.0.0.2", sent=6))
    store.now = lambda: T0 + 6
    assert store.checkpoint(model, {"kind": "exporter", "ring": None, "seq": 2})
    store.close()
    store2, s2, stats2 = opened(tmp_path, duration=5)
    queue = store2.queue(10)
    assert restore(store2, queue) is None
    (line,) = logs.matching("saved under other settings")
    assert "10s" in line and "5s" in line
    got = []
    while queue.head() is not None:
        got.append(simplejson.loads(queue.head()))
        queue.sent()
    assert [d["streamer-id"]["quality"] for d in got] == [x[2] for x in STREAMERS]
    high = got[0]
    assert high["start-time"] == start_time(T0) and high["duration-ms"] == 6000
    assert high["data"]["bytes-sent"] == 11 and high["data"]["client-count"] == 2
    assert restore(store2) is None, "nothing mixed in: fresh from now on"
    store2.close()



@pytest_twisted.ensureDeferred
async def test_a_state_saved_under_other_settings_reaches_a_sink_without_a_queue(tmp_path, logs):
    """With a callable sink (no disk queue) the saved intervals are handed to it at the start."""
    store, s, stats = opened(tmp_path, duration=10)
    model = IntervalModel(s, stats, start=T0)
    model.add(rec(T0 + 1, sent=5))
    store.now = lambda: T0 + 6
    assert store.checkpoint(model, {"kind": "exporter", "ring": None, "seq": 1})
    store.close()
    got = []
    top = build(state_settings(tmp_path, duration=5), reactor, sink=got.append,
                clock=clock_at(T0 + 7))
    assert got == [], "not before the start"
    top.startService()
    await top.stopService()
    assert logs.matching("saved under other settings")
    assert [d["streamer-id"]["quality"] for d in got] == [x[2] for x in STREAMERS]
    assert got[0]["start-time"] == start_time(T0) and got[0]["data"]["bytes-sent"] == 5

# -- the disk queue ------------------------------------------------------------------------------


def test_disk_queue_keeps_order_across_reopen_with_a_small_window(tmp_path):
    store, s, stats = opened(tmp_path)
    queue = store.queue(1000, window=4)
    for i in range(10):
        queue.push(b"%d\n" % i)
    for i in range(3):
        assert queue.head() == b"%d\n" % i
        queue.sent()
    assert len(queue.window) <= 4
    store.close()
    store2, _, stats2 = opened(tmp_path)
    queue2 = store2.queue(1000, window=4)
    assert len(queue2) == 7 and stats2.queued == 7
    out = []
    while queue2.head() is not None:
        out.append(queue2.head())
        queue2.sent()
    assert out == [b"%d\n" % i for i in range(3, 10)]
    assert queue2.totals() == (0, 0), "deleted from disk once sent"
    store2.close()


@pytest.mark.parametrize("persistent", [False, True])
def test_queue_bounded_in_bytes_drops_the_oldest_counted_and_logged(tmp_path, persistent, logs):
    from sfive_ngxlua.queues import MemoryQueue

    store, s, stats = opened(tmp_path)
    if persistent:
        queue = store.queue(1000, max_bytes=2500, window=2)
    else:
        queue = MemoryQueue(1000, stats, max_bytes=2500)
    for i in range(5):
        queue.push(bytes([48 + i]) * 1000)
    assert len(queue) == 2 and queue.size == 2000 and stats.datasets_dropped == 3
    assert queue.head() == b"3" * 1000
    assert len(logs.matching("hub queue full (0.00238419 MiB)")) == 3
    queue.push(b"big" * 2000)
    assert len(queue) == 1 and queue.head() == b"big" * 2000, "the newest is always kept"
    if persistent:
        assert queue.totals() == (1, 6000)
    store.close()


# -- the service: stop, restart, crashes -----------------------------------------------------------


class RingExporter(Exporter):
    """The scripted exporter with a ring, speaking protocol 2: ``log`` appends numbered records
    and sends them to the open stream with a heartbeat at the clock's time; ``beat(t)`` sends
    a heartbeat (the watermark) for ``t``; a new request gets what it asks for (``after=N``:
    the records after N; nothing: from now), as nginx/sfive.lua answers."""

    def __init__(self) -> None:
        super().__init__(ring="00112233aabbccdd")
        self.clock = None
        self.logged = []
        self.afters = []

    def _beat(self, t=None) -> bytes:
        return heartbeat(len(self.logged), self.clock.seconds() if t is None else t)

    def log(self, *records: dict) -> None:
        lines = []
        for r in records:
            r = dict(r, seq=len(self.logged) + 1)
            self.logged.append(r)
            lines.append(simplejson.dumps(r).encode() + b"\n")
        if self.current is not None:
            self.send(b"".join(lines) + self._beat())

    def beat(self, t: float) -> None:
        self.send(self._beat(t))

    def _answer(self, request):  # noqa: ANN001, ANN201
        after = request.args.get(b"after")
        self.afters.append(None if after is None else int(after[0]))
        start = len(self.logged) if after is None else int(after[0])
        chunk = b"".join(simplejson.dumps(r).encode() + b"\n" for r in self.logged[start:])
        self.plan.append(("stream", chunk + self._beat()))
        return super()._answer(request)


class Crash(BaseException):
    """The process dies here (not an error the service handles; the reactor's loop catches it
    and the test then kills the node)."""


def records_for(k, n, tag="", duration=10):
    t = T0 + k * duration
    return [record(t + i % duration, client=f"10.{k}.0.{i}", ua=f"ua{tag}",
                   url=f"/live/{f}/{c}-{q}/s.ts", sent=100 + i)
            for i in range(n) for (c, f, q) in STREAMERS]


def expected(ring):
    """(start-time, streamer) -> {(ip, ua): bytes} of every record in the ring."""
    out = {}
    for r in ring:
        _, _, f, name, _ = r["url"].split("/")
        c, q = name.split("-")
        t = int(datetime.fromisoformat(r["time"]).timestamp())
        key = (start_time(t - (t - T0) % 10), (c, f, q))
        out.setdefault(key, Counter())[(r["client"], r["ua"])] += r["bytes-sent"]
    return {k: dict(v) for k, v in out.items()}


def got(datasets):
    out = {}
    for d in datasets:
        sid = d["streamer-id"]
        key = (d["start-time"], (sid["content-id"], sid["format"], sid["quality"]))
        assert key not in out, f"duplicate {key}"
        out[key] = {(c["ip"], c["user-agent"]): c["bytes-sent"] for c in d["data"]["clients"]}
        assert d["data"]["bytes-sent"] == sum(out[key].values())
    return out


class Node:
    """The service with a state dir and a datagram hub, built as twistd does, on a Clock."""

    def __init__(self, tmp_path, exporter, hub, clock, **kw):
        self.settings = state_settings(tmp_path, url=exporter.url(), socket=hub.path, **kw)
        self.clock = clock
        self.exporter = exporter
        exporter.clock = clock
        self.top = build(self.settings, reactor, clock=clock)
        self.stats = self.top.stats
        self.store = self.top.store

    async def start(self):
        requests = len(self.exporter.requests)
        self.top.startService()
        await wait_for(lambda: len(self.exporter.requests) > requests and
                       self.exporter.current is not None, what="the exporter request")
        return self

    async def read(self, n):
        await wait_for(lambda: self.stats.accepted >= n, what=f"{n} records read")

    def crash(self):
        """Die without a word: nothing more is written; the lock goes with the process."""
        for service in (self.top.state, self.top.report):
            if service.loop.running:
                service.loop.stop()
            for call in (getattr(service, "_start", None), service._retry):
                if call is not None and call.active():
                    call.cancel()
        fetch = self.top.getServiceNamed("fetch")
        fetch.running = False
        if fetch.body is not None and fetch.body.transport is not None:
            fetch.body.transport.stopProducing()
        sink = self.top.sink
        if sink.connection is not None:
            sink.connection.stopListening()
        if sink._retrying is not None and sink._retrying.active():
            sink._retrying.cancel()
        self.store.db.close()
        self.store.lock.release()


def advance_to(clock, t):
    clock.advance(max(0, t - clock.seconds()))


async def advance(node, t):
    """The exporter vouches for everything before ``t`` (a heartbeat), the service has read
    it, and the clock is at ``t``."""
    seen = node.stats.heartbeats
    node.exporter.beat(t)
    await wait_for(lambda: node.stats.heartbeats > seen, what="the heartbeat")
    advance_to(node.clock, t)


@pytest.fixture
def hub(tmp_path):
    h = DatagramHub(str(tmp_path / "hub.sock"))
    yield h
    h.close()


@pytest_twisted.async_yield_fixture
async def ring():
    exp = RingExporter().listen()
    yield exp
    await exp.stop()


@pytest_twisted.ensureDeferred
async def test_stop_saves_the_running_interval_and_the_restart_reports_it_once(
        tmp_path, ring, hub):
    clock = clock_at(T0 + 1)  # the first interval starts at T0 + 10
    node = await Node(tmp_path, ring, hub, clock).start()
    ring.log(*records_for(1, 3))
    await node.read(9)
    await advance(node, T0 + 21)
    await wait_for(hub.has(3), what="interval 1")
    ring.log(*records_for(2, 2, tag="a"))
    await node.read(15)
    await advance(node, T0 + 25)
    await node.top.stopService()
    hub.read()
    assert {d["start-time"] for d in hub.datasets()} == {start_time(T0 + 10)}, \
        "no partial dataset at the stop"
    ring.log(*records_for(2, 2, tag="b"))  # while the service is down
    node2 = Node(tmp_path, ring, hub, clock)
    await node2.start()
    assert ring.afters[-1] == 15, "resumes after the saved position"
    ring.log(*records_for(2, 1, tag="c"))
    await node2.read(len(ring.logged) - 15)
    await advance(node2, T0 + 31)
    await wait_for(hub.has(6), what="interval 2 reported")
    assert got(hub.datasets()) == expected(ring.logged)
    assert all(d["duration-ms"] == 10000 for d in hub.datasets())
    await node2.top.stopService()


@pytest_twisted.ensureDeferred
async def test_crash_between_closing_an_interval_and_committing_it(tmp_path, ring, hub,
                                                                   monkeypatch):
    clock = clock_at(T0 + 1)  # the first interval starts at T0 + 10
    node = await Node(tmp_path, ring, hub, clock, grace=1.5).start()
    ring.log(*records_for(1, 3))
    await node.read(9)
    advance_to(clock, T0 + 21.2)  # the checkpoints up to here cover these 9
    ring.log(*records_for(1, 2, tag="after-the-checkpoint"))
    await node.read(15)
    crashed = []

    def die(items):
        crashed.append(items)
        raise Crash()

    monkeypatch.setattr(node.top.queue, "_insert", die)
    await advance(node, T0 + 21.5)
    assert crashed, "the report's transaction was reached"
    node.crash()
    monkeypatch.undo()
    hub.read()
    assert hub.datagrams == [], "nothing is sent before the commit"
    ring.log(*records_for(2, 1))
    node2 = await Node(tmp_path, ring, hub, clock, grace=1.5).start()
    assert ring.afters[-1] == 9, "the last checkpoint's position: the rest is read again"
    await node2.read(len(ring.logged) - 9)
    await advance(node2, T0 + 31.5)
    await wait_for(hub.has(6), what="intervals 1 and 2")
    assert got(hub.datasets()) == expected(ring.logged)
    await node2.top.stopService()


@pytest_twisted.ensureDeferred
async def test_crash_between_sending_a_dataset_and_marking_it_sent(tmp_path, ring, hub,
                                                                   monkeypatch):
    clock = clock_at(T0 + 1)  # the first interval starts at T0 + 10
    node = await Node(tmp_path, ring, hub, clock).start()
    ring.log(*records_for(1, 3))
    await node.read(9)
    sent = SqliteQueue.sent
    calls = []

    def second_dies(self):
        calls.append(1)
        if len(calls) == 2:
            raise Crash()
        sent(self)

    monkeypatch.setattr(SqliteQueue, "sent", second_dies)
    await advance(node, T0 + 21)
    assert len(calls) == 2, "the crash came"
    node.crash()
    monkeypatch.undo()
    hub.read()
    assert len(hub.datagrams) == 2, "the first went out and was marked; the second in flight"
    node2 = await Node(tmp_path, ring, hub, clock).start()
    await wait_for(hub.has(4), what="the queue sent after the restart")
    received = list(hub.datagrams)
    assert received[2] == received[1], "the in-flight one again, identical"
    assert len(received) == 4
    assert got([simplejson.loads(d) for d in received[:1] + received[2:]]) == \
        expected(ring.logged)
    assert node2.top.queue.totals() == (0, 0)
    await node2.top.stopService()


@pytest_twisted.ensureDeferred
async def test_hub_queue_survives_a_restart_in_order(tmp_path, ring, hub):
    clock = clock_at(T0 + 1)  # the first interval starts at T0 + 10
    hub.close()  # the hub is away
    node = await Node(tmp_path, ring, hub, clock).start()
    for k in (1, 2):
        ring.log(*records_for(k, 2))
        await node.read(6 * k)
        await advance(node, T0 + (k + 1) * 10 + 1)
    assert len(node.top.sink.queue) == 6
    await node.top.stopService()
    hub.open()
    node2 = await Node(tmp_path, ring, hub, clock).start()
    await wait_for(hub.has(6), what="the saved queue")
    starts = [d["start-time"] for d in hub.datasets()]
    assert starts == [start_time(T0 + 10)] * 3 + [start_time(T0 + 20)] * 3
    assert got(hub.datasets()) == expected(ring.logged)
    await node2.top.stopService()


def test_without_a_state_dir_nothing_is_written(tmp_path):
    top = build(settings(socket=str(tmp_path / "hub.sock")), reactor, clock=clock_at())
    assert top.store is None
    assert [s.name for s in top] == ["sink", "fetch", "report"]
    assert os.listdir(tmp_path) == []


# -- retiring a node ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_retire_delivers_the_queue_then_the_saved_interval_and_removes_the_state(
        tmp_path, ring, hub):
    import io

    from sfive_ngxlua.retire import RetireOptions, retire

    clock = clock_at(T0 + 1)
    hub.close()  # away: interval 1 stays queued
    node = await Node(tmp_path, ring, hub, clock).start()
    ring.log(*records_for(1, 2))
    await node.read(6)
    await advance(node, T0 + 21)
    ring.log(*records_for(2, 1))
    await node.read(9)
    await advance(node, T0 + 24)
    locked = RetireOptions()
    locked.parseOptions(["--state-dir", node.settings.state_dir, "-s", hub.path])
    err = io.StringIO()
    assert await retire(locked, reactor, err) == 2, "not while the service runs"
    assert "in use by another sfive-ngxlua" in err.getvalue()
    await node.top.stopService()
    hub.open()
    options = RetireOptions()
    options.parseOptions(["--state-dir", node.settings.state_dir, "-s", hub.path])
    err = io.StringIO()
    assert await retire(options, reactor, err) == 0, err.getvalue()
    hub.read()
    sets = hub.datasets()
    assert [d["start-time"] for d in sets] == [start_time(T0 + 10)] * 3 + \
        [start_time(T0 + 20)] * 3, "the queue first, in order, then the saved interval"
    assert [d["duration-ms"] for d in sets[3:]] == [4000] * 3, "cut where it was saved"
    assert got(sets) == expected(ring.logged)
    assert "1 saved intervals as 3 datasets and 3 queued datasets: 6 of 6 delivered" in \
        err.getvalue()
    assert os.listdir(node.settings.state_dir) == []


# -- the property: crashes anywhere change nothing -------------------------------------------------


def _canonical(datasets):
    out = []
    for d in datasets:
        d = simplejson.loads(d) if isinstance(d, bytes) else d
        d["data"]["clients"].sort(key=lambda c: (c["ip"], c["user-agent"]))
        out.append(d)
    return out


def test_any_stream_cut_by_checkpoints_crashes_and_restarts_gives_the_same_datasets():
    """Records, checkpoints, reports (their datasets into the disk queue) and crashes at
    arbitrary points: restoring the last checkpoint and reading the ring again after its
    position gives the datasets of one uninterrupted run, each once, in order."""
    import tempfile

    from hypothesis import HealthCheck, given
    from hypothesis import settings as hsettings
    from hypothesis import strategies as st

    from sfive_ngxlua.datasets import datasets as make_datasets
    from sfive_ngxlua.datasets import encode

    event = st.tuples(st.integers(0, 4), st.integers(0, 5), st.integers(0, 2),
                      st.integers(0, 1000),
                      st.sampled_from(["", "", "checkpoint", "report", "crash"]))

    @hsettings(max_examples=40, deadline=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.lists(event, max_size=50))
    def run(events):
        s = settings(duration=5, grace=1.0, max_clients=3,
                     state_dir=tempfile.mkdtemp(prefix="sfive-prop-"))
        times, now = [], T0 + 5
        for step, *_ in events:
            now += step
            times.append(now)

        def record(i):
            _, client, streamer, sent, _ = events[i]
            return Record(times[i], STREAMERS[streamer], f"10.0.0.{client}", "ua", sent)

        expected, model = [], IntervalModel(s, Stats(), start=T0 + 5)
        for i, (*_, what) in enumerate(events):
            model.add(record(i))
            if what == "report":
                expected += [d for iv in model.close_due(times[i]) for d in make_datasets(iv, s)]
        expected += [d for iv in model.close_due(now + 60) for d in make_datasets(iv, s)]

        def open_node():
            stats = Stats()
            store = StateStore(s.state_dir, s, stats, clock_at(now))
            queue = store.queue(10_000)
            restored = restore(store, queue)
            position = store.position()
            return (store, queue, restored or IntervalModel(s, stats, start=T0 + 5),
                    0 if not position else position["seq"] + 1)

        store, queue, model, i = open_node()
        crashed = set()
        while i < len(events):
            what = events[i][4]
            model.add(record(i))
            if what == "checkpoint":
                assert store.checkpoint(model, {"kind": "exporter", "ring": None, "seq": i})
            elif what == "report":
                items = [encode(d) for iv in model.close_due(times[i])
                         for d in make_datasets(iv, s)]
                assert store.checkpoint(model, {"kind": "exporter", "ring": None, "seq": i},
                                        queue, items)
            elif what == "crash" and i not in crashed:
                crashed.add(i)
                store.db.close()  # the process dies: what was committed is all there is
                store.lock.release()
                store, queue, model, i = open_node()
                continue
            i += 1
        items = [encode(d) for iv in model.close_due(now + 60) for d in make_datasets(iv, s)]
        assert store.checkpoint(model, {"kind": "exporter", "ring": None, "seq": i}, queue,
                                items)
        got = []
        while queue.head() is not None:
            got.append(queue.head())
            queue.sent()
        store.close()
        assert _canonical(got) == _canonical(expected)

    run()


@pytest_twisted.ensureDeferred
async def test_retire_gives_up_a_saved_withheld_stretch_with_its_replay_command(tmp_path, logs):
    """The saved model's withheld stretch (nothing vouched for it) is not sent as "no
    viewers" when the node is retired: it is logged with the replay command that fills it; the
    interval after it, with records, is reported."""
    import io

    from sfive_ngxlua.retire import RetireOptions, retire

    store, s, stats = opened(tmp_path)
    model = IntervalModel(s, stats, start=T0)
    k = T0 // 10
    model.withheld = [k, k + 1]  # T0 .. T0+20: withheld, still open, no record
    model.add(rec(T0 + 21, sent=42))
    store.now = lambda: T0 + 25
    assert store.checkpoint(model, {"kind": "exporter", "ring": None, "seq": 1})
    store.close()
    options = RetireOptions()
    options.parseOptions(["--state-dir", s.state_dir])
    err, out = io.StringIO(), io.BytesIO()
    assert await retire(options, reactor, err, out) == 0, err.getvalue()
    sets = [simplejson.loads(line) for line in out.getvalue().splitlines()]
    assert [d["start-time"] for d in sets] == [start_time(T0 + 20)] * 3, "no zeros before it"
    assert sets[0]["data"]["bytes-sent"] == 42 and sets[0]["duration-ms"] == 5000
    (line,) = logs.matching("for good")
    assert f"from {start_time(T0)} to {start_time(T0 + 20)}" in line
    assert f"sfive-ngxlua-replay -n h -d 10 -S {'/'.join(HIGH)}" in line
    assert f"--from {start_time(T0)} --until {start_time(T0 + 20)}" in line
    assert "1 saved intervals as 3 datasets" in err.getvalue()


def test_retire_command_line_to_standard_output(tmp_path):
    """The console script: a saved interval comes out as JSON lines, the state is removed;
    a missing directory is a usage error."""
    import subprocess
    import sys
    from pathlib import Path

    store, s, stats = opened(tmp_path)
    model = IntervalModel(s, stats, start=T0)
    model.add(rec(T0 + 1, sent=42))
    store.now = lambda: T0 + 3
    assert store.checkpoint(model, {"kind": "exporter", "ring": None, "seq": 1})
    store.close()
    command = str(Path(sys.executable).parent / "sfive-ngxlua-retire")
    done = subprocess.run([command, "--state-dir", s.state_dir], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = [simplejson.loads(line) for line in done.stdout.splitlines()]
    assert [d["data"]["bytes-sent"] for d in lines] == [42, 0, 0]
    assert lines[0]["duration-ms"] == 3000
    assert "1 saved intervals as 3 datasets" in done.stderr and "removed" in done.stderr
    assert os.listdir(s.state_dir) == []
    missing = subprocess.run([command, "--state-dir", str(tmp_path / "nope")],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 64 and "no such directory" in missing.stderr


def test_an_unusable_state_dir_is_one_error_line_and_the_service_runs_without(tmp_path, logs):
    (tmp_path / "file").write_text("not a directory")
    s = settings(state_dir=str(tmp_path / "file" / "state"), socket=str(tmp_path / "hub"))
    top = build(s, reactor, clock=clock_at())
    assert top.store is None and top.stats.state_errors == 1
    (line,) = logs.matching("running without a saved state")
    assert "state directory" in line


def test_state_dir_and_queue_bytes_options(tmp_path):
    from twisted.python import usage

    def parse(*args):
        options = Options()
        options.parseOptions(["-S", "a/hls/high", *args])
        return options.settings()

    assert parse().state_dir is None and parse().queue_bytes == 256 << 20
    assert parse("--queue-bytes", "64K").queue_bytes == 64 << 10
    assert parse("--queue-bytes", "3000").queue_bytes == 3000
    assert parse("--state-dir", "rel/dir").state_dir == os.path.abspath("rel/dir")
    for bad in ("0", "-1", "1T", "M", "1.5M"):
        with pytest.raises(usage.UsageError, match="--queue-bytes must be a positive number"):
            parse("--queue-bytes", bad)
    (tmp_path / "f").write_text("")
    with pytest.raises(usage.UsageError, match="not a directory"):
        parse("--state-dir", str(tmp_path / "f"))


def test_a_saved_model_of_another_format_is_kept_aside_never_mixed_in(tmp_path, logs):
    store, s, stats = opened(tmp_path)
    model = IntervalModel(s, stats, start=T0)
    model.add(rec(T0 + 1))
    assert store.checkpoint(model, {"kind": "exporter", "ring": None, "seq": 1})
    store.db.execute("UPDATE meta SET value = ? WHERE key = 'model'", (simplejson.dumps(
        {"format": 0, "first": T0 // 10, "reported": T0 // 10 - 1, "live": True}),))
    store.close()
    store2, _, stats2 = opened(tmp_path)
    assert restore(store2, store2.queue(10)) is None
    (line,) = logs.matching("cannot be reported as saved")
    assert "format 0" in line
    aside = [n for n in os.listdir(tmp_path / "state") if ".unusable-" in n]
    assert aside and stats2.state_errors == 1
    assert restore(store2) is None and store2.position() is None
    store2.close()


@pytest.mark.parametrize("key, value", [
    ("settings", '{"duration": 10}'),  # a field missing
    ("model", "{not json"),
    ("model", "[1, 2]"),
    ("position", "{not json"),
    ("saved_at", '"yesterday"'),
])
def test_damaged_rows_are_set_aside_counted_and_logged_never_a_traceback(tmp_path, logs, key,
                                                                         value):
    """A saved row that cannot be read: the start goes on with an empty state (the file moved
    aside for a person to look at), and so does retiring the node."""
    store, s, stats = opened(tmp_path)
    model = IntervalModel(s, stats, start=T0)
    model.add(rec(T0 + 1))
    assert store.checkpoint(model, {"kind": "exporter", "ring": None, "seq": 1})
    with store.transactions.transaction():
        store.db.execute("UPDATE meta SET value = ? WHERE key = ?", (value, key))
    store.close()
    store2, _, stats2 = opened(tmp_path)
    if key == "saved_at":  # the model is fine; only reporting it as saved needs saved_at
        saved = store2.saved()
        assert report_saved(store2, saved, s, "is being retired", store2.queue(10)) == ([], [])
    else:
        assert restore(store2, store2.queue(10)) is None
    assert stats2.state_errors == 1 and logs.matching("moved it to")
    assert [n for n in os.listdir(tmp_path / "state") if ".unusable-" in n]
    assert restore(store2) is None and store2.position() is None
    store2.close()


def test_an_unexpected_checkpoint_error_is_one_traceback_counted_and_the_loop_recovers(
        tmp_path, logs):
    """The one path (issue 17, item 2): the traceback once per stretch (not every second),
    counted, the checkpoint retrying; once the store works again the loop runs again and
    the next checkpoint writes everything."""
    clock = clock_at()
    top = build(settings(state_dir=str(tmp_path / "state")), reactor, clock=clock)
    state = top.state
    real = state.store.checkpoint
    calls = []

    def broken(*args, **kwargs):
        calls.append(clock.seconds())
        raise RuntimeError("disk on fire")

    state.store.checkpoint = broken
    state.startService()
    try:
        assert calls and top.stats.state_errors == 1 and top.stats.errors["checkpoint"] == 1
        assert top.stats.states["checkpoint"] == "retrying"
        assert state.store.tables.need_full  # the next checkpoint that works writes everything
        assert len([e for e in logs.events if "log_failure" in e]) == 1
        assert logs.matching("unexpected error while checkpointing")
        clock.advance(1.0)
        assert len(calls) == 2 and top.stats.errors["checkpoint"] == 2, "retried"
        assert len([e for e in logs.events if "log_failure" in e]) == 1, "once per stretch"
        state.store.checkpoint = real
        clock.advance(1.0)
        assert top.stats.states["checkpoint"] == "running" and state.loop.running
        assert state.store.position() == top.source.position()
        clock.advance(1.0)
        assert len(calls) == 2 and top.stats.errors["checkpoint"] == 2
    finally:
        state.stopService()
