"""The stream hub's backpressure, run for real: a hub that stops reading fills the unix socket
and then Twisted's write buffer, the transport pauses the sink (``pauseProducing``: the
datasets wait in the sink's bounded queue, not in an unbounded write buffer), and resumes it
when the hub reads again (``resumeProducing``: the rest goes out, in order, with no further
dataset to push it)."""

from __future__ import annotations

import json

import pytest_twisted
from support import wait_for
from twisted.internet import protocol, reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import deferLater

from sfive_ngxlua.datasets import start_time
from sfive_ngxlua.sinks import HubStreamSink
from sfive_ngxlua.stats import Stats

T0 = 1795856400
COUNT = 300
CLIENTS = 150  # about 9 KB a dataset: 2.7 MB in all, far more than the socket buffers hold


def dataset(k: int) -> dict:
    clients = [{"ip": f"10.{k % 256}.{j // 256}.{j % 256}", "user-agent": "player/1.0",
                "bytes-sent": 1000 + j} for j in range(CLIENTS)]
    return {"version": 1, "hostname": "edge1", "tags": ["bp"],
            "streamer-id": {"content-id": "av", "format": "hls", "quality": "high"},
            "start-time": start_time(T0 + 15 * k), "duration-ms": 15000,
            "data": {"clients": clients, "client-count": CLIENTS,
                     "bytes-sent": sum(c["bytes-sent"] for c in clients)}}


class Hub(protocol.Protocol):
    """The hub's end of the stream: collects lines; the test pauses and resumes its reading."""

    def connectionMade(self) -> None:
        self.factory.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.factory.received.extend(data)


async def turns(n: int) -> None:
    """Let the reactor run ``n`` short rounds (writes, reads, producer callbacks)."""
    for _ in range(n):
        await deferLater(reactor, 0.01, lambda: None)


@pytest_twisted.ensureDeferred
async def test_a_stalled_stream_hub_pauses_the_sink_and_a_reading_one_resumes_it(tmp_path):
    path = str(tmp_path / "hub.sock")
    factory = protocol.Factory.forProtocol(Hub)
    factory.connections, factory.received = [], bytearray()
    port = await serverFromString(reactor, f"unix:{path}").listen(factory)
    stats = Stats()
    sink = HubStreamSink(f"unix:path={path}", reactor, stats, queue_limit=10 * COUNT)
    sink.startService()
    try:
        await wait_for(lambda: factory.connections and sink.connection is not None,
                       timeout=10, what="the sink's connection")
        hub = factory.connections[0]
        hub.transport.pauseProducing()  # the hub stops reading
        sent = [dataset(k) for k in range(COUNT)]
        for d in sent:
            sink.deliver(d)
        await turns(30)
        # Paused: most datasets still wait in the sink's queue (without the producer they
        # would all sit in the transport's write buffer and the queue would be empty).
        stalled = stats.queued
        assert stalled >= COUNT // 2, f"only {stalled} of {COUNT} datasets held in the queue"
        await turns(10)
        assert stats.queued == stalled, "the sink wrote on while the hub was not reading"
        assert len(factory.received) == 0

        hub.transport.resumeProducing()  # the hub reads again: nothing else happens
        await wait_for(lambda: factory.received.count(b"\n") == COUNT, timeout=30,
                       what="every dataset at the hub")
        got = [json.loads(x) for x in bytes(factory.received).splitlines()]
        assert got == sent, "datasets lost, repeated or out of order"
        assert stats.queued == 0
    finally:
        for hub in factory.connections:  # a paused hub never takes the rest: cut it
            hub.transport.abortConnection()
        await sink.stopService()
        await port.stopListening()
