"""--client-ip full, truncate and keyed:FILE through the real chain: the access-log follower on a
real file feeding the service (timers on a task.Clock, datasets to a CallableSink), replay's
command line, and the state store's real SQLite file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.faults import clock_at, iso
from twisted.python import usage

from sfive_ngxlua import privacy
from sfive_ngxlua.replay import ReplayOptions
from sfive_ngxlua.service import build
from sfive_ngxlua.settings import Options
from sfive_ngxlua.sinks import CallableSink
from sfive_ngxlua.store import STATE_FILE

pytest_plugins = ("helpers.fixtures",)

T0 = 1_800_000_000
D = 10
URL = "/live/hls/foo-high/seg1.ts"
REPLAY = str(Path(sys.executable).parent / "sfive-ngxlua-replay")
KEY_A = b"a" * 16 + b"first key"
KEY_B = b"b" * 16 + b"second key"

# Five addresses, four clients: the mapped one is 192.0.2.10 again. Under truncate, the three
# IPv4 ones share a /24 and the two IPv6 ones a /48.
ADDRESSES = ["192.0.2.10", "192.0.2.99", "::ffff:192.0.2.10", "2001:db8:1:2::1",
             "2001:db8:1:3::7"]


def entry(t: float, client: str, ua: str = "player/1", sent: int = 100) -> bytes:
    """One access-log line in the sfive format."""
    return json.dumps({"time": iso(t), "client": client, "ua": ua, "url": URL, "status": 200,
                       "bytes-sent": sent}).encode() + b"\n"


def write_key(path: Path, secret: bytes) -> None:
    """Replace the key file the way a rotation should: a new file renamed over the old one."""
    tmp = path.with_suffix(".new")
    tmp.write_bytes(secret)
    os.replace(tmp, path)


class Node:
    """The service from its command line, following a real access log, on a task.Clock."""

    def __init__(self, tmp_path: Path, mode: str, *extra: str, reactor: object = None) -> None:
        self.log = tmp_path / "access.log"
        self.log.touch()
        options = Options()
        options.parseOptions(["-S", "foo/hls/high", "-n", "edge", "-d", str(D),
                              "--file", str(self.log), "--flush-period", "0",
                              "--client-ip", mode, *extra])
        self.settings = options.settings()
        self.clock = clock_at(T0 + 0.5)
        self.got: list = []
        sink = None if reactor is not None else CallableSink(self.got.append)
        self.top = build(self.settings, reactor, sink=sink, clock=self.clock)
        self.top.startService()
        self.clock.advance(0)

    def write(self, *lines: bytes) -> None:
        with open(self.log, "ab") as f:
            f.write(b"".join(lines))

    def until(self, t: float) -> None:
        while self.clock.seconds() < t:
            self.clock.advance(0.25)

    def intervals(self) -> dict:
        """start time -> (client-count, {ip: bytes}) of the datasets so far."""
        out = {}
        for d in self.got:
            data = d["data"]
            ips: dict = {}
            for c in data["clients"]:
                ips[c["ip"]] = ips.get(c["ip"], 0) + c["bytes-sent"]
            out[d["start-time"]] = (data["client-count"], ips)
        return out

    def stop(self) -> None:
        self.top.stopService()


def start(k: int) -> str:
    from sfive_ngxlua.datasets import start_time

    return start_time(T0 + k * D)


def one_interval(node: Node) -> tuple:
    """The five addresses with the same user agent in interval 1; its dataset."""
    node.write(*[entry(T0 + D + 1 + i, a, sent=10 ** i) for i, a in enumerate(ADDRESSES)])
    node.until(T0 + 2 * D + 2)
    return node.intervals()[start(1)]


# -- the modes through the service ---------------------------------------------------------


def test_full_sends_the_addresses_as_logged(tmp_path):
    node = Node(tmp_path, "full")
    count, ips = one_interval(node)
    assert count == 5 and sorted(ips) == sorted(ADDRESSES)
    node.stop()


def test_truncate_merges_clients_of_one_network_and_client_count_says_so(tmp_path):
    node = Node(tmp_path, "truncate")
    count, ips = one_interval(node)
    assert ips == {"192.0.2.0": 1 + 10 + 100, "2001:db8:1::": 1000 + 10000}
    assert count == 2, "five addresses, two networks, one user agent: two clients"
    node.stop()


def test_keyed_keeps_client_count_exact_and_sends_no_address(tmp_path):
    key = tmp_path / "key"
    key.write_bytes(KEY_A)
    node = Node(tmp_path, f"keyed:{key}")
    count, ips = one_interval(node)
    assert count == 4, "the IPv4-mapped address is the same client as its IPv4 address"
    expected = {privacy.keyed(KEY_A, a) for a in ADDRESSES}
    assert set(ips) == expected and len(expected) == 4
    assert ips[privacy.keyed(KEY_A, "192.0.2.10")] == 1 + 100
    for ip in ips:
        assert len(ip) == 16 and int(ip, 16) >= 0 and "." not in ip and ":" not in ip
    node.stop()


def test_a_new_key_applies_from_the_next_interval_the_records_reach(tmp_path, logs):
    key = tmp_path / "key"
    key.write_bytes(KEY_A)
    node = Node(tmp_path, f"keyed:{key}")
    node.write(entry(T0 + D + 1, "192.0.2.1"), entry(T0 + D + 2, "192.0.2.2"))
    node.until(T0 + 2 * D - 1.5)
    write_key(key, KEY_B)  # rotated late in interval 1
    node.write(entry(T0 + D + 8, "192.0.2.1"))  # interval 1 still: the key it began with
    node.until(T0 + 2 * D - 1)
    node.write(entry(T0 + 2 * D, "192.0.2.1"),  # interval 2: the new key
               entry(T0 + 2 * D - 1, "192.0.2.2"))  # a straggler of interval 1: the old one
    node.until(T0 + 3 * D + 2)
    assert node.top.stats.late == 0
    got = node.intervals()
    assert got[start(1)] == (2, {privacy.keyed(KEY_A, "192.0.2.1"): 200,
                                 privacy.keyed(KEY_A, "192.0.2.2"): 200})
    assert got[start(2)] == (1, {privacy.keyed(KEY_B, "192.0.2.1"): 100})
    assert len(logs.matching("a new key")) == 1
    node.stop()


def test_a_key_file_that_goes_bad_keeps_the_last_good_key_logged_once_and_counted(tmp_path,
                                                                                  logs):
    key = tmp_path / "key"
    key.write_bytes(KEY_A)
    node = Node(tmp_path, f"keyed:{key}")
    write_key(key, b"short")
    for k in (1, 2, 3):
        node.write(entry(T0 + k * D + 1, "192.0.2.1"))
        node.until(T0 + (k + 1) * D + 2)
    key.unlink()
    node.write(entry(T0 + 4 * D + 1, "192.0.2.1"))
    node.until(T0 + 5 * D + 2)
    got = node.intervals()
    for k in (1, 2, 3, 4):
        assert got[start(k)] == (1, {privacy.keyed(KEY_A, "192.0.2.1"): 100})
    assert len(logs.matching("keeping the last good key")) == 1
    assert node.top.stats.errors[privacy.ERRORS] == 4
    write_key(key, KEY_B)
    node.write(entry(T0 + 5 * D + 1, "192.0.2.1"))
    node.until(T0 + 6 * D + 2)
    assert logs.matching("is good again")
    assert node.intervals()[start(5)] == (1, {privacy.keyed(KEY_B, "192.0.2.1"): 100})
    node.stop()


# -- the state dir ---------------------------------------------------------------------------


def saved_bytes(directory: Path) -> bytes:
    return b"".join(p.read_bytes() for p in directory.iterdir() if p.name.startswith(STATE_FILE))


@pytest.mark.parametrize("mode", ["full", "truncate", "keyed"])
def test_the_state_dir_holds_no_full_address_under_truncate_or_keyed(tmp_path, mode):
    key = tmp_path / "key"
    key.write_bytes(KEY_A)
    state = tmp_path / "state"
    node = Node(tmp_path, f"keyed:{key}" if mode == "keyed" else mode, "--state-dir",
                str(state))
    node.write(*[entry(T0 + D + 1, a) for a in ADDRESSES])
    node.until(T0 + D + 3)  # read and checkpointed, the interval still open
    node.stop()  # the last checkpoint saves it
    data = saved_bytes(state)
    assert b"player/1" in data, "the saved interval is there"
    found = [a for a in ("192.0.2.10", "192.0.2.99", "2001:db8:1:2::1", "2001:db8:1:3::7")
             if a.encode() in data]
    if mode == "full":
        assert len(found) == 4
    else:
        assert found == []


def test_a_state_saved_under_another_mode_is_reported_as_saved_and_said_to_hold_addresses(tmp_path,
                                                                                  logs):
    state = tmp_path / "state"
    node = Node(tmp_path, "full", "--state-dir", str(state))
    node.write(entry(T0 + D + 1, "192.0.2.10"))
    node.until(T0 + D + 3)
    node.stop()
    node = Node(tmp_path, "truncate", "--state-dir", str(state))
    (line,) = logs.matching("saved under other settings")
    assert "--client-ip full" in line and "truncate" in line
    assert logs.matching("hold full client addresses")
    assert node.got[0]["data"]["clients"][0]["ip"] == "192.0.2.10", "reported as counted"
    node.stop()


def test_datasets_queued_with_full_addresses_are_said_to_be_so(tmp_path, logs):
    from twisted.internet import reactor

    state, hub = tmp_path / "state", str(tmp_path / "no-hub")
    node = Node(tmp_path, "full", "--state-dir", str(state), "--socket", hub, reactor=reactor)
    node.write(entry(T0 + D + 1, "192.0.2.10"))
    node.until(T0 + 2 * D + 2)  # reported; the hub is not there: queued
    node.stop()
    Node(tmp_path, "truncate", "--state-dir", str(state), "--socket", hub,
         reactor=reactor).stop()
    (line,) = logs.matching("hold full client addresses")
    assert "and its hub queue (1 datasets)" in line
    assert str(state / STATE_FILE) in line


def test_a_state_saved_under_the_same_mode_and_key_is_restored(tmp_path, logs):
    key = tmp_path / "key"
    key.write_bytes(KEY_A)
    state = tmp_path / "state"
    node = Node(tmp_path, f"keyed:{key}", "--state-dir", str(state))
    node.write(entry(T0 + D + 1, "192.0.2.10"))
    node.until(T0 + D + 3)
    node.stop()
    node = Node(tmp_path, f"keyed:{key}", "--state-dir", str(state))
    assert not logs.matching("saved under other settings")
    node.stop()
    write_key(key, KEY_B)  # changed while stopped: another key, like any other setting
    node = Node(tmp_path, f"keyed:{key}", "--state-dir", str(state))
    (line,) = logs.matching("saved under other settings")
    assert privacy.Key(KEY_A).fingerprint in line and privacy.Key(KEY_B).fingerprint in line
    assert KEY_A.decode() not in line
    assert not logs.matching("hold full client addresses")
    assert node.got[0]["data"]["clients"][0]["ip"] == privacy.keyed(KEY_A, "192.0.2.10")
    node.stop()


# -- replay ----------------------------------------------------------------------------------


def test_replay_takes_the_same_option_and_key(tmp_path):
    key = tmp_path / "key"
    key.write_bytes(KEY_A)
    log = tmp_path / "access.log"
    log.write_bytes(b"".join(entry(T0 + 1 + i, a) for i, a in enumerate(ADDRESSES)))
    args = [REPLAY, "-q", "-S", "foo/hls/high", "-n", "edge", "-d", str(D)]

    def replay(*extra):
        out = subprocess.run([*args, *extra, str(log)], capture_output=True, check=True).stdout
        (d,) = [json.loads(x) for x in out.splitlines()]
        return d["data"]["client-count"], sorted(c["ip"] for c in d["data"]["clients"])

    assert replay() == (5, sorted(ADDRESSES))
    assert replay("--client-ip", "truncate") == (2, ["192.0.2.0", "2001:db8:1::"])
    assert replay("--client-ip", f"keyed:{key}") == (
        4, sorted({privacy.keyed(KEY_A, a) for a in ADDRESSES}))
    bad = subprocess.run([*args, "--client-ip", "keyed:" + str(tmp_path / "none")],
                         capture_output=True)
    assert bad.returncode != 0 and b"cannot be read" in bad.stderr
    assert b"Traceback" not in bad.stderr


# -- the option ------------------------------------------------------------------------------


def parse(*args: str, options: type = Options):
    o = options()
    o.parseOptions(["-S", "foo/hls/high", *args])
    return o.settings()


def test_invalid_values_are_one_clear_error_at_start(tmp_path):
    short = tmp_path / "short"
    short.write_bytes(b"0123456789\n")
    cases = [("mask", "not a mode: full, truncate or keyed:FILE"),
             ("keyed:", "needs the key file"),
             (f"keyed:{tmp_path / 'absent'}", "cannot be read: No such file"),
             (f"keyed:{tmp_path}", "cannot be read"),
             (f"keyed:{short}", "holds 10 bytes, fewer than 16")]
    for value, message in cases:
        for kind in (Options, ReplayOptions):
            with pytest.raises(usage.UsageError, match="^--client-ip: .*" + message):
                parse("--client-ip", value, options=kind)
    assert parse().client_ip is privacy.FULL
    assert parse("--client-ip", "truncate").client_ip.mode == "truncate"
    good = tmp_path / "good"
    good.write_bytes(KEY_A + b"\n")
    keyed = parse("--client-ip", f"keyed:{good}").client_ip
    assert keyed.key.secret == KEY_A and keyed.saved == f"keyed:{keyed.key.fingerprint}"


def test_truncate_and_canonical_spellings():
    t = privacy.truncate
    assert t("203.0.113.77") == "203.0.113.0"
    assert t("::ffff:203.0.113.77") == t("::FFFF:cb00:714d") == "203.0.113.0"
    assert t("2001:DB8:abcd:12:1::1") == "2001:db8:abcd::"
    assert t("fe80::1%eth0") == "fe80::"
    assert t("unix:") == t("not an address") == privacy.NOT_AN_ADDRESS
    key = b"k" * 16
    assert privacy.keyed(key, "::ffff:10.1.2.3") == privacy.keyed(key, "10.1.2.3")
    assert privacy.keyed(key, "2001:DB8::1") == privacy.keyed(key, "2001:db8:0::1")
    assert privacy.keyed(key, "10.1.2.3") != privacy.keyed(b"j" * 16, "10.1.2.3")
    assert privacy.keyed(key, "unix:") != "unix:"


def test_one_address_as_the_model_gets_it(tmp_path):
    """``Addresses`` called on one address (for a sample shown to a person)."""
    key = tmp_path / "key"
    key.write_bytes(KEY_A)
    assert privacy.ClientIP.parse("truncate").addresses(D)("192.0.2.7") == "192.0.2.0"
    one = privacy.ClientIP.parse(f"keyed:{key}").addresses(D)
    assert one("192.0.2.7", T0) == one("192.0.2.7") == privacy.keyed(KEY_A, "192.0.2.7")
    assert privacy.FULL.addresses(D) is None


def test_a_key_file_anyone_may_read_is_warned_about(tmp_path, logs):
    key = tmp_path / "key"
    key.write_bytes(KEY_A)
    key.chmod(0o640)
    parse("--client-ip", f"keyed:{key}")
    assert not logs.matching("may be read by anyone")
    key.chmod(0o644)
    parse("--client-ip", f"keyed:{key}")
    assert logs.matching("may be read by anyone")


def test_saved_settings_without_a_mode_are_from_full(tmp_path):
    """A state saved by a release before --client-ip: full addresses."""
    from sfive_ngxlua.model import StateMismatch

    privacy.FULL.check_saved({"duration": 10}, store=None)
    with pytest.raises(StateMismatch, match="--client-ip full, the settings truncate"):
        class Store:
            directory, path = str(tmp_path), str(tmp_path / STATE_FILE)

        privacy.ClientIP.parse("truncate").check_saved({"duration": 10}, Store())
