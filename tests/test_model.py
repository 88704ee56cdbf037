"""The interval model, fed plain records: alignment, late and early records, caps, stop."""

import json
import subprocess
import sys

import pytest

from sfive_ngxlua.model import OVERFLOW_CLIENT, Changes, IntervalModel, StateMismatch, fold_hash
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
    m.add(rec(T0 + 7200 + 20))
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


# -- the model as data: snapshot, restore, take_changes -----------------------------------------



def apply(replica, changes: Changes):
    """What a state store does with take_changes(): the replica of the open intervals."""
    for k in changes.dropped:
        replica.pop(k, None)
    for k, i, ip, ua, sent in changes.clients:
        replica.setdefault(k, {}).setdefault(i, [{}, set()])[0][(ip, ua)] = sent
    for k, i, h in changes.folded:
        replica.setdefault(k, {}).setdefault(i, [{}, set()])[1].add(h)
    return replica


def as_replica(m):
    """The model's open intervals in the replica's form, read from a snapshot."""
    out = {}
    for k, streams in m.snapshot()["open"].items():
        for i, data in streams.items():
            out.setdefault(int(k), {})[int(i)] = [
                {(ip, ua): sent for ip, ua, sent in data["clients"]}, set(data["folded"])]
    return out


def test_fold_hash_is_the_same_in_another_process():
    keys = [("10.0.0.1", "curl"), ("2001:db8::1", "VLC/3.0 ü"), ("", ""), ("a\0b", "\udcff")]
    code = ("import json,sys; from sfive_ngxlua.model import fold_hash; "
            "print(json.dumps([fold_hash(tuple(k)) for k in json.load(sys.stdin)]))")
    there = subprocess.run([sys.executable, "-c", code], input=json.dumps(keys), text=True,
                           capture_output=True, check=True, env={"PYTHONHASHSEED": "123"})
    assert json.loads(there.stdout) == [fold_hash(k) for k in keys]
    assert all(-2**63 <= fold_hash(k) < 2**63 for k in keys)
    assert len({fold_hash(k) for k in keys}) == len(keys)
    assert fold_hash(("a", "bc")) != fold_hash(("ab", "c"))


