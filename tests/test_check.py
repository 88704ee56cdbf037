"""sfive-ngxlua-check, the installed console script, against real parts: a private nginx with the
shipped exporter (lab/nginx.py), nginx's own access log in the sfive and the combined format,
real unix datagram sockets, a state dir locked by another process with the service's own lock,
and the real twistd service running beside it. Every exit status is checked."""

from __future__ import annotations

import http.client
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import pytest_twisted

from lab.nginx import MEDIA_FILES, SOURCE_DIR, free_port

pytestmark = pytest.mark.timeout(120)

CHECK = str(Path(sys.executable).parent / "sfive-ngxlua-check")
TWISTD = str(Path(sys.executable).parent / "twistd")
ME = pwd.getpwuid(os.geteuid()).pw_name
FILES = {**MEDIA_FILES, "live/hls/baz-high/seg1.ts": b"x" * 5000, "other/page.txt": b"y" * 300}
UA = "SecretPlayer/9.1"
S = ["-S", "foo/hls/high,low"]


def run_check(*args: str, user: str | None = ME, text: bool = False, timeout: float = 90):
    """(exit status, the JSON report or None, the finished process)."""
    argv = [CHECK, *args] + ([] if text else ["--json"]) + (["--user", user] if user else [])
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    report = json.loads(proc.stdout) if not text and proc.stdout.strip() else None
    return proc.returncode, report, proc


def probe(report, name):
    [found] = [p for p in report["probes"] if p["name"] == name]
    return found


def get(url: str, ua: str = UA) -> int:
    request = urllib.request.Request(url, headers={"User-Agent": ua})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def newest_seq(nginx) -> int:
    """The exporter's newest record number: its first heartbeat on a ?v=2 stream."""
    conn = http.client.HTTPConnection("127.0.0.1", nginx.port, timeout=10)
    try:
        conn.request("GET", "/sfive?v=2")
        line = conn.getresponse().readline()
    finally:
        conn.close()
    return json.loads(line)["seq"]


def wait_until(predicate, timeout: float = 20.0, what: str = "the condition"):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)
    return value


def requests(nginx, paths):
    """Make the requests in order; wait until the exporter's ring holds every one of them."""
    before = newest_seq(nginx)
    statuses = [get(nginx.url(p)) for p in paths]
    wait_until(lambda: newest_seq(nginx) >= before + len(paths), what="the ring")
    return statuses


def truth(nginx, path):
    """What nginx's own access log says a request to ``path`` sent (bytes per request)."""
    return [e["bytes_sent"] for e in nginx.access_log() if e["uri"] == path]


@pytest.fixture
def hub(tmp_path):
    path = str(tmp_path / "pipegram")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    yield path, sock
    sock.close()


def received(sock) -> list:
    out = []
    while True:
        try:
            out.append(sock.recv(1 << 20))
        except BlockingIOError:
            return out


# -- the exporter ------------------------------------------------------------------------------


