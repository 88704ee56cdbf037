"""A randomized fault test of the whole chain (issue 17): every part real, a random schedule of
faults, some overlapping, and nginx's own access log as the truth, interval by interval, client
by client.

Two chains, each for ``SFIVE_CHAOS_SECONDS`` (default 20) of faults while viewers (a bounded
request loop to 127.0.0.1) go on:

- the exporter: a private nginx with the Lua exporter, a TCP proxy in front of it, the service
  as ``twistd -n sfive-ngxlua --state-dir``, and a unix datagram hub read by the test; faults:
  the service SIGTERMed or SIGKILLed and started again, nginx reloaded or restarted (a new
  ring, on another port), the proxy cutting the stream or refusing for a while, the hub away
  (socket closed, then recreated);
- the access log (``--file``): nginx writing the sfive format with buffer=64k flush=1s;
  faults: logrotate's rename + USR1, copytruncate, service SIGTERMs and SIGKILLs, nginx
  reloads, hub outages.

The seed is printed; ``SFIVE_CHAOS_SEED=123 scripts/test tests/test_chaos.py`` replays one,
``SFIVE_CHAOS_SEEDS=20`` runs twenty random ones (default: two per chain).

The oracle (``judge``), for every full interval from the first to the last with traffic,
with each interval's coverage read from the service's log: a *covered* interval has one
dataset per streamer (a SIGKILL may make one arrive twice, identical) equal to the access log,
client by client, wherever it lies; a *partial* one never invents a record, and a *withheld*
one is logged as such; both only where the schedule explains them (``touched_of``): from the
last moment before an announced loss (an nginx restart: a new ring; a copytruncate) at which
the service had been reading its source undisturbed for a while, to when it noticed the loss.
With --max-delay shorter than the outages (a third of the seeds), every outage (service down,
exporter cut or refused, nginx away) explains partial and withheld intervals too. Nothing
else does: SIGTERMs, SIGKILLs, reloads, cuts, refusals and hub outages keep everything (the
state dir, the ring, the disk queue); an interval nothing explains must be covered and exact.
The lines copytruncate's window lost (in the truth, in no file) lie in explained intervals.
No traceback in the service's log.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pytest
import pytest_twisted
from helpers.chain import (
    SPECS,
    STREAMERS,
    Hub,
    Proxy,
    Service,
    Viewers,
    expected_from,
    lost_lines,
    received,
    start_of,
)
from support import wait_for
from test_access_log_e2e import nginx_logging
from test_follow import Follower, append, entry, ips
from twisted.internet import defer, threads

from lab.nginx import MEDIA_FILES

SECONDS = float(os.environ.get("SFIVE_CHAOS_SECONDS", "20"))


def _seeds() -> list[int]:
    if os.environ.get("SFIVE_CHAOS_SEED"):
        return [int(os.environ["SFIVE_CHAOS_SEED"])]
    return [random.SystemRandom().randrange(1, 1_000_000)
            for _ in range(int(os.environ.get("SFIVE_CHAOS_SEEDS", "2")))]


SEEDS = _seeds()
pytestmark = pytest.mark.timeout(SECONDS + 150)

#: kind -> (weight, longest duration in seconds; 0: a moment)
EXPORTER_FAULTS = {"sigterm": (3, 3.0), "sigkill": (3, 2.0), "reload": (2, 0),
                   "nginx-restart": (1, 0), "cut": (2, 0), "refuse": (2, 4.0), "hub": (2, 4.0)}
FILE_FAULTS = {"sigterm": (3, 3.0), "sigkill": (3, 2.0), "reload": (1, 0), "rotate": (3, 0),
               "copytruncate": (2, 0), "hub": (2, 4.0)}
SERVICE_DOWN = ("sigterm", "sigkill")
BREAKS = ("sigterm", "sigkill", "reload", "nginx-restart", "cut", "refuse")
"""Faults that end the service's exporter stream."""
CAUGHT_UP = 3.0
"""Seconds after a (re)connect by which the service has read the ring's backlog."""
BATCHED = 3.0
"""Seconds a record may take from its request to the service (worker batch, poll, load), and
from a checkpoint to a SIGKILL."""
FLUSHED = 6.0
"""The same for the access log (flush=1s, --grace 2.5: the oldest open interval at a stop)."""


LONG, SHORT = "120", "4"
"""--max-delay: longer than any outage of the schedule (nothing is given up), or shorter than
some (a third of the seeds: intervals are reported partial or withheld, records come late)."""


