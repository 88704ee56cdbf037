"""Hub faults, provoked for real: a unix datagram hub socket that is absent, goes away, comes
back, is not read (sends hit EAGAIN), or gets a dataset too big for one datagram (EMSGSIZE); and
the stream hub (``--hub``) over unix and tcp endpoints going away and coming back.

The exporter is a real HTTP server and the hubs are real sockets; timers (reporting, reconnects,
backoff) run on a task.Clock so that minutes of service time take milliseconds.
"""

from __future__ import annotations

import socket

import pytest
import pytest_twisted
from helpers.faults import STREAMERS, T0, StreamHub, clock_at, line, settings, turn
from support import wait_for
from twisted.internet import reactor
from twisted.logger import LogLevel

from sfive_ngxlua.datasets import start_time
from sfive_ngxlua.sinks import DRAIN_SECONDS, RETRY_SECONDS, HubDatagramSink, HubStreamSink
from sfive_ngxlua.stats import Stats

pytest_plugins = ("helpers.fixtures",)

HIGH = STREAMERS[0]


def key(dataset: dict) -> tuple:
    """(start time, streamer) of a dataset."""
    sid = dataset["streamer-id"]
    return dataset["start-time"], (sid["content-id"], sid["format"], sid["quality"])


def expected_keys(first: int, count: int, duration: int) -> list:
    """The (start time, streamer) of every dataset of ``count`` intervals, in sending order."""
    return [(start_time(first + k * duration), s) for k in range(count) for s in STREAMERS]


def errors(logs) -> list:
    return [e for e in logs.events
            if e.get("log_level") in (LogLevel.error, LogLevel.critical)
            or "log_failure" in e or e.get("isError")]


def with_sink(service, exporter, make_sink, **kw):
    """Start the service with a hub sink; ``make_sink(stats, clock)`` may use the service's
    task.Clock or its own."""
    clock = clock_at()
    stats = Stats()
    sink = make_sink(stats, clock)
    return service(settings(url=exporter.url(), **kw), sink=sink, clock=clock, stats=stats)


def datagram_sink(path, queue_limit=100):
    return lambda stats, clock: HubDatagramSink(path, reactor, stats, queue_limit, clock=clock)


async def stream_interval(run, exporter, k: int, duration: int, n: int = 3, sent: int = 100):
    """Stream ``n`` records for each streamer into interval ``k`` (counted from T0) and wait
    until the service has read them."""
    before = run.stats.accepted
    t = T0 + k * duration
    exporter.send(*[
        line(t + i % duration, client=f"10.0.{k}.{i}", url=f"/live/{f}/{c}-{q}/s.ts",
             sent=sent + i)
        for i in range(n) for (c, f, q) in STREAMERS
    ])
    await wait_for(lambda: run.stats.accepted == before + n * len(STREAMERS))


def report_due(run, k: int, duration: int, grace: float = 1.0) -> None:
    """Advance the clock to the report of interval ``k``."""
    run.clock.advance(T0 + (k + 1) * duration + grace - run.clock.seconds())


@pytest_twisted.ensureDeferred
async def test_datagram_hub_absent_gone_and_back_keeps_order(service, exporter, dgram_hub, logs):
    run = with_sink(service, exporter, datagram_sink(dgram_hub.path))
    await wait_for(lambda: exporter.current is not None)

    await stream_interval(run, exporter, 0, 10)
    report_due(run, 0, 10)
    assert len(run.sink.queue) == 3 and run.stats.datasets_sent == 0
    assert len(logs.matching("unavailable")) == 1
    quiet, attempts = len(logs.events), run.stats.hub_reconnects
    for _ in range(2):
        run.clock.advance(RETRY_SECONDS)
        await turn()
    assert len(logs.events) == quiet, "retries while the hub stays away log nothing"
    assert run.stats.hub_reconnects == attempts + 2

    dgram_hub.open()
    run.clock.advance(RETRY_SECONDS)
    await wait_for(dgram_hub.has(3))
    assert logs.matching("is back; sending 3 queued datasets")

    await stream_interval(run, exporter, 1, 10)
    report_due(run, 1, 10)
    await wait_for(dgram_hub.has(6))

    dgram_hub.close()
    await stream_interval(run, exporter, 2, 10)
    report_due(run, 2, 10)
    assert len(run.sink.queue) == 3, "ECONNREFUSED: queued, not lost"
    await stream_interval(run, exporter, 3, 10)
    report_due(run, 3, 10)
    assert len(run.sink.queue) == 6
    refused = logs.matching("unavailable")
    assert len(refused) == 2 and "refused" in refused[1].lower()

    dgram_hub.open()
    run.clock.advance(RETRY_SECONDS)
    await wait_for(dgram_hub.has(12))

    got = dgram_hub.datasets()
    assert [key(d) for d in got] == expected_keys(T0, 4, 10)
    assert [d["data"]["bytes-sent"] for d in got] == [303] * 12
    assert [d["data"]["client-count"] for d in got] == [3] * 12
    assert run.stats.datasets_sent == 12 and run.stats.datasets_dropped == 0
    assert len(logs.matching("is back")) == 2
    assert not errors(logs)