def test_exporter_sample_counts_rejects_and_names_unlisted_streams(nginx_factory, hub):
    nginx = nginx_factory(files=FILES)
    paths = ["/live/hls/foo-high/seg1.ts", "/live/hls/foo-high/seg2.ts",
             "/live/hls/foo-low/seg1.ts", "/live/hls/foo-high/seg1.ts",
             "/live/hls/baz-high/seg1.ts", "/live/dash/bar-low/seg1.m4s",
             "/live/hls/foo-high/seg99.ts", "/other/page.txt"]
    assert requests(nginx, paths) == [200] * 6 + [404, 200]
    path, sock = hub
    status, report, proc = run_check(*S, "-u", nginx.url("/sfive"), "-s", path)
    assert status == 0, proc.stdout + proc.stderr
    assert probe(report, "exporter")["status"] == "ok"
    assert "protocol 2, ring " in probe(report, "exporter")["message"]
    assert probe(report, "hub")["status"] == "ok"
    sample = report["sample"]
    assert sample["lines"] == len(paths) and sample["complete"]
    streams = {s["stream"]: (s["records"], s["bytes"]) for s in sample["streams"]}
    high = truth(nginx, "/live/hls/foo-high/seg1.ts") + truth(nginx, "/live/hls/foo-high/seg2.ts")
    assert streams == {"foo/hls/high": (3, sum(high)),
                       "foo/hls/low": (1, sum(truth(nginx, "/live/hls/foo-low/seg1.ts")))}
    rejected = sample["rejected"]
    assert {r: v["count"] for r, v in rejected.items()} == {
        "unknown-streamer": 2, "status": 1, "url-mismatch": 1}
    whys = {e["what"]: e["why"] for e in rejected["unknown-streamer"]["examples"]}
    assert whys == {"/live/hls/baz-high/seg#.ts": "parsed as baz/hls/high, which is not among -S",
                    "/live/dash/bar-low/seg#.m4s": "parsed as bar/dash/low, which is not among -S"}
    [status_example] = rejected["status"]["examples"]
    assert status_example["what"] == "/live/hls/foo-high/seg#.ts"
    assert status_example["why"].startswith("status 404, not among --status 200,206")
    assert rejected["url-mismatch"]["examples"][0]["what"] == "/other/page.txt"
    unlisted = {s["stream"]: s["bytes"] for s in sample["unlisted"]}
    assert unlisted == {"baz/hls/high": sum(truth(nginx, "/live/hls/baz-high/seg1.ts")),
                        "bar/dash/low": sum(truth(nginx, "/live/dash/bar-low/seg1.m4s"))}
    assert sorted(sample["add"]) == ["-S bar/dash/low", "-S baz/hls/high"]
    shown = json.dumps(sample)
    assert UA not in shown and "127.0.0.1" not in shown  # no client address, no user agent
    assert received(sock) == []  # nothing sent to the hub

    status, _, proc = run_check(*S, "-u", nginx.url("/sfive"), "-s", path, text=True)
    assert status == 0
    out = proc.stdout
    assert "parsed as baz/hls/high, which is not among -S" in out
    assert "to count them, add: -S bar/dash/low -S baz/hls/high" in out
    assert "result: usable; 4 of 8 sampled records count (exit status 0)" in out
    assert "    foo/hls/high        3 records  " in out
    assert "    foo/hls/low         1 records  " in out
    assert UA not in out


def test_exporter_sample_is_the_rings_last_n_records(nginx_factory):
    nginx = nginx_factory(files=FILES, workers=1)  # one worker: the ring in request order
    requests(nginx, ["/live/hls/foo-low/seg1.ts", "/live/hls/foo-high/seg1.ts",
                     "/live/hls/foo-high/seg2.ts", "/live/hls/baz-high/seg1.ts",
                     "/live/hls/foo-low/seg1.ts"])
    status, report, proc = run_check(*S, "-u", nginx.url("/sfive"), "--sample", "3")
    assert status == 0, proc.stdout
    sample = report["sample"]
    assert sample["lines"] == 3
    assert "last 3 records (3 to 5)" in sample["note"]
    streams = {s["stream"]: (s["records"], s["bytes"]) for s in sample["streams"]}
    assert streams == {"foo/hls/high": (1, sum(truth(nginx, "/live/hls/foo-high/seg2.ts"))),
                       "foo/hls/low": (1, truth(nginx, "/live/hls/foo-low/seg1.ts")[-1])}
    assert sample["rejected"]["unknown-streamer"]["count"] == 1


def test_a_quiet_exporter_answers_at_once_with_an_empty_sample(nginx):
    started = time.monotonic()
    status, report, proc = run_check(*S, "-u", nginx.url("/sfive"), "--timeout", "60")
    assert status == 2, proc.stdout
    assert time.monotonic() - started < 30  # the first heartbeat, not the time bound
    assert report["sample"]["lines"] == 0
    assert "the ring is empty" in report["sample"]["note"]
    assert "the sample is empty" in report["verdict"]
    status, report, _ = run_check(*S, "-u", nginx.url("/sfive"), "--seconds", "0.5")
    assert status == 2 and report["sample"]["note"] == "the records of 0.5 seconds"


def test_a_ring_smaller_than_the_sample_says_so(nginx_factory):
    nginx = nginx_factory(files=FILES, ring_size=3)
    requests(nginx, ["/live/hls/foo-high/seg1.ts"] * 6)
    status, report, _ = run_check(*S, "-u", nginx.url("/sfive"), "--sample", "5")
    assert status == 0
    sample = report["sample"]
    assert sample["lines"] == 3 and sample["lost"] == 2
    assert "records (2 to 6); the ring no longer held 2 of them" in sample["note"]


