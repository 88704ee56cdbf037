"""Prepared datasets against the datasets as they were made before (a dict per client, the
ranking's key per client, simplejson per entry): the same dicts, the same wire bytes, the same
datagrams at every limit, on hostile strings, ties, overflow entries and huge counts."""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import pytest
import simplejson
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sfive_ngxlua import datasets as ds
from sfive_ngxlua.datasets import JsonLinesWriter, Prepared, datasets, encode, fit, prepared
from sfive_ngxlua.model import Clients, Interval
from sfive_ngxlua.outbox import DirectOutbox
from sfive_ngxlua.records import start_time
from sfive_ngxlua.settings import Settings
from sfive_ngxlua.sinks import CallableSink
from sfive_ngxlua.stats import Stats

A, B = ("av", "hls", "high"), ("e\"v\\", "dash", "l\u00f6w")

_json = simplejson.JSONEncoder(separators=(",", ":")).encode


def reference(interval: Interval, s: Settings) -> List[Dict[str, Any]]:
    """``datasets()`` as it was (2453547): a ranking key and a dict per client."""
    out = []
    for streamer in s.streamers:
        clients = interval.streams[streamer]
        ranked = sorted(clients.bytes.items(), key=lambda item: (-item[1], item[0]))
        out.append({
            "version": 1, "hostname": s.hostname, "tags": list(s.tags),
            "streamer-id": {"content-id": streamer[0], "format": streamer[1],
                            "quality": streamer[2]},
            "start-time": start_time(interval.start), "duration-ms": interval.duration_ms,
            "data": {"clients": [{"ip": ip, "user-agent": ua, "bytes-sent": sent}
                                 for (ip, ua), sent in ranked],
                     "client-count": clients.count, "bytes-sent": clients.total}})
    return out


def reference_fit(dataset: Dict[str, Any], limit: int) -> Tuple[bytes, int]:
    """``fit`` as it was: each client encoded on its own, appended while it fits."""
    data = dataset["data"]
    shell = _json(dict(dataset, data=dict(data, clients=[])))
    at = shell.rindex('"clients":[]') + len('"clients":[')
    head, tail = shell[:at], shell[at:] + "\n"
    room = limit - len(head) - len(tail)
    parts = []
    for client in data["clients"]:
        entry = _json(client)
        room -= len(entry) + 1
        if room < -1:
            break
        parts.append(entry)
    return (head + ",".join(parts) + tail).encode("utf-8"), len(parts)


# every code point (lone surrogates, controls, quotes, backslashes, U+007F, astral ones),
# and strings that are plain but for one character
hostile = st.text(st.characters(blacklist_categories=()), max_size=12)
plain = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=12)
texts = st.one_of(plain, hostile, plain.map(lambda t: t + '"'), plain.map(lambda t: "\\" + t),
                  st.sampled_from(["", "10.0.0.1", "Mozilla/5.0 \"quoted\"", "\x7f", "\ud800"]))
# few distinct byte counts, so that ties (and whole runs of them) are common; huge ones too
sents = st.one_of(st.sampled_from([0, 1, 7, 100, 2**30, 2**31 - 1]),
                  st.integers(0, 2**70))
tables = st.lists(st.tuples(st.tuples(texts, texts), sents), max_size=60)


def interval_of(items, cap: int, other=()) -> Interval:
    streams = {}
    for streamer, pairs in ((A, items), (B, other)):
        clients = Clients(cap)
        for key, sent in pairs:
            clients.add(key, sent)  # a repeated client sums; past cap: the overflow entry
        streams[streamer] = clients
    return Interval(1_800_000_000, 15_000, streams)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=tables, other=tables, cap=st.sampled_from([1, 2, 5, 50_000]),
       hostname=texts, tags=st.lists(texts, max_size=3), batch=st.sampled_from([1, 2, 3, 256]),
       limits=st.lists(st.integers(0, 6000), max_size=6))
@example(items=[(("b", "u"), 5), (("a", "u"), 5), (("a", "t"), 5), (("c", "u"), 9)], other=[],
         cap=50_000, hostname="h", tags=[], batch=1, limits=[])
def test_prepared_datasets_are_the_datasets_of_before_byte_for_byte(
        items, other, cap, hostname, tags, batch, limits):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ds, "FIT_BATCH", batch)  # batches of 1, 2, 3 clients: every cut
        check_prepared(items, other, cap, hostname, tags, limits)


def check_prepared(items, other, cap, hostname, tags, limits):
    s = Settings(streamers=(A, B), hostname=hostname, tags=tuple(tags))
    interval = interval_of(items, cap, other)
    want = reference(interval, s)
    assert datasets(interval, s) == want
    for p, d in zip(prepared(interval, s), want):
        whole = _json(d).encode("utf-8") + b"\n"
        assert encode(p) == encode(d) == whole
        assert ds.listed(p) == ds.listed(d) == len(d["data"]["clients"])
        # at the whole length, one byte short, around each entry's end, and anywhere
        ends = [len(whole), len(whole) - 1, 0, 1]
        ends += [len(reference_fit(d, n)[0]) + k for n in limits for k in (-1, 0, 1)]
        for limit in ends + limits:
            assert fit(p, limit) == fit(d, limit) == reference_fit(d, limit), limit


@settings(max_examples=100, deadline=None)
@given(items=tables)
def test_ranked_is_largest_first_then_ip_then_user_agent(items):
    clients = interval_of(items, 50_000).streams[A]
    assert ds.ranked(clients) == sorted(clients.bytes.items(), key=lambda kv: (-kv[1], kv[0]))


class Collecting:
    """A sink of an embedding application's own: it gets dicts."""

    def __init__(self) -> None:
        self.got: List[Any] = []

    def deliver(self, dataset: Any) -> None:
        self.got.append(dataset)


def test_sinks_that_take_dicts_get_dicts_and_the_others_the_same_bytes(tmp_path):
    s = Settings(streamers=(A, B), hostname="h", tags=("t",))
    interval = interval_of([(("10.0.0.1", 'ua "q"'), 5), (("10.0.0.2", "ua"), 7)], 50_000)
    want = reference(interval, s)
    own, called = Collecting(), []
    DirectOutbox(s, own, Stats()).emit([interval])
    DirectOutbox(s, CallableSink(called.append), Stats()).emit([interval])
    assert own.got == called == want and all(type(d) is dict for d in own.got + called)
    path = tmp_path / "out"
    with open(path, "wb") as out:
        writer = JsonLinesWriter(Stats(), out)
        got = []
        DirectOutbox(s, type("Spy", (), {"takes_prepared": True,
                                         "deliver": lambda self, d: got.append(d)})(),
                     Stats()).emit([interval])
        assert [type(d) for d in got] == [Prepared, Prepared]
        ds.report([interval], s, writer.deliver)
    assert path.read_bytes() == b"".join(_json(d).encode() + b"\n" for d in want)
