"""``add_records`` against the loop as it was (2453547: a division per record, in/get/set of a
known client, per-record counts), on the same operations: batches with due times, late, early,
far-future and withheld records, folding at small --max-clients, long user agents, tracking,
take_changes, snapshot and restore, records that raise. Everything the two models hand out or
hold must agree."""

from __future__ import annotations

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sfive_ngxlua.model import OVERFLOW_CLIENT, Clients, IntervalModel
from sfive_ngxlua.settings import Settings
from sfive_ngxlua.stats import Stats

A, B = ("av", "hls", "high"), ("av", "dash", "low")
T0 = 1795852800
D = 10


class Before(IntervalModel):
    """The model with ``add_records`` as it was."""

    def add_records(self, records, due=math.inf):
        duration = self.duration
        cap = self._cap
        ua_max = self._ua_max
        tracking = self._tracking
        cur_k = self._cur_k
        streams = self._cur_streams
        accepted = folded = taken = 0
        try:
            for time, streamer, client, ua, sent in records:
                k = time // duration
                if k != cur_k:
                    found = self._streams_for(k)
                    cur_k, streams = self._cur_k, self._cur_streams
                    if found is None:
                        taken += 1
                        if time >= due:
                            break
                        continue
                clients = streams.get(streamer)
                if clients is None:
                    clients = streams[streamer] = Clients(cap)
                if len(ua) > ua_max:
                    ua = ua[:ua_max]
                key = (client, ua)
                known = clients.bytes
                if key in known:
                    known[key] += sent
                elif len(known) < cap:
                    known[key] = sent
                else:
                    clients.add_new(key, sent)
                    folded += 1
                    key = OVERFLOW_CLIENT
                if tracking:
                    clients.changed.add(key)
                accepted += 1
                taken += 1
                if time >= due:
                    break
        except Exception:
            self.taken = taken
            raise
        finally:
            stats = self.stats
            stats.accepted += accepted
            stats.folded += folded
        return taken


record = st.tuples(
    # before the start, in the running intervals, late (after closes), beyond the horizon
    st.one_of(st.integers(-300, 80), st.sampled_from([-10_000, 7_300, 9_000])).map(
        lambda dt: T0 + dt),
    st.sampled_from([A, B]),
    st.sampled_from(["10.0.0.1", "10.0.0.2", "c", ""]),
    st.sampled_from(["ua", "u", "user agent, long", "user agent, longer"]),
    st.integers(0, 2**40))
batch = st.lists(record, max_size=12).map(sorted) | st.lists(record, max_size=12)
due = st.one_of(st.just(math.inf), st.just(-math.inf),
                st.integers(-20, 80).map(lambda dt: T0 + dt),
                st.integers(-20, 80).map(lambda dt: T0 + dt + 0.5))
op = st.one_of(
    st.tuples(st.just("add"), batch, due),
    st.tuples(st.just("raise"), batch, st.integers(0, 12)),  # the record at that index raises
    st.tuples(st.just("bad"), batch, st.integers(0, 12)),    # a list with a record that raises
    st.tuples(st.just("iterable"), batch, due),              # not a list: a generator
    st.tuples(st.just("close_due"), st.integers(0, 90).map(lambda dt: T0 + dt + 0.25)),
    st.tuples(st.just("close_all"), st.one_of(st.none(), st.integers(0, 90).map(
        lambda dt: T0 + dt + 0.5))),
    st.tuples(st.just("changes")),
    st.tuples(st.just("restore")),
    st.tuples(st.just("give_up"), st.integers(-2, 6)),
)


class Injected(Exception):
    pass


def failing(records, at):
    for i, r in enumerate(records):
        if i == at:
            raise Injected()
        yield r


def state(m: IntervalModel):
    s = m.stats
    tables = {k: {streamer: (dict(c.bytes), c.folded, sorted(c.changed), sorted(c.new_folded))
                  for streamer, c in streams.items()} for k, streams in m._open.items()}
    return (s.accepted, s.folded, s.late, s.before_start, dict(s.rejected),
            s.records_withheld, m.first, m.reported, tables, m.given_up)


def intervals(out):
    return [(i.start, i.duration_ms, {s: (dict(c.bytes), c.folded, c.count, c.total)
                                      for s, c in i.streams.items()}) for i in out]


def changes(c):
    return (c.first, c.reported, c.live, c.coverage, sorted(c.clients), sorted(c.folded),
            sorted(c.dropped))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(live=st.booleans(), tracked=st.booleans(), cap=st.sampled_from([1, 2, 3, 50_000]),
       ua_max=st.sampled_from([1, 5, 200]), ops=st.lists(op, max_size=14))
def test_add_records_agrees_with_the_loop_as_it_was(live, tracked, cap, ua_max, ops):
    s = Settings(streamers=(A, B), hostname="h", duration=D, max_clients=cap,
                 max_ua_length=ua_max)
    start = T0 + 3 if live else None
    models = [cls(s, Stats(), start=start) for cls in (IntervalModel, Before)]
    if tracked:
        assert changes(models[0].take_changes()) == changes(models[1].take_changes())
    for what, *args in ops:
        results = []
        for i, m in enumerate(models):
            if what == "add":
                result = m.add_records(list(args[0]), args[1])
            elif what == "bad":
                records = list(args[0])
                records.insert(args[1], (T0, A, "c", "ua"))  # one field short
                m.taken = None
                try:
                    result = m.add_records(records)
                except ValueError:
                    result = ("raised", m.taken)
            elif what == "iterable":
                result = m.add_records(iter(args[0]), args[1])
            elif what == "raise":
                m.taken = None
                try:
                    result = m.add_records(failing(args[0], args[1]))
                except Injected:
                    result = ("raised", m.taken)
            elif what == "close_due":
                result = intervals(m.close_due(args[0]))
            elif what == "close_all":
                if args[0] is None and live:
                    continue
                result = intervals(m.close_all(args[0]))
            elif what == "changes":
                if not m._tracking:
                    continue
                result = changes(m.take_changes())
            elif what == "restore":
                snap = m.snapshot()
                models[i] = m = type(m).restore(s, m.stats, snap)
                result = snap
            elif what == "give_up":
                if m.reported is not None:
                    m.give_up(m.reported + args[0])
                result = None
            results.append((result, state(m)))
        if results:
            assert results[0] == results[1], what