def test_snapshot_is_json_and_restores_the_same_model():
    m = model(start=T0, max_clients=2)
    for n in range(5):
        m.add(rec(T0 + 1, client=f"c{n}", sent=n + 1))
    m.add(rec(T0 + 12, streamer=B, client="x", sent=9))
    snap = json.loads(json.dumps(m.snapshot()))
    assert snap["format"] == 1 and snap["duration"] == 10
    assert snap["streamers"] == [list(A), list(B)]
    assert (snap["first"], snap["reported"], snap["live"]) == (m.first, m.reported, True)
    assert set(snap["open"]) == {str(T0 // 10), str(T0 // 10 + 1)}
    assert len(snap["open"][str(T0 // 10)]["0"]["folded"]) == 3

    r = IntervalModel.restore(m_settings(m), Stats(), snap)
    assert r.take_changes().clients == []
    r.add(rec(T0 + 2, client="c4", sent=100))  # already folded: counted once
    r.add(rec(T0 + 2, client="new", sent=1))
    m.add(rec(T0 + 2, client="c4", sent=100))
    m.add(rec(T0 + 2, client="new", sent=1))
    for a, b in zip(m.close_due(T0 + 30), r.close_due(T0 + 30)):
        assert (a.start, a.duration_ms) == (b.start, b.duration_ms)
        assert totals(a) == totals(b)
        assert {s: c.bytes for s, c in a.streams.items()} == {
            s: c.bytes for s, c in b.streams.items()}
    assert totals(b)[B] == (1, 9) and b.start == T0 + 10


def m_settings(m, **kw):
    kw.setdefault("duration", m.duration)
    kw.setdefault("streamers", m.streamers)
    return Settings(hostname="h", max_clients=m._cap, **kw)


@pytest.mark.parametrize("change, words", [
    ({"duration": 15}, ["15s", "10s"]),
    ({"streamers": (A,)}, ["av/hls/high, av/dash/low", "settings av/hls/high"]),
    ({"streamers": (B, A)}, ["streamers"]),
])
def test_a_snapshot_made_under_other_settings_is_refused_saying_what_differs(change, words):
    m = model(start=T0)
    m.add(rec(T0 + 1))
    with pytest.raises(StateMismatch) as e:
        IntervalModel.restore(m_settings(m, **change), Stats(), m.snapshot())
    for word in words:
        assert word in str(e.value)


@pytest.mark.parametrize("snap, words", [
    ({"format": 2}, ["format 2", "format 1"]),
    ([], ["not a snapshot"]),
    ({"format": 1, "duration": 10, "streamers": [list(A), list(B)], "first": 1}, ["malformed"]),
])
def test_a_snapshot_of_another_format_or_malformed_is_refused(snap, words):
    with pytest.raises(StateMismatch) as e:
        IntervalModel.restore(m_settings(model()), Stats(), snap)
    for word in words:
        assert word in str(e.value)


def test_changes_are_incremental_and_rebuild_the_model():
    m = model(start=T0, max_clients=2)
    replica: dict = {}
    m.add(rec(T0 + 1, client="a", sent=1))
    m.add(rec(T0 + 1, client="b", sent=2))
    c = m.take_changes()
    assert sorted(c.clients) == [(T0 // 10, 0, "a", "ua", 1), (T0 // 10, 0, "b", "ua", 2)]
    assert (c.first, c.reported, c.live, c.folded, c.dropped) == (
        m.first, m.reported, True, [], [])
    apply(replica, c)
    assert m.take_changes().clients == []

    m.add(rec(T0 + 1, client="a", sent=10))  # changed: bytes now
    m.add(rec(T0 + 1, client="c", sent=5))  # folded
    m.add(rec(T0 + 1, client="c", sent=5))  # same fold hash, not inserted twice
    m.add(rec(T0 + 11, streamer=B, client="z"))
    c = m.take_changes()
    k = T0 // 10
    assert sorted(c.clients) == sorted([(k, 0, "a", "ua", 11), (k, 0, *OVERFLOW_CLIENT, 10),
                                        (k + 1, 1, "z", "ua", 100)])
    assert c.folded == [(k, 0, fold_hash(("c", "ua")))]
    apply(replica, c)
    assert replica == as_replica(m)

    [i] = m.close_due(T0 + 11)
    c = m.take_changes()
    assert (c.dropped, c.clients, c.reported) == ([k], [], k)
    apply(replica, c)
    assert replica == as_replica(m)

    r = IntervalModel.restore(m_settings(m), Stats(), m.snapshot())
    m.add(rec(T0 + 25, client="q"))
    m.add(rec(T0 + 35, client="w"))
    out = m.close_all(T0 + 22)  # later intervals merge into the running one
    c = m.take_changes()
    assert sorted(c.dropped) == [k + 1, k + 2, k + 3] and c.clients == []
    assert len(out) == 2 and r.take_changes().clients == []


def test_a_merge_on_stop_moves_every_client_to_the_running_interval():
    m = model(start=T0)
    m.add(rec(T0 + 1, client="a"))
    m.add(rec(T0 + 31, client="b"))
    m.take_changes()
    k = T0 // 10
    # the stop at T0 + 5 merges interval k+3 into k and closes k: everything is dropped
    [closed] = m.close_all(T0 + 5)
    assert closed.start == k * 10 and sorted(closed.streams[A].bytes) == [("a", "ua"),
                                                                          ("b", "ua")]
    assert sorted(m.take_changes().dropped) == [k, k + 3]


def test_dirty_tracking_costs_one_set_entry_per_changed_client():
    m = model(start=T0)
    m.take_changes()
    for n in range(1000):
        m.add(rec(T0 + 1, client=f"c{n % 10}"))
    [streams] = m._open.values()
    assert len(streams[A].changed) == 10
    assert len(m.take_changes().clients) == 10
    assert not streams[A].changed


def test_an_untracked_model_hands_out_everything_at_the_first_take_changes():
    m = model(start=T0, max_clients=1)
    assert not m._tracking  # replay and a stateless service: no tracking
    m.add(rec(T0 + 1, client="a", sent=3))
    m.add(rec(T0 + 1, client="a", sent=4))
    m.add(rec(T0 + 1, client="b", sent=5))
    c = m.take_changes()
    k = T0 // 10
    assert sorted(c.clients) == sorted([(k, 0, "a", "ua", 7), (k, 0, *OVERFLOW_CLIENT, 5)])
    assert c.folded == [(k, 0, fold_hash(("b", "ua")))]
    assert m._tracking
    assert "add" not in vars(m), "one add, never swapped on the instance"
    m.add(rec(T0 + 1, client="a", sent=1))
    assert m.take_changes().clients == [(k, 0, "a", "ua", 8)]