@pytest_twisted.ensureDeferred
async def test_stalled_hub_does_not_block_the_reactor_nor_lose_datasets(
        service, exporter, dgram_hub, logs):
    dgram_hub.open()
    run = with_sink(service, exporter, datagram_sink(dgram_hub.path, queue_limit=1000),
                    duration=1, grace=0.5)
    await wait_for(lambda: exporter.current is not None)
    seconds = 20
    for k in range(seconds):
        lines_before = run.stats.lines
        await stream_interval(run, exporter, k, 1, n=50)
        assert run.stats.lines == lines_before + 150, "the fetcher reads during the stall"
        report_due(run, k, 1, grace=0.5)
    stalled = len(run.sink.queue)
    assert stalled > 3 * seconds // 2, "the hub's socket is full: sends got EAGAIN"
    assert run.sink.connection in reactor.getWriters(), "waiting for writability, not sleeping"
    assert run.stats.datasets_dropped == 0

    await wait_for(dgram_hub.has(3 * seconds))
    got = dgram_hub.datasets()
    assert [key(d) for d in got] == expected_keys(T0, seconds, 1)
    assert all(d["data"]["client-count"] == 50 for d in got)
    assert sum(d["data"]["bytes-sent"] for d in got) == sum(
        (100 + i) for i in range(50)) * 3 * seconds
    assert run.stats.datasets_sent == 3 * seconds and len(run.sink.queue) == 0
    assert run.sink.connection not in reactor.getWriters(), "no busy loop once drained"
    assert not errors(logs)


@pytest_twisted.ensureDeferred
async def test_queue_limit_drops_the_oldest_counts_and_warns(service, exporter, dgram_hub, logs):
    dgram_hub.open()
    limit = 6
    run = with_sink(service, exporter, datagram_sink(dgram_hub.path, queue_limit=limit),
                    duration=1, grace=0.5)
    await wait_for(lambda: exporter.current is not None)
    intervals = 12
    for k in range(intervals):
        await stream_interval(run, exporter, k, 1, n=1)
        report_due(run, k, 1, grace=0.5)
        assert len(run.sink.queue) <= limit
    dropped = run.stats.datasets_dropped
    assert dropped > 0
    warnings = logs.matching(f"hub queue full ({limit} datasets): dropped the oldest dataset")
    assert len(warnings) == dropped

    total = 3 * intervals
    await wait_for(dgram_hub.has(total - dropped))
    await turn()
    dgram_hub.read()
    want = expected_keys(T0, intervals, 1)
    in_socket = total - limit - dropped
    assert [key(d) for d in dgram_hub.datasets()] == want[:in_socket] + want[-limit:]


@pytest_twisted.ensureDeferred
async def test_oversized_dataset_is_trimmed_largest_first_with_exact_totals(
        service, exporter, dgram_hub, logs):
    dgram_hub.open()
    run = with_sink(service, exporter, datagram_sink(dgram_hub.path))
    await wait_for(lambda: exporter.current is not None)
    n = 4000
    ua = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Player/"
    sizes = {(f"10.{i // 250}.{i % 250}.1", f"{ua}{i}"): 1000 + 7 * i for i in range(n)}
    lines = [line(T0 + i % 10, client=c, ua=u, sent=b) for i, ((c, u), b) in
             enumerate(sizes.items())]
    for start in range(0, n, 500):
        exporter.send(b"".join(lines[start:start + 500]))
    await wait_for(lambda: run.stats.accepted == n)
    report_due(run, 0, 10)
    await wait_for(dgram_hub.has(3))

    big, *rest = dgram_hub.datasets()
    sndbuf = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).getsockopt(
        socket.SOL_SOCKET, socket.SO_SNDBUF)
    assert len(dgram_hub.datagrams[0]) <= sndbuf
    assert big["data"]["client-count"] == n
    assert big["data"]["bytes-sent"] == sum(sizes.values())
    kept = [((c["ip"], c["user-agent"]), c["bytes-sent"]) for c in big["data"]["clients"]]
    assert 0 < len(kept) < n
    assert kept == sorted(sizes.items(), key=lambda kv: kv[1], reverse=True)[:len(kept)]
    assert [key(d) for d in rest] == expected_keys(T0, 1, 10)[1:]
    assert run.stats.datasets_trimmed == 1 and run.stats.datasets_sent == 3
    assert len(logs.matching("exceeds the datagram limit: client list trimmed")) == 1
    assert not errors(logs)