def variant(seed: int) -> tuple[random.Random, str]:
    """The seed's random numbers and --max-delay."""
    rng = random.Random(seed)
    return rng, rng.choice((LONG, LONG, SHORT))


@dataclass
class Fault:
    at: float  # planned, seconds after the run's start
    kind: str
    duration: float
    began: float = 0.0  # wall-clock times, as it happened
    ended: float = 0.0
    skipped: str = ""

    def __str__(self) -> str:
        took = f" for {self.duration:.1f}s" if self.duration else ""
        return f"{self.at:5.1f}s {self.kind}{took}"


def schedule(rng: random.Random, kinds: dict, seconds: float) -> list[Fault]:
    """Faults about every 2.5 s (exponentially apart, so some overlap), kinds by weight."""
    names = sorted(kinds)
    weights = [kinds[k][0] for k in names]
    faults, t = [], rng.uniform(1.0, 3.0)
    while t < seconds:
        kind = rng.choices(names, weights)[0]
        longest = kinds[kind][1]
        faults.append(Fault(round(t, 2), kind, round(rng.uniform(0.2, longest), 2)
                            if longest else 0.0))
        t += rng.expovariate(1 / 2.5)
    return faults


@dataclass
class Run:
    """One seed's chain, schedule and timeline."""

    seed: int
    nginx: object
    hub: Hub
    service: Service
    proxy: Proxy = None
    log_path: Path = None  # the --file chain's log
    viewers: Viewers = None
    faults: list = field(default_factory=list)
    t0: float = 0.0
    since: int = 0
    rotations: int = 0

    def say(self, text: str) -> None:
        print(f"chaos seed {self.seed} +{time.time() - self.t0:5.1f}s: {text}", flush=True)

    @defer.inlineCallbacks
    def start_service(self):
        """Start the service and wait until it runs (its reporter started), not for the
        exporter: the proxy may be refusing."""
        starts = self.service.log().count("first interval starts at")
        self.service.launch()
        yield wait_for(lambda: self.service.log().count("first interval starts at") > starts
                       or self.service._died(), timeout=30, what="the service to start")

    @defer.inlineCallbacks
    def begin(self, fault: Fault):
        kind = fault.kind
        if kind in SERVICE_DOWN:
            if not self.service.running():
                return "the service is down already"
            yield self.service.stop(signal.SIGTERM if kind == "sigterm" else signal.SIGKILL)
        elif kind == "reload":
            yield threads.deferToThread(self.nginx.reload)
        elif kind == "nginx-restart":
            # not on the reactor: blocked, it would hold a viewer's or the proxy's connection
            # made but its request not yet sent, and nginx waits for such a connection at a
            # graceful stop up to client_header_timeout (60 s; seed 2563 needed TERM)
            yield threads.deferToThread(self.nginx.stop, graceful=True)
            self.nginx.start()
            self.proxy.retarget(self.nginx.port)
            self.viewers.base = self.nginx.url("")
        elif kind == "cut":
            if self.proxy.port is None:
                return "the proxy refuses already"
            for conn in list(self.proxy.open):
                conn.transport.abortConnection()
        elif kind == "refuse":
            if self.proxy.port is None:
                return "the proxy refuses already"
            yield self.proxy.refuse()
        elif kind == "hub":
            if self.hub.hub is None:
                return "the hub is away already"
            self.hub.away()
        elif kind == "rotate":  # logrotate's default: rename, then USR1
            if not self.log_path.exists():
                return "nginx has not reopened its log yet"
            self.rotations += 1
            os.rename(self.log_path, f"{self.log_path}.r{self.rotations}")
            os.kill(self.nginx.process.pid, signal.SIGUSR1)
        elif kind == "copytruncate":
            if not self.log_path.exists():
                return "nginx has not reopened its log yet"
            self.rotations += 1
            shutil.copyfile(self.log_path, f"{self.log_path}.c{self.rotations}")
            os.truncate(self.log_path, 0)
        return ""

    @defer.inlineCallbacks
    def end(self, fault: Fault):
        if fault.kind in SERVICE_DOWN and not self.service.running():
            yield self.start_service()
        elif fault.kind == "refuse" and self.proxy.port is None:
            self.proxy.accept()
        elif fault.kind == "hub" and self.hub.hub is None:
            self.hub.open()

    @defer.inlineCallbacks
    def play(self, faults: list[Fault]):
        """Begin and end each fault at its planned time (or as soon as the one before has
        happened: a start waits for the service), recording when each really happened."""
        events = sorted([(f.at, 0, i) for i, f in enumerate(faults)]
                        + [(f.at + f.duration, 1, i) for i, f in enumerate(faults)])
        for at, is_end, i in events:
            fault = faults[i]
            if fault.skipped:
                continue
            due = self.t0 + at
            yield wait_for(lambda d=due: time.time() >= d, timeout=at + 60,
                           what=f"the schedule's {at:.1f}s")
            if is_end:
                yield self.end(fault)
                fault.ended = time.time()
                if fault.duration:
                    self.say(f"end of {fault.kind}")
            else:
                fault.began = time.time()
                fault.skipped = (yield self.begin(fault)) or ""
                fault.ended = time.time()
                self.say(f"{fault.kind}{f' for {fault.duration:.1f}s' if fault.duration else ''}"
                         + (f" skipped: {fault.skipped}" if fault.skipped else ""))
        self.faults = faults
        end = self.t0 + SECONDS  # viewers go on to the end of the run, faults or not
        yield wait_for(lambda: time.time() >= end, timeout=SECONDS + 60, what="the run's end")


