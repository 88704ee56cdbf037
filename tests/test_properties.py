"""Properties of the ingest path, for any mix of valid and invalid lines cut into chunks anywhere.

The service is composed by ``service.build`` (pipeline, model, reporter, a CallableSink) on a
task.Clock; the chunks go into the pipeline that the fetcher feeds (the HTTP transport itself is
exercised by the other fault tests). Two properties:

- conservation: the bytes over all reported datasets equal the bytes of the accepted records,
  also when reports happen while records are still arriving (late records);
- exactness: when everything arrives before the reports, each interval's clients equal a
  straightforward recomputation (client cap, overflow entry and user agent truncation included),
  and every line is counted under the right reason.
"""

from __future__ import annotations

from collections import Counter

import simplejson
from helpers.faults import T0, clock_at, iso
from helpers.faults import settings as make_settings
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor

from sfive_ngxlua.datasets import start_time
from sfive_ngxlua.model import OVERFLOW_CLIENT
from sfive_ngxlua.service import build
from sfive_ngxlua.sinks import CallableSink
from sfive_ngxlua.stats import Stats

D = 10
MAX_LINE = 300
MAX_UA = 8
CONFIGURED = (("foo", "hls", "high"), ("foo", "dash", "low"))
URLS = {
    ("foo", "hls", "high"): "/live/hls/foo-high/a.ts",
    ("foo", "dash", "low"): "/live/dash/foo-low/b.m4s",
    ("bar", "hls", "high"): "/live/hls/bar-high/c.ts",
}
UAS = ["curl", "VLC/3.0.18", "VLC/3.0.20", "Mozilla/5.0 (X11)", "Mozilla/5.0 (Mac)"]

valid = st.fixed_dictionaries({
    "t": st.one_of(st.sampled_from([-12, 0, 3, 10, 25, 59]), st.integers(-25, 59)),
    "client": st.sampled_from(["10.0.0.1", "10.0.0.2", "2001:db8::7", "192.0.2.9"]),
    "ua": st.sampled_from(UAS),
    "streamer": st.sampled_from(sorted(URLS)),
    "status": st.sampled_from([200, 200, 206, 404]),
    "sent": st.integers(0, 10**9),
    "offset": st.sampled_from(["+00:00", "Z"]),
}).map(lambda r: ("record", r))

invalid = st.one_of(
    st.sampled_from([
        (b"not json", "invalid-json"),
        (b"[1,2]", "not-an-object"),
        (b'{"url": "/live/hls/foo-high/a.ts"}', "missing-field"),
        (b'{"time":"2027-01-15T08:00:00Z","client":"c","ua":"u","url":"/x","status":"200",'
         b'"bytes-sent":1}', "wrong-type"),
        (b'{"time":"2027-01-15T08:00:00","client":"c","ua":"u",'
         b'"url":"/live/hls/foo-high/a.ts","status":200,"bytes-sent":1}', "bad-time"),
        (b'{"time":"2027-01-15T08:00:00Z","client":"c","ua":"u","url":"/nope","status":200,'
         b'"bytes-sent":1}', "url-mismatch"),
        (b'\xff\xfe{}', "invalid-utf8"),
    ]).map(lambda p: ("bad", p)),
    st.sampled_from([MAX_LINE - 1, MAX_LINE, MAX_LINE + 1, MAX_LINE + 40]).map(
        lambda n: ("filler", n)),
    st.integers(1, 50).map(lambda k: ("gap", k)),
)

items = st.lists(st.one_of(valid, valid, invalid), max_size=60)
endings = st.lists(st.sampled_from([b"\n", b"\r\n", b"\n\n"]), min_size=1)


def render(item: tuple) -> bytes:
    kind, value = item
    if kind == "record":
        return simplejson.dumps({
            "seq": 1, "time": iso(T0 + value["t"], value["offset"]), "client": value["client"],
            "ua": value["ua"], "url": URLS[value["streamer"]], "status": value["status"],
            "bytes-sent": value["sent"],
        }).encode()
    if kind == "bad":
        return value[0]
    if kind == "filler":
        return b"y" * value
    return simplejson.dumps({"lost": value, "seq": 99}).encode()