def test_seconds_samples_new_records(nginx_factory):
    nginx = nginx_factory(files=FILES)
    check = subprocess.Popen([CHECK, *S, "-u", nginx.url("/sfive"), "--seconds", "2", "--json",
                              "--user", ME], stdout=subprocess.PIPE, text=True)
    made = 0
    deadline = time.monotonic() + 60
    while check.poll() is None and time.monotonic() < deadline:
        get(nginx.url("/live/hls/foo-low/seg1.ts"))
        made += 1
        time.sleep(0.05)
    report = json.loads(check.communicate(timeout=30)[0])
    assert check.returncode == 0 and report["sample"]["note"] == "the records of 2 seconds"
    low = {s["stream"]: s["records"] for s in report["sample"]["streams"]}["foo/hls/low"]
    assert 0 < low <= made


@pytest_twisted.inlineCallbacks
def test_a_protocol_1_exporter_is_a_warning_and_sampled_live():
    """An older sfive.lua (no protocol headers, no heartbeats), played by the test exporter of
    tests/support.py: the sample is the new records, up to --sample."""
    from support import Exporter, line
    from twisted.internet import reactor
    from twisted.internet.utils import getProcessOutputAndValue

    exporter = Exporter().listen()
    exporter.on_request = lambda request: request.write(
        line("2026-11-27T20:00:00Z", url="/live/hls/foo-high/1.ts", seq=1, sent=700)
        + line("2026-11-27T20:00:01Z", url="/live/hls/foo-high/2.ts", seq=2, sent=300))
    try:
        out, err, status = yield getProcessOutputAndValue(
            CHECK, [*S, "-u", exporter.url(), "--sample", "2", "--json", "--user", ME],
            env=dict(os.environ), reactor=reactor)
    finally:
        yield exporter.stop()
    report = json.loads(out)
    assert status == 0, out
    exporter_probe = probe(report, "exporter")
    assert exporter_probe["status"] == "warn" and "protocol 1" in exporter_probe["message"]
    assert report["sample"]["counted"] == {"records": 2, "bytes": 1000}
    assert exporter.seen_args[0] == {b"v": [b"2"]}


def test_nothing_that_counts_is_exit_status_1(nginx_factory):
    nginx = nginx_factory(files=FILES)
    requests(nginx, ["/live/hls/baz-high/seg1.ts", "/other/page.txt"])
    status, report, _ = run_check(*S, "-u", nginx.url("/sfive"))
    assert status == 1
    assert all(p["status"] != "fail" for p in report["probes"])
    assert report["verdict"] == "nothing of the 2 sampled records counts"
    assert report["sample"]["add"] == ["-S baz/hls/high"]


def test_exporter_forbidden_missing_and_unreachable_name_their_fix(nginx_factory):
    nginx = nginx_factory(extra_server=(
        "        location = /closed { deny all; content_by_lua_block "
        "{ require(\"sfive\").serve() } }\n"))
    status, report, _ = run_check(*S, "-u", nginx.url("/closed"))
    assert status == 1 and report["sample"] is None
    exporter = probe(report, "exporter")
    assert exporter["status"] == "fail" and "HTTP 403" in exporter["message"]
    assert "allow list" in exporter["fix"] and "sfive-location.conf" in exporter["fix"]
    assert "allow 127.0.0.1;" in exporter["fix"]

    status, report, _ = run_check(*S, "-u", nginx.url("/nothing-here"))
    exporter = probe(report, "exporter")
    assert status == 1 and "HTTP 404" in exporter["message"]
    assert "include /usr/share/sfive-ngxlua/nginx/sfive-location.conf" in exporter["fix"]

    status, report, _ = run_check(*S, "-u", f"http://127.0.0.1:{free_port()}/sfive")
    exporter = probe(report, "exporter")
    assert status == 1 and "cannot fetch" in exporter["message"]
    assert "refused" in exporter["message"].lower()


# -- nginx's own access log --------------------------------------------------------------------


def log_server(nginx_factory, tmp_path, fmt):
    log = tmp_path / "access" / "streams.log"
    log.parent.mkdir()
    nginx = nginx_factory(files=FILES, extra_http=(
        f"    include {SOURCE_DIR}/sfive-log.conf;\n    access_log {log} {fmt};\n"))
    return nginx, log