def log_seconds(text: str, fragment: str) -> list[float]:
    """When the service logged a line containing ``fragment`` (its log's seconds, rounded up)."""
    return [datetime.strptime(line.split(" ", 1)[0], "%Y-%m-%dT%H:%M:%S%z").timestamp() + 1
            for line in text.splitlines() if fragment in line]


def touched_of(run: Run, losses: tuple, breaks: tuple, ready: str, back: float) -> set[int]:
    """The intervals a fault of the kinds ``losses`` (an nginx restart: a new ring; a
    copytruncate) may have taken records from, or that the service may call partial for it:
    from the last moment before it at which the service had been reading its source for
    CAUGHT_UP seconds with no fault of the kinds ``breaks`` since (``ready``: the log line of
    a (re)connect or start), minus ``back`` seconds, to the first ``ready`` after the fault
    (when the service notices it) plus a second."""
    happened = [f for f in run.faults if not f.skipped]
    cuts = sorted(f.began for f in happened if f.kind in breaks)
    readies = log_seconds(run.service.log(), ready)
    out: set[int] = set()
    for fault in (f for f in happened if f.kind in losses):
        safe = run.since - back
        for r in readies:
            broken = next((b for b in cuts if b >= r - 1), fault.began)
            until = min(broken, fault.began)
            if r + CAUGHT_UP <= until:
                safe = max(safe, until)
        noticed = max([fault.ended] + [r for r in readies if r >= fault.ended][:1])
        out |= set(range(int(safe - back), int(noticed) + 2))
    return out


COVERAGE = re.compile(r"^\S+ \[[^]]*\] interval (\S+) \(\d+ ms\) reported: .*\bcoverage=(\w+)")
FOR_GOOD = re.compile(r"withheld the intervals from (\S+) to (\S+) for good")
WITHHOLDING = re.compile(r"withholding the intervals from (\S+) on")


