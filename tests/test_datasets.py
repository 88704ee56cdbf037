"""Datasets that fit a datagram: built to fit from the start, largest clients first,
totals exact, deterministic; and the datagram sink queueing only what fits."""

from __future__ import annotations

import random
import socket

import simplejson
from twisted.internet import reactor

from sfive_ngxlua import datasets as ds
from sfive_ngxlua.datasets import datasets, encode, fit, ranked
from sfive_ngxlua.model import OVERFLOW_CLIENT, Clients, Interval
from sfive_ngxlua.settings import Settings
from sfive_ngxlua.sinks import HubDatagramSink, datagram_limit
from sfive_ngxlua.stats import Stats

A = ("av", "hls", "high")
UA = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Player/"
SETTINGS = Settings(streamers=(A,), hostname="h", tags=("t",))


def interval(table: dict, cap: int = 50_000) -> Interval:
    clients = Clients(cap)
    for key, sent in table.items():
        clients.add(key, sent)
    return Interval(1_800_000_000, 15_000, {A: clients})


def table(n: int, ua_length: int = 100, seed: int = 1) -> dict:
    rng = random.Random(seed)
    return {(f"10.0.{i // 250}.{i % 250}", f"{UA}{i}".ljust(ua_length, "x")):
            rng.randrange(1, 10_000_000) for i in range(n)}


def one(t: dict, cap: int = 50_000) -> dict:
    (dataset,) = datasets(interval(t, cap), SETTINGS)
    return dataset


def kept(data: bytes) -> list:
    return [((c["ip"], c["user-agent"]), c["bytes-sent"])
            for c in simplejson.loads(data)["data"]["clients"]]


def test_a_dataset_that_fits_keeps_every_client_byte_for_byte():
    dataset = one(table(200))
    data, n = fit(dataset, 1 << 20)
    assert n == 200
    assert data == encode(dataset)
    assert data.endswith(b"\n") and len(simplejson.loads(data)["data"]["clients"]) == 200
    # exactly at the limit it still fits whole; one byte less and it does not
    assert fit(dataset, len(data)) == (data, 200)
    assert fit(dataset, len(data) - 1)[1] == 199


def test_a_dataset_too_large_keeps_the_largest_clients_and_exact_totals():
    t = table(5000, ua_length=300)
    dataset = one(t)
    limit = 100_000
    data, n = fit(dataset, limit)
    assert len(data) <= limit < len(encode(dataset))
    assert 0 < n < 5000
    largest = sorted(t.items(), key=lambda kv: (-kv[1], kv[0]))
    assert kept(data) == largest[:n]
    decoded = simplejson.loads(data)
    assert decoded["data"]["client-count"] == 5000
    assert decoded["data"]["bytes-sent"] == sum(t.values())
    assert {k: v for k, v in decoded.items() if k != "data"} == \
        {k: v for k, v in dataset.items() if k != "data"}
    # as full as it can be: the next client would not have fitted
    entry = len(simplejson.dumps(dataset["data"]["clients"][n], separators=(",", ":")))
    assert len(data) + 1 + entry > limit


def test_fit_never_encodes_more_than_a_datagram(monkeypatch):
    """No encode-everything-then-cut-back: no single encoding is larger than the limit."""
    dataset = one(table(20_000, ua_length=300))
    sizes = []
    real = ds._json

    def spy(obj):
        out = real(obj)
        sizes.append(len(out))
        return out

    monkeypatch.setattr(ds, "_json", spy)
    data, n = fit(dataset, 200_000)
    assert len(data) <= 200_000 and n < 20_000
    assert max(sizes) < 200_000
    assert sum(sizes) < 2 * 200_000


def test_order_is_deterministic_largest_first_then_ip_then_user_agent():
    t = {("10.0.0.2", "b"): 500, ("10.0.0.1", "z"): 500, ("10.0.0.1", "a"): 500,
         ("10.0.0.9", "a"): 900, ("10.0.0.3", "a"): 100}
    want = [("10.0.0.9", "a"), ("10.0.0.1", "a"), ("10.0.0.1", "z"), ("10.0.0.2", "b"),
            ("10.0.0.3", "a")]
    shuffled = list(t.items())
    outputs = set()
    for seed in range(5):
        random.Random(seed).shuffle(shuffled)
        dataset = one(dict(shuffled))
        assert [(c["ip"], c["user-agent"]) for c in dataset["data"]["clients"]] == want
        outputs.add(encode(dataset))
        # cut between the tied clients: the same ones are kept whatever the insertion order
        outputs.add(fit(dataset, len(encode(dataset)) - 60)[0])
    assert len(outputs) == 2
    assert [k for k, _ in ranked(interval(t).streams[A])] == want


def test_overflow_entry_and_folded_count_survive_trimming():
    t = table(3000, ua_length=300)
    dataset = one(t, cap=1000)
    data, n = fit(dataset, 50_000)
    decoded = simplejson.loads(data)["data"]
    assert decoded["client-count"] == 3000 and decoded["bytes-sent"] == sum(t.values())
    assert n == len(decoded["clients"]) < 1000
    overflow = {"ip": OVERFLOW_CLIENT[0], "user-agent": OVERFLOW_CLIENT[1]}
    # the overflow entry holds 2,000 clients' bytes: the largest entry, kept first
    assert {k: decoded["clients"][0][k] for k in overflow} == overflow


def test_a_hand_built_unsorted_dataset_is_ranked_before_it_is_cut():
    t = table(2000, ua_length=200)
    dataset = one(t)
    random.Random(3).shuffle(dataset["data"]["clients"])
    data, n = fit(dataset, 60_000)
    assert kept(data) == sorted(t.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


def test_a_limit_below_the_envelope_leaves_the_envelope_alone():
    dataset = one(table(10))
    data, n = fit(dataset, 10)
    assert n == 0
    assert simplejson.loads(data)["data"] == {"clients": [], "client-count": 10,
                                              "bytes-sent": sum(table(10).values())}


def test_empty_dataset():
    dataset = one({})
    assert fit(dataset, 1000) == (encode(dataset), 0)


def test_datagram_sink_queues_a_datagram_that_fits_and_counts_the_trim(tmp_path):
    stats = Stats()
    sink = HubDatagramSink(str(tmp_path / "absent"), reactor, stats)
    sndbuf = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).getsockopt(
        socket.SOL_SOCKET, socket.SO_SNDBUF)
    assert sink.limit == datagram_limit() < sndbuf
    small, big = one(table(100)), one(table(10_000, ua_length=300))
    sink.deliver(small)
    sink.deliver(big)
    queued_small, queued_big = sink.queue.items
    assert queued_small == encode(small)
    assert len(queued_big) <= sink.limit
    assert simplejson.loads(queued_big)["data"]["client-count"] == 10_000
    assert stats.datasets_trimmed == 1
