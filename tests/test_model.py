"""The interval model, fed plain records: alignment, late and early records, caps, stop."""

from sfive_ngxlua.model import OVERFLOW_CLIENT, IntervalModel
from sfive_ngxlua.records import Record
from sfive_ngxlua.settings import Settings
from sfive_ngxlua.stats import Stats

A = ("av", "hls", "high")
B = ("av", "dash", "low")
T0 = 1795852800  # a multiple of 15 and of 10


def model(start=T0 + 3, **kw):
    settings = Settings(streamers=(A, B), hostname="h", duration=kw.pop("duration", 10), **kw)
    return IntervalModel(settings, Stats(), start=start)


def rec(t, streamer=A, client="c1", ua="ua", sent=100):
    return Record(t, streamer, client, ua, sent)


def totals(interval):
    return {s: (c.count, c.total) for s, c in interval.streams.items()}


def test_first_interval_is_the_first_full_one_after_start():
    m = model()
    m.add(rec(T0 + 5))
    m.add(rec(T0 + 10))
    assert m.stats.before_start == 1
    assert m.first * 10 == T0 + 10
    assert m.close_due(T0 + 20.99) == []
    [i] = m.close_due(T0 + 21)
    assert (i.start, i.duration_ms) == (T0 + 10, 10000)
    assert totals(i) == {A: (1, 100), B: (0, 0)}


def test_records_go_by_their_own_time_and_clients_sum():
    m = model(start=T0)
    m.add(rec(T0 + 1, client="c1"))
    m.add(rec(T0 + 2, client="c1", sent=50))
    m.add(rec(T0 + 3, client="c1", ua="other"))
    m.add(rec(T0 + 11, client="c2", streamer=B))
    m.add(rec(T0 + 9, client="c3"))
    first, second = m.close_due(T0 + 30)
    assert first.streams[A].bytes == {("c1", "ua"): 150, ("c1", "other"): 100, ("c3", "ua"): 100}
    assert totals(first) == {A: (3, 350), B: (0, 0)}
    assert totals(second) == {A: (0, 0), B: (1, 100)}


def test_no_drift_and_empty_intervals_are_reported():
    m = model(start=T0)
    starts = []
    for k in range(1, 10001):
        starts += [i.start for i in m.close_due(T0 + k * 10 + 1)]
    assert starts == [T0 + k * 10 for k in range(10000)]


def test_missed_ticks_report_everything_due():
    m = model(start=T0)
    assert [i.start for i in m.close_due(T0 + 45)] == [T0, T0 + 10, T0 + 20, T0 + 30]


def test_late_records_go_to_the_oldest_open_interval():
    m = model(start=T0)
    m.close_due(T0 + 11)
    m.add(rec(T0 + 5, sent=7))
    assert m.stats.late == 1
    [i] = m.close_due(T0 + 21)
    assert i.start == T0 + 10 and i.streams[A].total == 7


def test_records_far_in_the_future_are_refused():
    m = model(start=T0)
    m.add(rec(T0 + 7200))
    assert m.stats.rejected["future"] == 1
    m.add(rec(T0 + 1800))
    assert m.stats.accepted == 1


def test_replay_has_no_horizon_a_quiet_hour_loses_nothing():
    m = model(start=None)
    m.add(rec(T0))
    assert m.add(rec(T0 + 86400))
    assert m.stats.rejected["future"] == 0 and m.stats.accepted == 2


def test_the_live_start_is_when_reporting_begins_not_when_built():
    m = model(start=None)
    m.begin(T0 + 3600.5)
    assert m.first * 10 == T0 + 3610
    assert not m.add(rec(T0 + 3605))
    assert m.stats.before_start == 1


def test_client_cap_folds_with_exact_totals_and_counts():
    m = model(start=T0, max_clients=3)
    for n in range(10):
        m.add(rec(T0 + 1, client=f"c{n}", sent=n))
    m.add(rec(T0 + 1, client="c9", sent=1))
    [i] = m.close_due(T0 + 11)
    clients = i.streams[A]
    assert len(clients.bytes) == 4
    assert clients.bytes[OVERFLOW_CLIENT] == sum(range(3, 10)) + 1
    assert clients.count == 10
    assert clients.total == sum(range(10)) + 1
    assert m.stats.folded == 8


def test_user_agents_are_truncated():
    m = model(start=T0, max_ua_length=5)
    m.add(rec(T0 + 1, ua="x" * 100))
    [i] = m.close_due(T0 + 11)
    assert list(i.streams[A].bytes) == [("c1", "xxxxx")]


def test_stop_reports_the_partial_interval_with_its_true_duration():
    m = model(start=T0)
    m.add(rec(T0 + 12))
    m.add(rec(T0 + 3))
    out = m.close_all(T0 + 14.25)
    assert [(i.start, i.duration_ms) for i in out] == [(T0, 10000), (T0 + 10, 4250)]
    assert [i.streams[A].total for i in out] == [100, 100]
    assert m.close_all(T0 + 15) == []


def test_stop_before_the_first_interval_loses_no_early_future_record():
    m = model(start=T0 + 3)
    m.add(rec(T0 + 11))
    [i] = m.close_all(T0 + 5)
    assert i.streams[A].total == 100 and i.duration_ms == 0


def test_replay_mode_starts_at_the_first_record_and_ends_at_the_last():
    m = model(start=None)
    m.add(rec(T0 + 25))
    m.add(rec(T0 + 44))
    out = m.close_all()
    assert [i.start for i in out] == [T0 + 20, T0 + 30, T0 + 40]
    assert [i.streams[A].total for i in out] == [100, 0, 100]