@pytest.mark.parametrize("kind", ["datagram", "stream"])
@pytest_twisted.ensureDeferred
async def test_an_unexpected_error_while_sending_is_one_traceback_and_the_sink_recovers(
        kind, service, exporter, dgram_hub, tmp_path, logs):
    """Issue 17, item 2: an error the sink does not expect (here: from its queue, once) is
    logged with its traceback, counted, the sink is ``retrying``; a little later it sends
    again (the datagram sink on a new connection) and nothing queued is lost."""
    if kind == "datagram":
        dgram_hub.open()
        run = with_sink(service, exporter, datagram_sink(dgram_hub.path))
        def received():
            dgram_hub.read()
            return dgram_hub.datasets()
    else:
        hub = StreamHub(f"unix:{tmp_path / 'hub.sock'}")
        await hub.start()
        run = with_sink(service, exporter, lambda stats, clock: HubStreamSink(
            f"unix:path={tmp_path / 'hub.sock'}", reactor, stats, 100, clock=clock))
        def received():
            return hub.datasets()
    try:
        await wait_for(lambda: exporter.current is not None and run.sink.connection is not None)
        assert run.stats.states["sink"] == "connected"
        queue = run.sink.queue
        real = queue.head

        def head():
            del queue.head  # once
            raise RuntimeError("queue on fire")

        queue.head = head
        await stream_interval(run, exporter, 0, 10)
        report_due(run, 0, 10)
        assert run.stats.errors["sink"] == 1 and run.stats.states["sink"] == "retrying"
        assert len([e for e in logs.events if "log_failure" in e]) == 1
        assert logs.matching("sink: unexpected error while sending to the hub")
        assert len(queue) == 3 and run.stats.datasets_dropped == 0, "queued, not lost"
        assert queue.head == real
        run.clock.advance(RETRY_SECONDS)
        await wait_for(lambda: len(received()) == 3, what="the queue sent after the retry")
        assert [key(d) for d in received()] == expected_keys(T0, 1, 10)
        assert run.stats.states["sink"] == "connected" and run.stats.datasets_sent == 3
        await stream_interval(run, exporter, 1, 10)
        report_due(run, 1, 10)
        await wait_for(lambda: len(received()) == 6, what="the next interval")
    finally:
        if kind == "stream":
            await hub.stop()


@pytest_twisted.ensureDeferred
async def test_datasets_queued_on_disk_under_a_larger_limit_are_refit_or_dropped_counted(
        tmp_path, dgram_hub, logs):
    """The EMSGSIZE path (issue 18, item 6): a disk queue written by an earlier run (under a
    larger datagram limit, e.g. another host's or a larger net.core.wmem_default) holds
    datasets this socket refuses as too large. Each is refit (largest clients kept, totals
    exact) or, when even its client-less form does not fit, dropped: counted and logged."""
    from sfive_ngxlua.datasets import datasets, encode
    from sfive_ngxlua.model import IntervalModel
    from sfive_ngxlua.records import Record
    from sfive_ngxlua.store import StateStore

    sndbuf = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).getsockopt(
        socket.SOL_SOCKET, socket.SO_SNDBUF)
    s = settings(state_dir=str(tmp_path / "state"), socket=dgram_hub.path)
    model = IntervalModel(s, Stats(), start=T0)
    n = 4000
    for i in range(n):
        model.add(Record(T0 + 1, HIGH, f"10.{i // 250}.{i % 250}.1", f"Player/{i:040d}",
                         1000 + i))
    (interval,) = model.close_due(T0 + 11)
    big, small = datasets(interval, s)[:2]
    huge_tags = settings(tags=("x" * sndbuf,))
    (unfit, *_) = datasets(interval, huge_tags)
    unfit["data"]["clients"] = []
    earlier = StateStore(s.state_dir, s, Stats())
    queue = earlier.queue(100)
    for dataset in (big, unfit, small):
        queue.push(encode(dataset))  # whole, as a run with a larger limit queued them
    earlier.close()
    assert len(encode(big)) > sndbuf and len(encode(unfit)) > sndbuf

    stats = Stats()
    store = StateStore(s.state_dir, s, stats)
    sink = HubDatagramSink(dgram_hub.path, reactor, stats, 100, clock=clock_at(),
                           queue=store.queue(100))
    dgram_hub.open()
    sink.startService()
    try:
        await wait_for(dgram_hub.has(2), what="the refit dataset and the small one")
        got, second = dgram_hub.datasets()
        assert got["data"]["client-count"] == n and got["data"]["bytes-sent"] == \
            big["data"]["bytes-sent"]
        assert 0 < len(got["data"]["clients"]) < n
        assert got["data"]["clients"] == big["data"]["clients"][:len(got["data"]["clients"])]
        assert second == small
        assert stats.datasets_trimmed == 1 and stats.datasets_sent == 2
        assert stats.datasets_dropped == 1 and stats.drops["too-large"] == 1
        assert logs.matching("cannot be sent even without clients; dropped")
        assert len(sink.queue) == 0 and sink.queue.totals() == (0, 0)
    finally:
        await sink.stopService()
        store.close()