def epoch(iso: str) -> int:
    return int(datetime.strptime(iso, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
               .timestamp())


def coverage_of(text: str) -> tuple[dict, set[int]]:
    """From the service's log: interval start -> the coverages it was reported with, and the
    intervals logged as withheld (given up, or withheld from a start on)."""
    reported: dict = defaultdict(set)
    withheld: set[int] = set()
    for line in text.splitlines():
        if (m := COVERAGE.match(line)) is not None:
            reported[epoch(m[1])].add(m[2])
        elif (m := FOR_GOOD.search(line)) is not None:
            withheld |= set(range(epoch(m[1]), epoch(m[2])))
        elif (m := WITHHOLDING.search(line)) is not None:
            withheld.add(epoch(m[1]))
    return reported, withheld


def judge(run: Run, datasets: list, truth: list, touched: set[int]) -> list[str]:
    """Every full interval from the first to the last with traffic, every streamer: covered
    and equal to the truth, client by client; touched ones may instead be partial (nothing
    invented) or withheld, never missing silently. Against a service without coverage (main
    before it): untouched ones equal to the truth, touched ones without invented records."""
    kills = sum(1 for f in run.faults if f.kind == "sigkill" and not f.skipped)
    got = received(datasets, kills)  # at most one identical resend per SIGKILL
    expected = expected_from(truth)
    last = max(start for start, _ in expected)
    reported, withheld = coverage_of(run.service.log())
    kept = bool(reported)  # the service logs coverage
    problems = []
    for start in range(run.since, last + 1):
        coverage = reported.get(start, set())
        explained = start in touched
        if kept and (coverage - {"covered"} or start in withheld) and not explained:
            problems.append(f"{start}: {sorted(coverage)}{' withheld' * (start in withheld)}, "
                            f"not explained by the schedule")
        for streamer in sorted(STREAMERS):
            key = (start, streamer)
            want = dict(expected.get(key, {}))
            exact = coverage == {"covered"} or not explained
            if key not in got:
                if not (explained and (not kept or start in withheld)):
                    problems.append(f"{key} {sorted(coverage)}: no dataset (the access log: "
                                    f"{want})")
            elif exact and got[key] != want:
                diff = {c: (want.get(c), got[key].get(c)) for c in set(want) | set(got[key])
                        if want.get(c) != got[key].get(c)}
                problems.append(f"{key} {sorted(coverage) or 'touched'}: client -> (access "
                                f"log, dataset): {diff}")
            else:
                for client, sent in got[key].items():
                    if sent > want.get(client, 0):
                        problems.append(f"{key} {sorted(coverage)}: {client} has {sent} "
                                        f"bytes, the access log {want.get(client, 0)}")
    return problems


def report(run: Run, problems: list[str], touched: set[int]) -> str:
    lines = [f"chaos seed {run.seed} (replay: SFIVE_CHAOS_SEED={run.seed} scripts/test "
             f"tests/test_chaos.py): {len(problems)} intervals wrong", "schedule (planned; "
             "as it happened, seconds after the first interval):"]
    for f in run.faults:
        lines.append(f"  {f}: {f.began - run.since:6.2f} .. {f.ended - run.since:6.2f}"
                     + (f" skipped ({f.skipped})" if f.skipped else ""))
    lines.append(f"first interval {run.since}; touched: {sorted(touched)}")
    lines += problems[:30]
    return "\n".join(lines)


def summary(run: Run, touched: set[int]) -> None:
    reported, withheld = coverage_of(run.service.log())
    tally = Counter(c for k, cs in reported.items() if k >= run.since for c in cs)
    run.say(f"passed: {sum(not f.skipped for f in run.faults)} faults, {run.viewers.made} "
            f"requests; {len(touched)} intervals explained by the schedule; reported "
            f"{dict(tally)}, withheld {len(withheld)}")


@defer.inlineCallbacks
def settle(run: Run, truth):
    """Every fault over: viewers stop; once the hub has the last request's interval, the
    service stops (SIGTERM)."""
    if not run.service.running():
        yield run.start_service()
    if run.proxy is not None and run.proxy.port is None:
        run.proxy.accept()
    if run.hub.hub is None:
        run.hub.open()
    yield run.viewers.stop()
    last = max(start for start, _ in expected_from(truth()))
    run.say(f"settling: waiting for the interval {last - run.since} to be reported")
    yield wait_for(lambda: sum(1 for d in run.hub.datasets() if start_of(d) == last)
                   >= len(STREAMERS), timeout=60, what="the last interval reported")
    yield run.service.stop()


@defer.inlineCallbacks
def chaos(run: Run, rng: random.Random, kinds: dict, truth):
    faults = schedule(rng, kinds, SECONDS)
    print(f"chaos seed {run.seed}: replay with SFIVE_CHAOS_SEED={run.seed}; "
          f"{' '.join(run.service.args[-2:])}; schedule: " + "; ".join(map(str, faults)),
          flush=True)
    yield run.start_service()
    yield wait_for(lambda: run.service.log().count("connected to http") or "following"
                   in run.service.log(), timeout=30, what="the service to read its source")
    run.since = int(time.time()) + 1
    yield wait_for(lambda: time.time() >= run.since, what="the first interval")
    run.viewers = Viewers(run.nginx.url(""))
    run.t0 = time.time()
    yield run.play(faults)
    yield settle(run, truth)
    assert run.nginx.forced_stops == 0, "a graceful stop of nginx took so long it needed TERM"
    log = run.service.log()
    assert "Traceback" not in log, log[log.index("Traceback") - 2000:][:6000]
    return faults


@pytest_twisted.async_yield_fixture
async def parts(nginx_factory, tmp_path):
    made = {}
    yield made
    run = made.get("run")
    if run is not None:
        if run.viewers is not None:
            await run.viewers.stop()
        run.service.kill()
        if run.proxy is not None:
            await run.proxy.close()
        run.hub.close()


@pytest.mark.parametrize("seed", SEEDS)
@pytest_twisted.inlineCallbacks
def test_chaos_exporter_chain(seed, nginx_factory, parts, tmp_path):
    nginx = nginx_factory(files=MEDIA_FILES)
    proxy = Proxy(nginx.port)
    hub = Hub(str(tmp_path / "hub.sock"))
    rng, max_delay = variant(seed)
    service = Service(tmp_path, proxy.url(), hub.path, "--max-delay", max_delay)
    run = parts["run"] = Run(seed, nginx, hub, service, proxy=proxy)

    def truth():
        return [e for e in nginx.access_log() if e["uri"] != "/sfive"]

    yield chaos(run, rng, EXPORTER_FAULTS, truth)
    losses = ("nginx-restart",) if max_delay == LONG else BREAKS
    touched = touched_of(run, losses, BREAKS, "connected to http", BATCHED)
    problems = judge(run, hub.datasets(), truth(), touched)
    assert not problems, report(run, problems, touched)
    summary(run, touched)


@pytest.mark.parametrize("seed", SEEDS)
@pytest_twisted.inlineCallbacks
def test_chaos_access_log_chain(seed, nginx_factory, parts, tmp_path):
    nginx, log = nginx_logging(nginx_factory, tmp_path)
    hub = Hub(str(tmp_path / "hub.sock"))
    rng, max_delay = variant(seed)
    service = Service(tmp_path, None, hub.path, "--grace", "2.5", "--max-delay", max_delay,
                      source=("--file", str(log)), specs=SPECS)
    run = parts["run"] = Run(seed, nginx, hub, service, log_path=log)

    def truth():
        return nginx.access_log()

    yield chaos(run, rng, FILE_FAULTS, truth)
    losses = ("copytruncate",) if max_delay == LONG else ("copytruncate", *SERVICE_DOWN)
    touched = touched_of(run, losses, SERVICE_DOWN, "first interval starts at", FLUSHED)
    # the lines copytruncate's window lost (in the truth, in no file) lie within
    lost = {int(float(e["msec"])) for e in lost_lines(truth(), sorted(log.parent.iterdir()))}
    assert lost <= touched, (sorted(lost), sorted(touched))
    problems = judge(run, hub.datasets(), truth(), touched)
    assert not problems, report(run, problems, touched)
    summary(run, touched)


# -- what the chaos test found ------------------------------------------------------------------


def test_a_copytruncate_then_a_rename_before_the_follower_looks_loses_no_line(tmp_path):
    """Found by the chaos test (seed 5, --file): a copytruncate and then logrotate's rename
    (+ USR1) before the follower looked again. nginx goes on writing into the renamed file
    from offset 0 until it reopens; the follower read it as a rotated file from its old offset,
    beyond the end, so those lines were never read, no loss was announced, and their intervals
    were reported as covered with bytes missing."""
    log = tmp_path / "sfive.log"
    log.write_bytes(b"")
    f = Follower(log)
    append(log, entry(0) + entry(1) + entry(2))
    f.tick()
    shutil.copyfile(log, f"{log}.c1")
    os.truncate(log, 0)
    append(log, entry(3))  # nginx, after the truncation
    os.rename(log, f"{log}.r2")
    append(f"{log}.r2", entry(4))  # nginx, until USR1 reopens the log
    append(log, entry(5))  # the new file
    f.tick()
    f.tick(3)
    assert f.clients() == ips([0, 1, 2, 3, 4, 5])
    assert f.stats.file_truncations == 1 and f.stats.file_rotations == 1


def test_a_copytruncate_while_down_after_a_position_without_a_line_is_noticed(tmp_path):
    log = tmp_path / "sfive.log"
    log.write_bytes(b"")
    f = Follower(log)
    f.tick()
    position = f.service.position()  # the file followed, no line in it yet
    f.service.stopService()
    append(log, entry(0) + entry(1))  # nginx, while the service is down
    shutil.copyfile(log, f"{log}.c1")  # copytruncate
    os.truncate(log, 0)
    append(log, entry(2))
    g = Follower(log, position=position)
    g.tick()
    g.tick(3)
    # 0 and 1 are in the copy: read them from it, or at least say that lines were lost
    assert g.clients() == ips([0, 1, 2]) or g.stats.file_truncations == 1


def test_two_rotations_while_down_lose_no_line(tmp_path):
    log = tmp_path / "sfive.log"
    log.write_bytes(b"")
    f = Follower(log)
    append(log, entry(0))
    f.tick()
    position = f.service.position()
    f.service.stopService()
    append(log, entry(1))  # nginx, while the service is down
    os.rename(log, f"{log}.r1")
    log.write_bytes(entry(2))  # the file nginx reopened, rotated again before the restart
    os.rename(log, f"{log}.r2")
    log.write_bytes(entry(3))
    g = Follower(log, position=position)
    g.tick()
    g.tick(3)
    assert sorted(g.clients()) == ips([1, 2, 3])