def stream_of(lines: list, ends: list) -> bytes:
    return b"".join(text + ends[i % len(ends)] for i, text in enumerate(lines))


def cuts(data: bytes, positions: list, at_newlines: bool = False) -> list:
    """``data`` cut at the given positions (and, if asked, just before every newline)."""
    points = {p % (len(data) + 1) for p in positions}
    if at_newlines:
        points.update(i for i, byte in enumerate(data) if byte == 10)
    points = sorted(points)
    out, last = [], 0
    for p in points + [len(data)]:
        out.append(data[last:p])
        last = p
    return out


def expected(items_: list):
    """What a direct reading of the lines says: reasons, lost, and the accepted records."""
    reasons, lost, accepted, before = Counter(), 0, [], 0
    for kind, value in items_:
        if kind == "bad":
            reasons[value[1]] += 1
        elif kind == "filler":
            reasons["too-long" if value > MAX_LINE else "invalid-json"] += 1
        elif kind == "gap":
            lost += value
        elif value["status"] not in (200, 206):
            reasons["status"] += 1
        elif value["streamer"] not in CONFIGURED:
            reasons["unknown-streamer"] += 1
        elif value["t"] < 0:
            before += 1
        else:
            accepted.append(value)
    return reasons, lost, accepted, before


def running(max_clients: int):
    clock = clock_at(T0)
    stats = Stats()
    out: list = []
    s = make_settings(streamers=CONFIGURED, duration=D, grace=1.0, max_line_length=MAX_LINE,
                      max_ua_length=MAX_UA, max_clients=max_clients)
    top = build(s, reactor, sink=CallableSink(out.append, stats), clock=clock, stats=stats)
    report = top.getServiceNamed("report")
    report.source = None  # the test feeds the pipeline, not the (unstarted) fetcher: the clock
    report.startService()
    return clock, stats, out, report, top.getServiceNamed("fetch").pipeline