@pytest.mark.parametrize("kind", ["unix", "tcp"])
@pytest_twisted.ensureDeferred
async def test_stream_hub_absent_gone_and_back_keeps_order(
        kind, service, exporter, tmp_path, logs):
    if kind == "unix":
        path = tmp_path / "hub.sock"
        server, client = f"unix:{path}", f"unix:path={path}"
    else:
        probe = StreamHub("tcp:0:interface=127.0.0.1")
        await probe.start()
        number = probe.port.getHost().port
        await probe.stop()
        server, client = f"tcp:{number}:interface=127.0.0.1", f"tcp:host=127.0.0.1:port={number}"
    hub = StreamHub(server)
    limit = 4
    backoff = clock_at()
    run = with_sink(service, exporter, lambda stats, clock: HubStreamSink(
        client, reactor, stats, limit, clock=backoff))
    await wait_for(lambda: exporter.current is not None)

    async def until_connected():
        for _ in range(50):
            if run.sink.connection is not None:
                return
            backoff.advance(5)
            await turn()
        raise AssertionError("the stream sink did not reconnect")

    try:
        for k in range(2):
            await stream_interval(run, exporter, k, 10)
            report_due(run, k, 10)
        await turn()
        assert run.stats.datasets_dropped == 2 and len(run.sink.queue) == limit
        quiet = len(logs.events)
        for _ in range(12):
            backoff.advance(5)
            await turn(1)
        assert logs.texts()[quiet:] == [], "retries while the hub stays away log nothing"

        await hub.start()
        await until_connected()
        await wait_for(lambda: len(hub.lines) == limit)

        await stream_interval(run, exporter, 2, 10)
        report_due(run, 2, 10)
        await wait_for(lambda: len(hub.lines) == limit + 3)

        await hub.stop()
        for k in (3, 4):
            await stream_interval(run, exporter, k, 10)
            report_due(run, k, 10)
        assert len(run.sink.queue) == limit and run.stats.datasets_dropped == 4
        await hub.start()
        await until_connected()
        await wait_for(lambda: len(hub.lines) == 2 * limit + 3)

        want = expected_keys(T0, 5, 10)
        assert [key(d) for d in hub.datasets()] == want[2:9] + want[-limit:]
        assert all(d["data"]["bytes-sent"] == 303 for d in hub.datasets())
        assert len(logs.matching(f"sfive hub at {client} unavailable")) == 1
        assert len(logs.matching(f"lost the sfive hub at {client}")) == 1
        assert len(logs.matching(f"connected to the sfive hub at {client}")) == 2
        assert run.stats.datasets_sent == 2 * limit + 3
        assert run.stats.hub_reconnects >= 3
        assert not errors(logs)
    finally:
        await hub.stop()


@pytest.mark.parametrize("hub_reads", [True, False])
@pytest_twisted.ensureDeferred
async def test_stop_gives_queued_datasets_a_bounded_chance(
        hub_reads, service, exporter, dgram_hub, logs):
    dgram_hub.open()
    run = with_sink(service, exporter, datagram_sink(dgram_hub.path), duration=1, grace=0.5)
    await wait_for(lambda: exporter.current is not None)
    for k in range(8):
        await stream_interval(run, exporter, k, 1, n=1)
        report_due(run, k, 1, grace=0.5)
    await stream_interval(run, exporter, 8, 1, n=1)
    queued = len(run.sink.queue)
    assert queued > 0

    stopping = run.top.stopService()
    assert not stopping.called, "the stop waits for the stalled hub"
    assert len(run.sink.queue) == queued + 3, "the partial interval is reported at the stop"
    if hub_reads:
        await wait_for(dgram_hub.has(27))
        await wait_for(lambda: stopping.called)
        assert [key(d) for d in dgram_hub.datasets()] == expected_keys(T0, 9, 1)
        assert not logs.matching("not delivered")
    else:
        run.clock.advance(DRAIN_SECONDS)
        assert stopping.called
        assert logs.matching(f"stopping with {queued + 3} datasets not delivered to the hub")
    await stopping