def test_an_access_log_in_the_sfive_format(nginx_factory, tmp_path):
    nginx, log = log_server(nginx_factory, tmp_path, "sfive")
    paths = ["/live/hls/foo-high/seg1.ts", "/live/hls/foo-low/seg1.ts",
             "/live/hls/baz-high/seg1.ts", "/live/hls/foo-high/seg2.ts"]
    for path in paths:
        get(nginx.url(path))
    wait_until(lambda: log.exists() and log.read_bytes().count(b"\n") == len(paths),
               what="nginx's log lines")
    status, report, proc = run_check(*S, "--file", str(log))
    assert status == 0, proc.stdout
    assert probe(report, "file")["status"] == "ok"
    assert "in the sfive format" in probe(report, "file")["message"]
    streams = {s["stream"]: (s["records"], s["bytes"]) for s in report["sample"]["streams"]}
    assert streams["foo/hls/low"] == (1, sum(truth(nginx, "/live/hls/foo-low/seg1.ts")))
    assert streams["foo/hls/high"][0] == 2
    assert report["sample"]["add"] == ["-S baz/hls/high"]
    status, report, _ = run_check(*S, "--file", str(log), "--sample", "1")
    assert report["sample"]["lines"] == 1  # the last line only
    # two workers buffer their own lines: the file's last line need not be the last request
    last = json.loads(log.read_bytes().splitlines()[-1])
    assert last["bytes-sent"] in truth(nginx, last["url"])
    counted = last["url"] != "/live/hls/baz-high/seg1.ts"  # baz is not among -S
    assert sum(st["bytes"] for st in report["sample"]["streams"]) == \
        (last["bytes-sent"] if counted else 0)


def test_an_access_log_in_the_combined_format_names_the_format_to_use(nginx_factory, tmp_path):
    nginx, log = log_server(nginx_factory, tmp_path, "combined")
    for path in ["/live/hls/foo-high/seg1.ts", "/live/hls/foo-low/seg1.ts"]:
        get(nginx.url(path))
    wait_until(lambda: log.exists() and log.read_bytes().count(b"\n") == 2, what="log lines")
    status, report, proc = run_check(*S, "--file", str(log), text=True)
    assert status == 1
    assert "readable, but its lines are in nginx's combined (or another text) format" in \
        proc.stdout
    assert "fix: include /usr/share/sfive-ngxlua/nginx/sfive-log.conf in http { }" in proc.stdout
    assert "127.0.0.1" not in proc.stdout and UA not in proc.stdout
    status, report, proc = run_check(*S, "--file", str(log))
    assert status == 1 and report["sample"]["rejected"] == {
        "invalid-json": {"count": 2, "examples": []}}
    assert f"'access_log {log} sfive buffer=64k flush=1s;'" in probe(report, "file")["fix"]
    assert "127.0.0.1" not in proc.stdout and UA not in proc.stdout


def test_a_missing_and_an_empty_access_log(tmp_path):
    log = tmp_path / "sfive.log"
    status, report, _ = run_check(*S, "--file", str(log))
    assert status == 1
    assert probe(report, "file")["message"] == f"{log}: no such file"
    assert "sfive-log.conf" in probe(report, "file")["fix"]
    log.write_bytes(b"")
    status, report, _ = run_check(*S, "--file", str(log))
    assert status == 2 and probe(report, "file")["status"] == "ok"


def test_an_access_log_with_some_lines_of_another_format(tmp_path):
    """A file that another log_format writes into too: a warning, and what the odd lines hold
    is shown as field names and types, never their values."""
    log = tmp_path / "sfive.log"
    good = {"time": "2026-11-27T20:00:00+00:00", "client": "192.0.2.77", "ua": UA,
            "url": "/live/hls/foo-high/seg17.ts", "status": 200, "bytes-sent": 1234}
    odd = {"time": "2026-11-27T20:00:01+00:00", "client": "192.0.2.78", "ua": UA,
           "uri": "/live/hls/foo-high/seg18.ts", "status": 200}
    late = dict(good, time="yesterday")
    log.write_text("".join(json.dumps(x) + "\n" for x in (good, odd, late, good)))
    status, report, proc = run_check(*S, "--file", str(log))
    assert status == 0, proc.stdout
    file_probe = probe(report, "file")
    assert file_probe["status"] == "warn"
    assert "2 of 4 lines are not in the sfive format" in file_probe["message"]  # bad-time too
    sample = report["sample"]
    assert sample["counted"] == {"records": 2, "bytes": 2468}
    [missing] = sample["rejected"]["missing-field"]["examples"]
    assert missing["what"] == "client: str, status: int, time: str, ua: str, uri: str"
    [bad_time] = sample["rejected"]["bad-time"]["examples"]
    assert bad_time["what"] == "yesterday"
    assert "192.0.2.7" not in proc.stdout and UA not in proc.stdout


