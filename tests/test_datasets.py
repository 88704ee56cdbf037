"""The wire form of datasets: the caching Encoder the sinks use writes exactly what ``encode``
writes, whatever the clients, however often they come back, and whatever an embedder hands in."""

from __future__ import annotations

import simplejson
from hypothesis import given
from hypothesis import strategies as st

from sfive_ngxlua.datasets import Encoder, encode


def dataset(clients: list) -> dict:
    return {
        "version": 1, "hostname": "h", "tags": ["t"],
        "streamer-id": {"content-id": "av", "format": "hls", "quality": "high"},
        "start-time": "2026-11-28T10:00:00Z", "duration-ms": 15000,
        "data": {"clients": clients, "client-count": len(clients),
                 "bytes-sent": sum(c.get("bytes-sent", 0) for c in clients
                                   if type(c) is dict and type(c.get("bytes-sent")) is int)},
    }


def entry(ip: str, ua: str, sent: int) -> dict:
    return {"ip": ip, "user-agent": ua, "bytes-sent": sent}


def test_the_same_bytes_as_encode_on_first_sight_and_from_the_cache():
    encoder = Encoder()
    first = dataset([entry("10.0.0.1", 'VLC "3" \\ é \u2028', 5), entry("::1", "", 0)])
    again = dataset([entry("10.0.0.1", 'VLC "3" \\ é \u2028', 7), entry("::1", "", 2**53 - 1)])
    assert encoder(first) == encode(first)
    assert encoder(again) == encode(again)
    assert simplejson.loads(encoder(again))["data"]["clients"][0] == entry(
        "10.0.0.1", 'VLC "3" \\ é \u2028', 7)
    assert encoder(again).endswith(b"}\n") and encoder(again).count(b"\n") == 1


def test_entries_of_another_shape_are_encoded_as_they_are():
    odd = [
        {"ip": "1.2.3.4", "user-agent": "a", "bytes-sent": 1, "extra": True},
        {"ip": 4, "user-agent": "a", "bytes-sent": 1},
        {"ip": "1.2.3.4", "user-agent": "a", "bytes-sent": True},
        {"user-agent": "a", "bytes-sent": 1, "port": 2},
        ["not", "a", "dict"],
        {"ip": "1.2.3.4", "user-agent": "a", "bytes-sent": 1.5},
    ]
    assert Encoder()(dataset(odd)) == encode(dataset(odd))
    assert Encoder()({"version": 1, "data": {"clients": "none"}}) == encode(
        {"version": 1, "data": {"clients": "none"}})
    assert Encoder()({"version": 1}) == b'{"version":1}\n'


def test_a_full_cache_is_cleared_and_the_output_stays_the_same():
    encoder = Encoder(limit=3)
    for round_ in range(3):
        clients = [entry(f"10.0.0.{i}", f"ua{i}", i + round_) for i in range(7)]
        assert encoder(dataset(clients)) == encode(dataset(clients))
    assert len(encoder._prefixes) <= 3


text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)


@given(st.lists(st.lists(st.tuples(text, text, st.integers(0, 2**60)), max_size=6),
                min_size=1, max_size=4))
def test_any_clients_over_any_intervals(rounds):
    encoder = Encoder(limit=4)
    for clients in rounds:
        d = dataset([entry(ip, ua, sent) for ip, ua, sent in clients])
        assert encoder(d) == encode(d)