@settings(max_examples=200, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(items=items, ends=endings, positions=st.lists(st.integers(0, 20000), max_size=40),
       at_newlines=st.booleans(), ticks=st.lists(st.integers(0, 40), max_size=40),
       max_clients=st.integers(1, 6))
def test_bytes_are_conserved_whenever_reports_happen(items, ends, positions, at_newlines, ticks,
                                                     max_clients):
    clock, stats, out, report, pipeline = running(max_clients)
    chunks = cuts(stream_of([render(i) for i in items], ends), positions, at_newlines)
    for n, chunk in enumerate(chunks):
        pipeline.feed(chunk)
        if n < len(ticks):
            clock.advance(ticks[n] / 4)
    report.stopService()

    _, _, accepted, _ = expected(items)
    assert stats.accepted == len(accepted)
    assert sum(d["data"]["bytes-sent"] for d in out) == sum(r["sent"] for r in accepted)
    assert sum(c["bytes-sent"] for d in out for c in d["data"]["clients"]) == sum(
        r["sent"] for r in accepted)
    starts = [d["start-time"] for d in out]
    assert starts == sorted(starts), "intervals are reported in order"


@settings(max_examples=200, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(items=items, ends=endings, positions=st.lists(st.integers(0, 20000), max_size=40),
       at_newlines=st.booleans(), max_clients=st.sampled_from([1, 2, 3, 50000]),
       stop_at=st.one_of(st.none(), st.integers(0, 69)))
@example(  # a gap before the first record: the empty interval it spans whole is withheld
    items=[("gap", 1), ("record", {"t": 10, "client": "10.0.0.1", "ua": "curl",
                                   "streamer": CONFIGURED[0], "status": 200, "sent": 0,
                                   "offset": "+00:00"})],
    ends=[b"\n"], positions=[], at_newlines=False, max_clients=1, stop_at=None)
@example(  # a stop merges later intervals into the running one: clients folded there count
    items=[("record", {"t": t, "client": c, "ua": "curl", "streamer": CONFIGURED[0],
                       "status": 200, "sent": 1, "offset": "Z"})
           for t, c in ((1, "a"), (1, "b"), (25, "c"), (25, "d"), (25, "e"), (25, "b"))],
    ends=[b"\n"], positions=[], at_newlines=False, max_clients=2, stop_at=5)
def test_each_interval_equals_a_direct_recomputation(items, ends, positions, at_newlines,
                                                      max_clients, stop_at):
    """All lines arrive first; then the service either runs until every interval is reported
    or is stopped ``stop_at`` seconds in, when the running interval takes every later record."""
    clock, stats, out, report, pipeline = running(max_clients)
    lines = [render(i) for i in items]
    for chunk in cuts(stream_of(lines, ends), positions, at_newlines):
        pipeline.feed(chunk)
    clock.advance(100 if stop_at is None else stop_at)
    report.stopService()

    reasons, lost, accepted, before = expected(items)
    assert stats.rejected == reasons
    assert stats.lost == lost
    assert stats.before_start == before
    assert stats.accepted == len(accepted)
    assert stats.late == 0
    assert stats.lines == len(lines)

    last = 10 if stop_at is None else stop_at // D
    want: dict = {}
    for r in accepted:
        k = min(r["t"] // D, last)
        per = want.setdefault((start_time(T0 + k * D), r["streamer"]), {})
        who = (r["client"], r["ua"][:MAX_UA])
        per[who] = per.get(who, 0) + r["sent"]
    got = {}
    for d in out:
        sid = d["streamer-id"]
        got[(d["start-time"], (sid["content-id"], sid["format"], sid["quality"]))] = d
    assert len(got) == len(out), "one dataset per interval and streamer"
    # an interval without records that a gap (of unknown times) spans whole is withheld
    given_up = {k - T0 // D for a, b in report.model.given_up for k in range(a, b + 1)}
    assert not any(start_time(T0 + k * D) == start for k in given_up for start, _ in want)
    assert sorted({start for start, _ in got}) == [
        start_time(T0 + k * D) for k in range(last + 1) if k not in given_up]
    if last not in given_up:
        assert [d["duration-ms"] for d in out[-2:]] == [(100 if stop_at is None else stop_at)
                                                         * 1000 - last * D * 1000] * 2

    for key, d in got.items():
        data, per = d["data"], want.get(key, {})
        assert data["client-count"] == len(per)
        assert data["bytes-sent"] == sum(per.values())
        clients = {(c["ip"], c["user-agent"]): c["bytes-sent"] for c in data["clients"]}
        if len(per) <= max_clients:
            assert clients == per
        elif stop_at is None or key[0] != start_time(T0 + last * D):
            kept = list(per)[:max_clients]
            assert clients.pop(OVERFLOW_CLIENT) == sum(per[w] for w in list(per)[max_clients:])
            assert clients == {w: per[w] for w in kept}


@settings(max_examples=100, deadline=None, database=None)
@given(records=st.lists(st.tuples(st.integers(0, 59), st.integers(0, 7), st.integers(0, 999)),
                        max_size=40),
       max_clients=st.integers(1, 4), stop_at=st.integers(0, 9))
def test_a_stop_counts_every_client_of_the_merged_intervals_once(records, max_clients, stop_at):
    """At a stop in the first interval, every later record joins it (no byte is lost):
    client-count is the number of distinct clients over all of them, whatever the cap."""
    clock, stats, out, report, pipeline = running(max_clients)
    pipeline.feed(b"".join(render(("record", {
        "t": t, "client": f"10.1.1.{c}", "ua": "curl", "streamer": CONFIGURED[0],
        "status": 200, "sent": sent, "offset": "Z"})) + b"\n" for t, c, sent in records))
    clock.advance(stop_at)
    report.stopService()

    data = out[0]["data"]
    assert out[0]["duration-ms"] == stop_at * 1000
    assert data["client-count"] == len({c for _, c, _ in records})
    assert data["bytes-sent"] == sum(sent for _, _, sent in records)
    assert sum(c["bytes-sent"] for c in data["clients"]) == data["bytes-sent"]


# -- checkpoints, crashes and restarts (issue 11) -----------------------------------------------


class _Died(Exception):
    """The process died inside a commit: nothing of that transaction is kept."""


class _Store:
    """The state store's contract in memory: a replica of the model built from take_changes(),
    the position and the committed datasets, each commit all or nothing."""

    def __init__(self, streamers) -> None:
        self.streamers = streamers
        self.head = None  # (first, reported, live)
        self.open: dict = {}
        self.seq = None
        self.datasets: list = []

    def commit(self, changes, seq, datasets=()) -> None:
        opened = {k: {i: (dict(c), set(f)) for i, (c, f) in v.items()}
                  for k, v in self.open.items()}
        for k in changes.dropped:
            opened.pop(k, None)
        for k, i, ip, ua, sent in changes.clients:
            opened.setdefault(k, {}).setdefault(i, ({}, set()))[0][(ip, ua)] = sent
        for k, i, h in changes.folded:
            opened.setdefault(k, {}).setdefault(i, ({}, set()))[1].add(h)
        self.open, self.seq = opened, seq
        self.head = (changes.first, changes.reported, changes.live)
        self.datasets = self.datasets + list(datasets)

    def snapshot(self) -> dict:
        first, reported, live = self.head
        return {"format": 1, "duration": D, "streamers": [list(s) for s in self.streamers],
                "first": first, "reported": reported, "live": live,
                "open": {str(k): {str(i): {"clients": [[ip, ua, b] for (ip, ua), b in c.items()],
                                            "folded": sorted(f)}
                                  for i, (c, f) in v.items()} for k, v in self.open.items()}}


class _Process:
    """One run of the service's core: pipeline, model, reporter (commit hook), on one clock;
    the source's watermark is the last heartbeat, as for a protocol 2 exporter."""

    def __init__(self, s, clock, store=None, log=None) -> None:
        from sfive_ngxlua.model import IntervalModel
        from sfive_ngxlua.pipeline import Pipeline
        from sfive_ngxlua.report import ReportService

        self.store, self.log, self.dead, self.fail_next = store, log, False, False
        stats = Stats()
        if store is None or store.head is None:
            self.model = IntervalModel(s, stats)
        else:
            self.model = IntervalModel.restore(s, stats, store.snapshot())
        self.pipeline = Pipeline(s, stats, self.model)
        if store is not None:
            self.pipeline.parser.last_seq = store.seq
        self.settings, self.keep_open = s, False
        self.report = ReportService(s, clock, self.model, self, stats, source=self,
                                    held_cap=10**9)
        self.report.startService()
        if store is not None and store.head is None:
            self.checkpoint()  # the store writes the new state at start

    def kill(self) -> None:
        """The process is gone: none of its timers runs again."""
        if self.report._start is not None and self.report._start.active():
            self.report._start.cancel()
        if self.report.loop.running:
            self.report.loop.stop()

    def watermark(self, now: float) -> float:
        beat = self.pipeline.heartbeat
        return float("-inf") if beat is None else beat.time

    def emit(self, intervals) -> None:
        """The outbox (as the durable one: the report's batch in one commit; a commit that
        fails costs that batch)."""
        from sfive_ngxlua.datasets import datasets

        try:
            self.commit([d for iv in intervals for d in datasets(iv, self.settings)])
        except _Died:
            pass

    def at_stop(self, model, now):
        return [] if self.keep_open else model.close_all(now)

    def commit(self, batch) -> None:
        if self.store is None:
            self.log.extend(batch)
            return
        if self.fail_next:
            self.dead = True
            raise _Died()
        self.store.commit(self.model.take_changes(), self.pipeline.last_seq, batch)

    def checkpoint(self) -> None:
        self.store.commit(self.model.take_changes(), self.pipeline.last_seq)

    def feed(self, line: bytes) -> None:
        self.pipeline.feed(line + b"\n")
        self.report.check()


def _normal(datasets):
    out = []
    for d in datasets:
        d = simplejson.loads(simplejson.dumps(d))
        d["data"]["clients"].sort(key=lambda c: (c["ip"], c["user-agent"]))
        out.append(d)
    return out


exporter_records = st.lists(st.tuples(
    st.integers(0, 39),  # time, T0-relative
    st.sampled_from(["10.0.0.1", "10.0.0.2", "10.0.0.3", "2001:db8::7"]),
    st.sampled_from(["curl", "VLC"]),
    st.sampled_from(CONFIGURED),
    st.integers(0, 10**6),
    st.one_of(st.just(0), st.just(0), st.just(0), st.integers(1, 15)),  # how late it comes
), max_size=30)
operations = st.lists(st.tuples(
    st.integers(0, 80),
    st.sampled_from(["tick", "tick", "checkpoint", "crash", "restart", "crash-in-commit"]),
    st.integers(0, 6),
), max_size=25)


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(records=exporter_records, beats=st.lists(st.integers(0, 40), max_size=25),
       ops=operations, max_clients=st.sampled_from([1, 1, 2, 50000]))
def test_checkpoints_crashes_and_restarts_give_the_datasets_of_one_uninterrupted_run(
        records, beats, ops, max_clients):
    """Any record stream, cut by checkpoints (take_changes applied to a replica), crashes
    (restore from the replica, the records after its sequence number fed again) and restarts
    (a stop that keeps the running interval, a checkpoint, a restore), at any points, gives
    the datasets of one uninterrupted run. Reporting follows the heartbeats (the exporter's
    promise, which some records break: those are late), never the wall clock."""
    s = make_settings(streamers=CONFIGURED, duration=D, grace=1.0, max_clients=max_clients,
                      max_delay=10**7)
    ordered = sorted(records, key=lambda r: r[0])
    items = []  # (seq of a record or None, line) in stream order: records and heartbeats
    for n, (t, ip, ua, streamer, sent, late) in enumerate(ordered, start=1):
        for b in beats:
            if b == n - 1:  # heartbeat: every record still to come is at or after T
                items.append((None, simplejson.dumps({"seq": n - 1, "hb": T0 + t - 0.5})
                               .encode()))
        items.append((n, simplejson.dumps({
            "seq": n, "time": iso(T0 + t - late), "client": ip, "ua": ua,
            "url": URLS[streamer], "status": 200, "bytes-sent": sent}).encode()))
    last = len(ordered)
    end = simplejson.dumps({"seq": last, "hb": T0 + 200.0}).encode()  # everything is in
    plan: dict = {}
    for at, op, dt in ops:
        plan.setdefault(at % (len(items) + 1), []).append((op, dt))

    # one uninterrupted run
    clock, want = clock_at(T0 - 5), []
    proc = _Process(s, clock, log=want)
    for n, (_, line) in enumerate(items + [(None, end)]):
        for op, dt in plan.get(n, ()):
            if op == "tick":
                clock.advance(dt / 2)
        proc.feed(line)
    proc.report.stopService()

    # the same stream, cut by checkpoints, crashes and restarts
    clock, store = clock_at(T0 - 5), _Store(CONFIGURED)
    proc = _Process(s, clock, store=store)
    n = 0
    stream = items + [(None, end)]
    while n < len(stream):
        for op, dt in plan.pop(n, ()):
            if op == "tick":
                clock.advance(dt / 2)
            elif op == "checkpoint":
                proc.checkpoint()
            elif op == "crash-in-commit":
                proc.fail_next = True
            elif op == "restart":
                proc.keep_open = True
                proc.report.stopService()
                if not proc.dead:
                    proc.checkpoint()
                proc.dead = True
            elif op == "crash":
                proc.dead = True
            if proc.dead:
                break
        if not proc.dead:
            proc.feed(stream[n][1])
            n += 1
        if proc.dead:
            proc.kill()
            proc = _Process(s, clock, store=store)
            n = _after(stream, store.seq)  # the exporter streams what follows it
    proc.report.stopService()

    assert _normal(store.datasets) == _normal(want)


def _after(stream, seq) -> int:
    """The index of the first line the exporter sends after ``seq``: the line after that
    record (a heartbeat after it comes again: it promises no more than before)."""
    if seq is None:
        return 0
    return next((i + 1 for i, (s, _) in enumerate(stream) if s == seq), 0)