def test_the_hub_probe_reads_a_unix_endpoints_path_as_twisted_does():
    from twisted.internet import reactor
    from twisted.internet.endpoints import clientFromString

    from sfive_ngxlua.check import unix_path

    for description in ("unix:path=/run/sfive/pipe", "unix:/run/a:timeout=3",
                        "unix:timeout=3:path=/run/b\\:c", "unix:lockfile=1:/run/d"):
        assert unix_path(description) == clientFromString(reactor, description)._path
    assert unix_path("tcp:host=hub:port=4000") is None


def test_url_shapes_and_streamer_specs():
    from sfive_ngxlua.check import shape, streamer_specs
    from sfive_ngxlua.records import RecordParser
    from sfive_ngxlua.settings import Settings

    parser = RecordParser(Settings(streamers=(("a", "hls", "high"),)))
    url = "/live2/hls/stream1-720p/seg12345.m4s"
    assert shape(url, parser.url_match(url)) == "/live#/hls/stream1-720p/seg#.m4s"
    assert shape("/x/2026/11/f00.mp4", None) == "/x/#/#/f#.mp4"
    assert shape("/" + "9" * 300, None) == "/#"
    assert streamer_specs([("s1", "hls", "720p"), ("s1", "hls", "1080p"), ("s2", "hls", "720p"),
                           ("s2", "hls", "1080p"), ("s3", "dash", "low"), ("s3", "hls", "x")]) \
        == ["s1,s2/hls/1080p,720p", "s3/dash/low", "s3/hls/x"]


# -- the hub -----------------------------------------------------------------------------------


def test_hub_socket_missing_stale_and_not_a_socket(nginx_factory, tmp_path):
    nginx = nginx_factory(files=FILES)
    requests(nginx, ["/live/hls/foo-high/seg1.ts"])
    url = ["-u", nginx.url("/sfive")]
    status, report, _ = run_check(*S, *url, "-s", str(tmp_path / "pipegram"))
    hub = probe(report, "hub")
    assert status == 1 and hub["status"] == "fail"
    assert hub["message"].endswith("no such socket") and "start the sfive hub" in hub["fix"]

    stale = str(tmp_path / "stale")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(stale)
    sock.close()  # the file stays, nobody reads it
    status, report, _ = run_check(*S, *url, "-s", stale)
    assert status == 1 and "nobody receives on it" in probe(report, "hub")["message"]

    stream = str(tmp_path / "stream")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(stream)
    listener.listen()
    try:
        status, report, _ = run_check(*S, *url, "-s", stream)
        assert status == 1 and probe(report, "hub")["fix"] == \
            f"use --hub unix:path={stream} instead of --socket"
        status, report, _ = run_check(*S, *url, "--hub", f"unix:path={stream}")
        assert status == 0 and probe(report, "hub")["status"] == "ok"
        conn, _ = listener.accept()
        conn.settimeout(10)
        assert conn.recv(100) == b""  # connected and closed: nothing sent
        conn.close()
    finally:
        listener.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="probing as another user needs root")
def test_as_root_it_probes_as_the_services_user(nginx_factory):
    nginx = nginx_factory(files=FILES)
    requests(nginx, ["/live/hls/foo-high/seg1.ts"])
    shared = tempfile.mkdtemp(prefix="sfive-check-")
    try:
        os.chmod(shared, 0o755)
        path = os.path.join(shared, "pipegram")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        os.chmod(path, 0o660)  # root's group only
        log = Path(shared, "sfive.log")
        log.write_text("")
        os.chmod(log, 0o600)
        status, report, _ = run_check(*S, "-u", nginx.url("/sfive"), "-s", path,
                                      user="nobody")
        assert status == 1 and report["user"].startswith("nobody ")
        hub = probe(report, "hub")
        assert hub["message"] == f"{path}: not writable by nobody"
        assert "adduser nobody root" in hub["fix"]
        status, report, _ = run_check(*S, "-u", nginx.url("/sfive"), "-s", path, user=None)
        try:
            default = pwd.getpwnam("sfive-ngxlua").pw_name
        except KeyError:
            default = "root"
        assert report["user"].startswith(default + " ")
        status, report, _ = run_check(*S, "--file", str(log), user="nobody")
        assert status == 1
        assert probe(report, "file")["message"] == f"{log}: not readable by nobody"
        assert "install -d -o www-data -g nobody -m 2750" in probe(report, "file")["fix"]
        sock.close()
    finally:
        shutil.rmtree(shared)


# -- the state dir and the metrics endpoint ----------------------------------------------------

