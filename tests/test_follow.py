"""The access-log follower on a temporary directory with a fake clock (polling, no inotify, but
for the tests that say so): appends cut anywhere, rotations while behind, copytruncate,
deletion, absence, resume, the watermark."""

from __future__ import annotations

import math
import os
import random
import shutil
import subprocess

import pytest
import pytest_twisted
from helpers.faults import iso
from support import line, wait_for
from twisted.internet import task

from sfive_ngxlua import follow
from sfive_ngxlua.follow import FileFollowService
from sfive_ngxlua.model import IntervalModel
from sfive_ngxlua.pipeline import Pipeline
from sfive_ngxlua.settings import Settings
from sfive_ngxlua.stats import Stats

pytest_plugins = ("helpers.fixtures",)

URL = "/live/hls/foo-high/1.ts"


def entry(n: int, second: int = 0) -> bytes:
    """A distinct access-log line (the client tells which one it is)."""
    return line(f"2026-11-27T20:00:{second:02d}Z", url=URL, client=f"10.0.{n // 250}.{n % 250}")


class Follower:
    """A FileFollowService on a Clock, recording every complete line the pipeline gets."""

    def __init__(self, path, flush=1.0, position=None, on_watermark=None, start=True):
        self.settings = Settings(streamers=(("foo", "hls", "high"),), file=str(path),
                                 flush_period=flush)
        self.clock = task.Clock()
        self.clock.advance(1_800_000_000)
        self.stats = Stats()
        self.model = IntervalModel(self.settings, self.stats)
        self.pipeline = Pipeline(self.settings, self.stats, self.model)
        self.lines: list[bytes] = []
        feed = self.pipeline.feed_split

        def record(splitter, data, skip=0):
            lines = feed(splitter, data, skip)
            self.lines.extend(lines[skip:])
            return lines

        self.pipeline.feed_split = record
        self.losses: list = []
        """Every loss the follower announced (Pipeline.lose), as (since, until)."""
        lose = self.pipeline.lose

        def announce(since, until):
            self.losses.append((since, until))
            lose(since, until)

        self.pipeline.lose = announce
        self.service = FileFollowService(self.settings, None, self.pipeline, self.stats,
                                         clock=self.clock, inotify=False,
                                         on_watermark=on_watermark)
        if position is not None:
            self.service.resume(position)
        if start:
            self.start()

    def start(self) -> None:
        self.service.startService()
        self.clock.advance(0)  # the first look comes on the next turn of the reactor

    def clients(self) -> list[str]:
        return [ln.split(b'"client":"')[1].split(b'"')[0].decode() for ln in self.lines]

    def tick(self, seconds: float = follow.POLL_WITHOUT_INOTIFY) -> None:
        self.clock.advance(seconds)


def ips(numbers) -> list[str]:
    return [f"10.0.{n // 250}.{n % 250}" for n in numbers]