HOLDER = """
import socket, sys, time
from sfive_ngxlua.settings import Settings
from sfive_ngxlua.stats import Stats
from sfive_ngxlua.store import StateStore
store = StateStore(sys.argv[1], Settings(streamers=(("foo", "hls", "high"),)), Stats())
port = socket.socket()
port.bind(("127.0.0.1", int(sys.argv[2])))
port.listen()
print("holding", flush=True)
time.sleep(120)
"""


def test_a_state_dir_and_a_port_held_by_another_process_fail_naming_it(nginx_factory, tmp_path):
    nginx = nginx_factory(files=FILES)
    requests(nginx, ["/live/hls/foo-high/seg1.ts"])
    state, port = tmp_path / "state", free_port()
    options = [*S, "-u", nginx.url("/sfive"), "--state-dir", str(state),
               "--metrics", f"tcp:{port}:interface=127.0.0.1"]
    status, report, _ = run_check(*options)
    assert status == 0
    assert probe(report, "state")["message"].endswith("not there yet; the service makes it "
                                                      "(0700) at its start")
    assert not state.exists()  # the check makes nothing
    assert probe(report, "metrics")["status"] == "ok"

    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(state), str(port)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "holding\n"
        status, report, _ = run_check(*options)
        assert status == 1
        state_probe = probe(report, "state")
        assert state_probe["status"] == "fail"
        assert f"locked by pid {holder.pid}, python" in state_probe["message"]
        assert "not the service" in state_probe["message"]
        metrics = probe(report, "metrics")
        assert metrics["status"] == "fail" and f"taken by pid {holder.pid}" in metrics["message"]
    finally:
        holder.kill()
        holder.wait()
    status, report, _ = run_check(*options)
    assert status == 0 and probe(report, "state")["message"].endswith(
        "a saved state, not locked")


def test_safe_beside_the_running_service(nginx_factory, tmp_path, hub):
    """The real twistd service with the same options: its lock and its metrics port are
    reported as the running service's, with its pid, and the check exits 0."""
    nginx = nginx_factory(files=FILES)
    path, sock = hub
    port = free_port()
    options = [*S, "-u", nginx.url("/sfive"), "-s", path, "-d", "1",
               "--state-dir", str(tmp_path / "state"),
               "--metrics", f"tcp:{port}:interface=127.0.0.1"]
    service = subprocess.Popen([TWISTD, "-n", "--pidfile=", "-l", str(tmp_path / "twistd.log"),
                                "sfive-ngxlua", *options])
    try:
        wait_until(lambda: "connected to" in (tmp_path / "twistd.log").read_text()
                   if (tmp_path / "twistd.log").exists() else False, timeout=30,
                   what="the service to connect")
        requests(nginx, ["/live/hls/foo-high/seg1.ts", "/live/hls/baz-high/seg1.ts"])
        status, report, proc = run_check(*options)
        assert status == 0, proc.stdout
        state = probe(report, "state")
        assert state["status"] == "in-use"
        assert f"in use by the running service (pid {service.pid}" in state["message"]
        metrics = probe(report, "metrics")
        assert metrics["status"] == "in-use"
        assert f"served by the running service (pid {service.pid}" in metrics["message"]
        assert service.poll() is None
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(30)


# -- invalid options ---------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    ([], "at least one --streamer-id/-S is required"),
    (["-S", "foo/hls"], "must be three parts"),
    ([*S, "--sample", "0"], "--sample must be a positive integer"),
    ([*S, "--file", "/tmp/x.log", "--seconds", "5"], "--seconds reads the exporter"),
    ([*S, "--bogus"], "option --bogus not recognized"),
])
def test_invalid_options_are_one_line_and_exit_status_78(args, message):
    status, _, proc = run_check(*args, text=True)
    assert status == 78
    assert proc.stderr.count("\n") == 1 and message in proc.stderr
    assert proc.stderr.startswith("sfive-ngxlua-check: ")


@pytest.mark.skipif(os.geteuid() != 0, reason="as root only")
def test_an_unknown_user_is_an_invalid_option():
    status, _, proc = run_check(*S, user="no-such-user-here", text=True)
    assert status == 78 and "--user 'no-such-user-here': no such user" in proc.stderr


def test_version():
    status, _, proc = run_check("--version", text=True, user=None)
    assert status == 0 and proc.stdout.startswith("sfive-ngxlua-check 1.")


def test_invalid_options_in_json():
    status, report, _ = run_check("-S", "a/b")
    assert status == 78 and report["status"] == 78
    assert report["verdict"].startswith("invalid options: ")