def append(path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


@pytest.fixture
def log(tmp_path):
    return tmp_path / "sfive.log"


def test_appends_cut_anywhere_give_every_line_once_and_never_half(log):
    log.write_bytes(b"")
    f = Follower(log)
    data = b"".join(entry(n) for n in range(200))
    rng = random.Random(7)
    cuts = sorted(rng.sample(range(1, len(data)), 150))
    for a, b in zip([0] + cuts, cuts + [len(data)]):
        append(log, data[a:b])
        f.tick()
    assert f.clients() == ips(range(200))
    assert f.stats.rejected == {} and f.stats.accepted == 200
    assert f.service.position()["file"]["offset"] == len(data)


def test_a_start_without_position_begins_after_the_last_complete_line(log):
    log.write_bytes(entry(0) + entry(1) + entry(2)[:20])
    f = Follower(log)
    assert f.lines == []
    append(log, entry(2)[20:] + entry(3))
    f.tick()
    assert f.clients() == ips([2, 3])


def test_absent_at_start_then_created_is_read_from_its_start(log):
    f = Follower(log)
    f.tick()
    assert f.service.current is None
    # issue 17 item 4: a missing log vouches for nothing (its intervals are withheld)
    assert f.service.watermark(f.clock.seconds()) == -math.inf
    log.write_bytes(entry(0) + entry(1))
    f.tick()
    assert f.clients() == ips([0, 1])
    assert f.service.watermark(f.clock.seconds()) > -math.inf


def test_rename_and_create_reads_the_old_file_until_quiet_and_the_new_one(log):
    log.write_bytes(b"")
    f = Follower(log, flush=1.0)
    append(log, entry(0) + entry(1))
    f.tick()
    os.rename(log, str(log) + ".1")
    f.tick()
    assert f.stats.file_rotations == 1 and len(f.service.rotated) == 1
    # nginx reopens: the new file gets lines while a worker still writes the old one
    log.write_bytes(entry(10))
    append(str(log) + ".1", entry(2))
    f.tick()
    f.tick(1.5)  # the old file keeps being read while it is written within the flush period
    append(str(log) + ".1", entry(3)[:30])
    f.tick()
    append(str(log) + ".1", entry(3)[30:])
    append(log, entry(11))
    f.tick()
    assert sorted(f.clients()) == sorted(ips([0, 1, 2, 3, 10, 11]))
    assert len(f.service.rotated) == 1
    f.tick(follow.ROTATED_SLACK + 1.0 + 0.1)  # quiet for longer than flush + slack: let go
    assert f.service.rotated == []
    append(str(log) + ".1", entry(4))  # nothing writes there any more; it is not read
    append(log, entry(12))
    f.tick()
    assert sorted(f.clients()) == sorted(ips([0, 1, 2, 3, 10, 11, 12]))
    assert len(f.lines) == len(set(f.lines))


def test_rotation_while_behind_loses_nothing(log):
    """Between two looks: lines appended, renamed, the old file written again, a new file."""
    log.write_bytes(entry(0))
    f = Follower(log)
    append(log, entry(1))
    f.tick()
    append(log, entry(2) + entry(3)[:10])
    os.rename(log, str(log) + ".1")
    append(str(log) + ".1", entry(3)[10:] + entry(4))
    log.write_bytes(entry(20) + entry(21))
    f.tick()
    assert f.clients() == ips([1, 2, 3, 4, 20, 21])  # the old file's older lines first


def test_two_rotations_while_behind(log):
    """The old file renamed twice (sfive.log.1 -> .2) while the follower was not looking."""
    log.write_bytes(b"")
    f = Follower(log)
    append(log, entry(0))
    f.tick()
    append(log, entry(1))
    os.rename(log, str(log) + ".1")
    os.rename(str(log) + ".1", str(log) + ".2")
    log.write_bytes(entry(5))
    f.tick()
    assert f.clients() == ips([0, 1, 5])


def test_copytruncate_is_detected_counted_and_the_copy_read(log, tmp_path):
    log.write_bytes(b"")
    f = Follower(log)
    append(log, entry(0) + entry(1))
    f.tick()
    append(log, entry(2) + entry(3)[:25])  # not read yet when logrotate copies
    shutil.copyfile(log, str(log) + ".1")
    append(log, entry(3)[25:] + entry(99))  # the window: written after the copy, truncated away
    os.truncate(log, 0)
    append(log, entry(4) + entry(5))
    f.tick()
    assert f.stats.file_truncations == 1
    assert f.clients() == ips([0, 1, 2, 4, 5])  # 3 was cut by the copy, 99 lost in the window
    assert f.stats.rejected == {}
    f.tick(3)
    append(log, entry(6))
    f.tick()
    assert f.clients()[-1] == ips([6])[0]


def test_truncated_and_regrown_past_the_offset_is_still_noticed(log):
    log.write_bytes(b"")
    f = Follower(log)
    append(log, entry(0) + entry(1))
    f.tick()
    os.truncate(log, 0)
    append(log, entry(7) + entry(8) + entry(9))  # longer than before: only the head tells
    f.tick()
    assert f.stats.file_truncations == 1
    assert f.clients() == ips([0, 1, 7, 8, 9])


def test_deleted_and_created_again(log):
    log.write_bytes(b"")
    f = Follower(log)
    append(log, entry(0))
    f.tick()
    os.unlink(log)
    f.tick()
    assert f.service.current is None
    log.write_bytes(entry(1))
    f.tick()
    f.tick(3)
    assert f.clients() == ips([0, 1])
    assert f.service.rotated == []


def stopped_after(log, data: bytes) -> dict:
    """The position of a follower that read ``data`` appended to an empty ``log``, then
    stopped."""
    log.write_bytes(b"")
    f = Follower(log)
    append(log, data)
    f.tick()
    position = f.service.position()
    f.service.stopService()
    return position


def test_position_and_resume_continue_after_the_last_complete_line(log):
    log.write_bytes(b"")
    f = Follower(log)
    append(log, entry(0) + entry(1) + entry(2)[:15])
    f.tick()
    position = f.service.position()
    assert position["kind"] == "file" and position["path"] == str(log)
    st = os.stat(log)
    assert (position["file"]["dev"], position["file"]["ino"]) == (st.st_dev, st.st_ino)
    assert position["file"]["offset"] == len(entry(0) + entry(1))
    f.service.stopService()
    assert f.service.position() == position
    append(log, entry(2)[15:] + entry(3))
    g = Follower(log, position=position)
    assert g.clients() == ips([2, 3])


def test_a_position_that_is_not_this_files_is_refused_before_the_start(log):
    """ValueError (the service then logs it and starts at the file's end), as the fetcher does
    for a position that is not an exporter's."""
    log.write_bytes(entry(0))
    f = Follower(log, start=False)
    for position in ({"kind": "exporter", "ring": None, "seq": 3}, ["file", str(log)],
                     {"kind": "file", "path": str(log) + ".other", "file": None}):
        with pytest.raises(ValueError):
            f.service.resume(position)
    f.start()
    append(log, entry(1))
    f.tick()
    assert f.clients() == ips([1])


def test_a_negative_saved_offset_reads_the_file_from_its_start(log):
    log.write_bytes(entry(0))
    f = Follower(log)
    position = f.service.position()
    f.service.stopService()
    position["file"]["offset"] = -5
    append(log, entry(1))
    g = Follower(log, position=position)
    assert g.clients() == ips([0, 1]) and g.stats.file_truncations == 1


def test_resume_after_a_rotation_while_down(log):
    position = stopped_after(log, entry(0))
    append(log, entry(1))
    os.rename(log, str(log) + ".1")
    log.write_bytes(entry(2))
    g = Follower(log, position=position)
    assert g.clients() == ips([1, 2])
    g.tick(3)
    assert g.service.rotated == []
    assert g.service.position()["rotated"] == []


def test_resume_with_a_rotated_file_in_the_position(log):
    log.write_bytes(b"")
    f = Follower(log)
    append(log, entry(0))
    f.tick()
    os.rename(log, str(log) + ".1")
    log.write_bytes(entry(10))
    f.tick()
    position = f.service.position()
    assert len(position["rotated"]) == 1
    f.service.stopService()
    append(str(log) + ".1", entry(1))  # a worker's last buffer reached the old file
    append(log, entry(11))
    g = Follower(log, position=position)
    assert g.clients() == ips([1, 11])


def test_a_file_that_is_not_the_saved_one_is_read_from_its_start(log):
    """Same path, but the saved head does not match (the inode was reused, or the file was
    rewritten): the saved position does not apply."""
    position = stopped_after(log, entry(0) + entry(1))
    position["file"]["head"] = "0" * 16
    g = Follower(log, position=position)
    assert g.clients() == ips([0, 1])


def test_watermark_while_caught_up_and_while_reading_a_backlog(log, monkeypatch):
    monkeypatch.setattr(follow, "BUDGET", 4096)
    monkeypatch.setattr(follow, "CHUNK", 1024)
    log.write_bytes(b"")
    f = Follower(log, flush=1.0, start=False)
    assert f.service.watermark(f.clock.seconds()) == -math.inf
    f.start()
    now = f.clock.seconds()
    assert f.service.watermark(now) == now - 1.0
    f.tick(5)
    assert f.service.watermark(f.clock.seconds()) == f.clock.seconds() - 1.0
    position = f.service.position()
    f.service.stopService()
    # the service was down for an hour: a backlog, read a budget per turn of the reactor
    base = 1_800_000_000 - 3600
    append(log, b"".join(
        line(iso(base + n // 20), url=URL, client=f"10.1.0.{n % 200}") for n in range(400)))
    calls = []
    g = Follower(log, flush=1.0, position=position, on_watermark=lambda: calls.append(1),
                 start=False)
    g.service.startService()
    g.service.check()  # one turn of the reactor: one budget's worth
    assert g.service._caught_up is False and calls
    mark = g.service.watermark(g.clock.seconds())
    assert base - 1 <= mark < base + 20 - 1  # the last line read so far, minus the flush period
    g.service.check()
    assert g.service.watermark(g.clock.seconds()) > mark
    while not g.service._caught_up:
        g.clock.advance(0)
    assert len(g.lines) == 400
    assert g.service.watermark(g.clock.seconds()) == g.clock.seconds() - 1.0


def test_bytes_not_read_yet_hold_the_watermark_at_the_start_of_the_last_read(log):
    """Asked between two looks (a stalled reactor: the next poll or inotify event not handled
    yet), the watermark goes only as far as what was read: ``now`` if nothing waits, else the
    time the last read to the end began; the same for a rotation or a truncation not seen."""
    log.write_bytes(b"")
    f = Follower(log, flush=1.0)
    read_at = f.clock.seconds()
    append(log, entry(0))
    assert f.service.watermark(read_at + 5) == read_at - 1.0, "a line waits for its read"
    f.tick()
    now = f.clock.seconds()
    assert f.clients() == ips([0]) and f.service.watermark(now) == now - 1.0
    os.rename(log, f"{log}.1")
    log.write_bytes(b"")  # renamed and created, between two looks
    assert f.service.watermark(now + 5) == now - 1.0, "the path names a file not read yet"
    f.tick()
    now = f.clock.seconds()
    assert f.service.watermark(now) == now - 1.0
    append(f"{log}.1", entry(1))  # a worker's last buffer reaches the renamed file
    assert f.service.watermark(now + 5) == now - 1.0
    f.tick()
    now = f.clock.seconds()
    assert f.clients() == ips([0, 1]) and f.service.watermark(now + 5) == now + 4.0, \
        "a quiet log holds nothing back"


@pytest_twisted.ensureDeferred
async def test_a_stall_longer_than_the_grace_holds_the_interval_until_the_file_is_read(
        tmp_path, monkeypatch):
    """The reactor runs its timers before its I/O: after a stall, the reporter's tick comes
    before the inotify event of a line written meanwhile. The interval waits for that read and
    counts the line in its own interval (inotify on the real reactor, the timers on a
    task.Clock; the poll is an hour here, so only inotify reads)."""
    from helpers.faults import T0, Running, settings

    from sfive_ngxlua.datasets import start_time

    monkeypatch.setattr(follow, "POLL_WITH_INOTIFY", 3600.0)
    log = tmp_path / "sfive.log"
    log.write_bytes(b"")
    run = Running(settings(file=str(log), flush_period=1.0)).start()
    try:
        assert run.fetch._notify is not None, "inotify is what this test is about"
        run.clock.advance(0)  # the first look
        run.clock.advance(9)
        append(log, line(iso(T0 + 9), url=URL, sent=700))
        run.clock.advance(3.5)  # the stall: past the interval's end plus grace plus flush
        assert run.datasets == [], "reported before the line in the file was read"
        assert run.stats.held == 1

        def read() -> bool:
            run.clock.advance(0)  # the follower's look, asked for by the inotify event
            return run.stats.lines == 1

        await wait_for(read, timeout=10, what="the inotify event and its read")
        first = [d for d in run.datasets if d["streamer-id"] == {
            "content-id": "foo", "format": "hls", "quality": "high"}]
        assert [d["start-time"] for d in first] == [start_time(T0)]
        assert first[0]["data"]["bytes-sent"] == 700
        assert run.stats.late == 0 and run.stats.intervals_covered == 1
    finally:
        await run.stop()


def test_a_future_time_does_not_move_the_watermark(log, monkeypatch):
    monkeypatch.setattr(follow, "BUDGET", 1)
    log.write_bytes(b"")
    f = Follower(log)
    append(log, line(iso(2_000_000_000), url=URL))
    f.service.check()
    assert f.service.watermark(f.clock.seconds()) < f.clock.seconds()


def test_stop_parses_no_partial_line_and_restarts_from_the_position(log):
    log.write_bytes(b"")
    f = Follower(log)
    append(log, entry(0) + entry(1)[:10])
    f.tick()
    f.service.stopService()
    assert f.clients() == ips([0])
    append(log, entry(1)[10:])
    f.start()
    assert f.clients() == ips([0, 1])


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_log_is_a_warning_not_a_traceback(log):
    log.write_bytes(entry(0))
    log.chmod(0)
    f = Follower(log)
    f.tick()
    assert f.service.current is None
    log.chmod(0o644)
    f.tick()
    assert f.service.current is not None


@pytest_twisted.inlineCallbacks
def test_inotify_on_the_real_reactor_sees_appends_and_a_rename(log, monkeypatch):
    """With inotify the follower reads on the directory's events (the poll is an hour here)."""
    from twisted.internet import reactor

    monkeypatch.setattr(follow, "POLL_WITH_INOTIFY", 3600.0)
    log.write_bytes(b"")
    settings = Settings(streamers=(("foo", "hls", "high"),), file=str(log))
    stats = Stats()
    pipeline = Pipeline(settings, stats, IntervalModel(settings, stats, start=None))
    service = FileFollowService(settings, reactor, pipeline, stats, inotify=True)
    service.startService()
    try:
        assert service._notify is not None
        append(log, entry(0))
        yield wait_for(lambda: stats.lines == 1, timeout=10, what="the append")
        os.rename(log, str(log) + ".1")
        log.write_bytes(entry(1))
        append(str(log) + ".1", entry(2))
        yield wait_for(lambda: stats.lines == 3, timeout=10, what="both files read")
        assert stats.file_rotations == 1
        from twisted.internet import inotify
        from twisted.python.filepath import FilePath

        yield wait_for(lambda: service._soon is None, what="the follower idle")
        other = FilePath(os.fsencode(log.parent / "other.log"))
        service._changed(None, other, inotify.IN_MODIFY)  # another log written per request
        assert service._soon is None
        service._changed(None, other, inotify.IN_MOVED_FROM)  # a rename may concern us
        assert service._soon is not None
        yield wait_for(lambda: service._soon is None, what="the follower idle")
        service._changed(None, FilePath(os.fsencode(str(log) + ".1")), inotify.IN_MODIFY)
        assert service._soon is not None
    finally:
        service.stopService()


def test_invalid_utf8_counts_as_the_exporter_would_write_it(log):
    """nginx's escape=json passes invalid bytes through; the exporter writes U+FFFD for each
    invalid byte: the follower reads the line as the exporter would have written it."""
    log.write_bytes(b"")
    f = Follower(log)
    raw = line("2026-11-27T20:00:00Z", url=URL, ua="ua@/1").replace(b"@", b"\xff\xe2\x82")
    append(log, raw)
    f.tick()
    assert f.stats.accepted == 1 and f.stats.rejected == {}
    (clients,) = [c for streams in f.model._open.values() for c in streams.values()]
    assert list(clients.bytes) == [("10.0.0.1", "ua\ufffd\ufffd\ufffd/1")]


def test_file_options(tmp_path, monkeypatch):
    from twisted.python import usage

    from sfive_ngxlua.service import make_source
    from sfive_ngxlua.settings import Options

    monkeypatch.chdir(tmp_path)
    options = Options()
    options.parseOptions(["-S", "a/hls/high", "--file", "logs/sfive.log", "--flush-period", "2"])
    settings = options.settings()
    assert settings.file == str(tmp_path / "logs" / "sfive.log") and settings.flush_period == 2
    stats = Stats()
    source = make_source(settings, None, Pipeline(settings, stats, IntervalModel(settings, stats)),
                         stats, task.Clock())
    assert isinstance(source, FileFollowService)
    for args, message in ((["--file", "x.log", "-u", "http://h/sfive"], "either --url or --file"),
                          (["--file", "x.log", "--flush-period", "-1"], "non-negative"),
                          (["--file", ""], "must name a file")):
        with pytest.raises(usage.UsageError, match=message):
            Options().parseOptions(["-S", "a/hls/high", *args])


def test_rotations_and_truncations_are_metrics_with_file(log):
    from sfive_ngxlua.metrics import StatsCollector

    f = Follower(log)
    f.stats.file_rotations, f.stats.file_truncations = 2, 1
    names = {m.name: m.samples[0].value for m in StatsCollector(f.settings, f.stats).collect()
             if m.name.startswith("sfive_ngxlua_file_")}
    assert names == {"sfive_ngxlua_file_rotations": 2, "sfive_ngxlua_file_truncations": 1}
    exporter = Settings(streamers=f.settings.streamers)
    assert not [m for m in StatsCollector(exporter, f.stats).collect()
                if m.name.startswith("sfive_ngxlua_file_")]


def test_a_malformed_position_is_a_warning_not_a_traceback(log):
    log.write_bytes(entry(0))
    g = Follower(log, position={"kind": "file", "path": str(log), "file": "garbage",
                                "rotated": [{"dev": "x", "ino": [], "offset": "?"}, 3]})
    assert g.service.running and g.service.current is not None
    append(log, entry(1))
    g.tick()
    assert g.clients() == ips([0, 1])  # the file at the path, from its start


def test_resume_after_a_copytruncate_while_down_reads_the_copy(log):
    position = stopped_after(log, entry(0))
    append(log, entry(1))
    shutil.copyfile(log, str(log) + ".1")
    os.truncate(log, 0)
    append(log, entry(2))
    g = Follower(log, position=position)
    assert g.clients() == ips([1, 2])
    assert g.stats.file_truncations == 1


@pytest.mark.parametrize("point", ["poll", "stat", "read", "model-add"])
def test_an_unexpected_error_is_logged_once_counted_and_retried_without_loss(
        log, monkeypatch, point):
    """An error nobody expected, at each point of a look: counted in ``errors["follow"]``, its
    traceback logged once, the follower ``retrying`` (polls wait for the retry, the loop keeps
    running), then every line read exactly once, from the first one not folded into the model.
    """
    from twisted.logger import globalLogPublisher

    events: list = []
    globalLogPublisher.addObserver(events.append)
    try:
        log.write_bytes(b"")
        f = Follower(log)
        assert f.stats.states["follow"] == "following"
        folded: list = []
        add_records = f.model.add_records

        def counted_add(records, due=math.inf):  # the model's one add path
            def each():
                for record in records:
                    if point == "model-add" and record[2] == ips([2])[0] and not injected:
                        once("the model's add")
                    folded.append(record[2])
                    yield record
            return add_records(each(), due)

        monkeypatch.setattr(f.model, "add_records", counted_add)
        injected: list = []

        def once(what):
            if not injected:
                injected.append(what)
                raise (OSError(5, "stray I/O error") if what == "read" else
                       RuntimeError(f"injected into {what}"))

        def failing(real, what):
            def call(*args, **kw):
                once(what)
                return real(*args, **kw)
            return call

        if point == "poll":
            monkeypatch.setattr(f.service, "_retire_quiet",
                                failing(f.service._retire_quiet, "poll"))
        elif point == "stat":
            monkeypatch.setattr(follow.os, "stat", failing(os.stat, "stat"))
        elif point == "read":  # the open file's head, re-read at every look
            monkeypatch.setattr(follow._File, "head_matches",
                                failing(follow._File.head_matches, "read"))
        append(log, b"".join(entry(n) for n in range(5)))
        f.tick()
        assert injected and f.stats.errors["follow"] == 1
        assert f.stats.states["follow"] == "retrying"
        failures = [e for e in events if "log_failure" in e and e.get("component") == "follow"]
        assert len(failures) == 1, "the traceback, once"
        before = {"model-add": ips([0, 1]), "poll": ips(range(5))}.get(point, [])
        assert folded == before, "what was folded before the error (the poll's is after reading)"
        for _ in range(3):  # polls before the retry's backoff do not look
            f.tick()
        assert f.stats.errors["follow"] == 1 and folded == before
        assert f.service._poll.running, "the poll loop is still running"

        f.tick(2.0)  # past the first retry's backoff (1 s and up to 1 s of jitter)
        assert folded == ips(range(5)), "each line folded once"
        assert f.stats.accepted == f.stats.lines == 5 and not f.stats.rejected
        assert f.stats.states["follow"] == "following" and f.stats.source_connected
        assert f.service.position()["file"]["offset"] == log.stat().st_size
        append(log, entry(5))
        f.tick()
        assert folded == ips(range(6)) and f.stats.errors["follow"] == 1
    finally:
        globalLogPublisher.removeObserver(events.append)


def test_resume_after_logrotates_numbered_rotations_while_down_reads_each_file_once(log):
    """sfive.log.1 -> .2 -> .3 while the service is down: the file in between is read from its
    start, the saved one from its offset, the ones done with before the stop not again."""
    log.write_bytes(b"")
    f = Follower(log)
    append(log, entry(0))
    f.tick()
    os.rename(log, f"{log}.1")
    log.write_bytes(entry(1))
    f.tick()
    f.tick(3)  # done with sfive.log.1
    assert f.service.rotated == []
    position = f.service.position()
    assert [e["ino"] for e in position["seen"]] == [os.stat(f"{log}.1").st_ino]
    f.service.stopService()
    append(log, entry(2))
    for new in (3, 4):  # two rotations while down
        for n in (2, 1):
            if os.path.exists(f"{log}.{n}"):
                os.rename(f"{log}.{n}", f"{log}.{n + 1}")
        os.rename(log, f"{log}.1")
        log.write_bytes(entry(new))
    g = Follower(log, position=position)
    g.tick(3)
    assert g.clients() == ips([2, 3, 4])
    assert g.stats.file_truncations == 0


def test_a_position_of_the_previous_release_still_resumes(log):
    """Saved without ``seen``: the saved files are resumed as before."""
    position = stopped_after(log, entry(0))
    del position["seen"]
    append(log, entry(1))
    os.rename(log, f"{log}.1")
    log.write_bytes(entry(2))
    g = Follower(log, position=position)
    assert g.clients() == ips([1, 2])


def test_a_copy_without_truncation_of_a_file_saved_without_a_line_is_not_read_twice(log):
    """logrotate's ``copy``: the file at the path still holds what the copy does."""
    position = stopped_after(log, b"")
    append(log, entry(0) + entry(1))
    shutil.copyfile(log, f"{log}.1")
    g = Follower(log, position=position)
    g.tick(3)
    assert g.clients() == ips([0, 1]) and g.stats.file_truncations == 0


def test_a_copytruncate_while_down_of_a_file_saved_without_a_line_reads_the_copy(log):
    position = stopped_after(log, entry(0)[:10])  # a partial line: no head yet
    assert position["file"]["head_len"] == 0
    append(log, entry(0)[10:] + entry(1))
    shutil.copyfile(log, f"{log}.1")
    os.truncate(log, 0)
    append(log, entry(2))
    g = Follower(log, position=position)
    g.tick(3)
    assert g.clients() == ips([0, 1, 2])
    assert g.stats.file_truncations == 1  # the window between the copy and the truncation
    assert g.service.position()["rotated"] == []


COMPRESS = {"gzip": ([], ".gz"), "bzip2": ([], ".bz2"), "xz": ([], ".xz"),
            "zstd": (["--rm", "-q"], ".zst")}


def logrotate(log, first: bytes = b"", delaycompress: bool = False, cmd: str = "gzip") -> None:
    """One rotation as logrotate does it with ``compress`` (``compresscmd cmd``), with or
    without ``delaycompress``: the numbered files shifted, the log renamed to .1 and created
    again (holding ``first``: what nginx writes after USR1), then .1 (delayed: .2) compressed
    by the real ``cmd``, which removes it."""
    exts = ("", *(ext for _, ext in COMPRESS.values()))
    for n in range(9, 0, -1):
        for ext in exts:
            if os.path.exists(f"{log}.{n}{ext}"):
                os.rename(f"{log}.{n}{ext}", f"{log}.{n + 1}{ext}")
    os.rename(log, f"{log}.1")
    log.write_bytes(first)
    plain = f"{log}.{2 if delaycompress else 1}"
    if os.path.exists(plain):
        subprocess.run([cmd, *COMPRESS[cmd][0], plain], check=True)


def test_a_rotation_compressed_while_down_is_read_on_from_the_saved_offset(log):
    """compress without delaycompress: the saved file is renamed, then gzipped (a new inode,
    the old one removed) while the service is down; its rest is read from the .gz."""
    position = stopped_after(log, entry(0))
    append(log, entry(1))
    logrotate(log, entry(2))
    assert not os.path.exists(f"{log}.1") and os.path.exists(f"{log}.1.gz")
    g = Follower(log, position=position)
    g.tick(3)
    assert g.clients() == ips([1, 2])
    assert g.losses == [] and g.stats.file_truncations == 0
    assert g.service.rotated == [], "a compressed file is let go at its end"


@pytest.mark.parametrize("cmd", ["gzip", "bzip2", "xz"])
def test_compressed_rotations_while_down_and_a_stop_in_one_lose_and_repeat_nothing(
        log, monkeypatch, cmd):
    """Two rotations while down, each compressed: the saved file's rest (reached a budget at a
    time), then the file in between from its start, then the new one; a stop in the middle of
    a compressed file resumes in it."""
    if shutil.which(cmd) is None:
        pytest.skip(f"no {cmd} here")
    monkeypatch.setattr(follow, "CHUNK", 256)
    monkeypatch.setattr(follow, "BUDGET", 512)
    position = stopped_after(log, b"".join(entry(n) for n in range(10)))
    append(log, b"".join(entry(n) for n in range(10, 20)))
    # held open meanwhile, so that the new log cannot take the saved file's inode number (a
    # reused number at the path reads as a copytruncate, whose announced loss is not this test's)
    held = os.open(log, os.O_RDONLY)
    logrotate(log, b"".join(entry(n) for n in range(20, 30)), cmd=cmd)
    logrotate(log, entry(30), cmd=cmd)
    os.close(held)
    g = Follower(log, position=position, start=False)
    g.service.startService()
    for _ in range(20):  # turns of the reactor, a budget each
        g.service.check()
        if len(g.clients()) >= 3:
            break
    assert 3 <= len(g.clients()) < 10 and not g.service._caught_up
    middle = g.service.position()
    g.service.stopService()
    h = Follower(log, position=middle)
    for _ in range(50):
        h.clock.advance(0)
    h.tick(3)
    assert h.service._caught_up
    assert g.clients() + h.clients() == ips(range(10, 31))
    assert g.losses == h.losses == [] and not h.stats.rejected
    assert h.service.rotated == []


def test_a_file_read_before_the_stop_and_compressed_since_is_not_read_again(log):
    """delaycompress: sfive.log.1, done with before the stop, becomes sfive.log.2.gz."""
    log.write_bytes(b"")
    f = Follower(log)
    append(log, entry(0))
    f.tick()
    logrotate(log, entry(1), delaycompress=True)
    f.tick()
    f.tick(3)
    assert f.service.rotated == []
    position = f.service.position()
    f.service.stopService()
    append(log, entry(2))
    logrotate(log, entry(3), delaycompress=True)
    assert os.path.exists(f"{log}.2.gz")
    g = Follower(log, position=position)
    g.tick(3)
    assert g.clients() == ips([2, 3]) and g.losses == []


@pytest.mark.skipif(shutil.which("zstd") is None, reason="no zstd here")
def test_a_rotation_compressed_with_zstd_while_down_is_a_loss_said_by_name(log, logs):
    position = stopped_after(log, entry(0))
    append(log, entry(1))
    logrotate(log, entry(2), cmd="zstd")
    g = Follower(log, position=position)
    g.tick(3)
    assert g.clients() == ips([2])
    assert g.losses, "announced: the intervals are partial or withheld"
    assert logs.matching(f"{log}.1.zst came while the service was down, but it cannot be read")
    assert logs.matching("gone from")


def test_a_compressed_rotation_cut_short_is_read_to_the_cut_and_the_rest_said_lost(log, logs):
    position = stopped_after(log, entry(0))
    append(log, b"".join(entry(n) for n in range(1, 3000)))
    logrotate(log, entry(3000))
    gz = f"{log}.1.gz"
    os.truncate(gz, os.path.getsize(gz) // 2)
    g = Follower(log, position=position)
    g.tick(3)
    read = g.clients()
    assert read[-1] == ips([3000])[0] and read[:-1] == ips(range(1, len(read)))
    assert 1 < len(read) < 3000
    assert g.losses and logs.matching(f"{gz} cannot be read on from offset")
    assert g.service.rotated == []


def test_a_rotation_moved_to_another_directory_while_down_is_a_loss_that_says_olddir(
        log, logs):
    position = stopped_after(log, entry(0))
    append(log, entry(1))
    (log.parent / "old").mkdir()
    os.rename(log, log.parent / "old" / "sfive.log.1")
    log.write_bytes(entry(2))
    g = Follower(log, position=position)
    g.tick(3)
    assert g.clients() == ips([2]) and g.losses
    assert logs.matching("logrotate's olddir")


def test_a_seen_inode_with_another_first_line_is_a_new_file(log):
    """An inode number freed (logrotate's oldest file deleted) and taken by a later file: it
    begins otherwise than the file seen then, so it is read."""
    position = stopped_after(log, entry(0))
    os.rename(log, f"{log}.1")
    log.write_bytes(entry(1))
    os.rename(log, f"{log}.2")
    log.write_bytes(entry(2))
    st = os.stat(f"{log}.2")
    position["seen"].append({"dev": st.st_dev, "ino": st.st_ino, "head": "0" * 16,
                             "head_len": 10})
    g = Follower(log, position=position)
    g.tick(3)
    assert g.clients() == ips([1, 2])
