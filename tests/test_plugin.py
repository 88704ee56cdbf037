"""The installed twistd plugin, run as operators run it: ``twistd -n sfive-ngxlua ...``.

These tests need the project installed (``pip install .``, not an editable install: see the
README); they run real twistd processes against a real exporter and a real hub socket.
"""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytest_twisted
from helpers.faults import iso
from support import DatagramHub, Exporter, line, wait_for

BIN = Path(sys.executable).parent
TWISTD = str(BIN / "twistd")
TWIST = str(BIN / "twist")
STREAMERS = "C1,C2/hls,dash/high,low"


def iso_now(offset=0.0):
    import time

    return iso(int(time.time() + offset), "Z")


@pytest.mark.parametrize("args, message", [
    (["-S", "a/b"], "must be three parts"),
    ([], "at least one --streamer-id"),
    (["-S", "a/b/c", "-F", "(?P<content>x)"], "lacks the named group(s) format, quality"),
    (["-S", "a/b/c", "-d", "-3"], "--duration must be a positive integer"),
    (["-S", "a/b/c", "-u", "gopher://x/"], "must be an http:// or https:// URL"),
    (["-S", "a/b/c", "--duratoin", "5"], "--duratoin not recognized (did you mean --duration?)"),
    (["-S", "a/b/c", "--hub", "tcp:host=hub"], "'tcp:host=hub': not a client endpoint (tcp needs "
                                              "port=)"),
])
@pytest.mark.parametrize("runner", [TWISTD, TWIST])
def test_bad_options_are_one_line_and_exit_78(tmp_path, runner, args, message):
    """Not twistd's usage text and exit 1: one line saying what is wrong and where the options
    are listed, exit status 78 (EX_CONFIG, which the unit does not restart)."""
    cmd = [runner, "-n", "sfive-ngxlua"] if runner == TWISTD else [runner, "sfive-ngxlua"]
    done = subprocess.run(cmd + args, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 78, done.stdout + done.stderr
    assert done.stdout == ""
    (only,) = done.stderr.splitlines()
    assert only.startswith("sfive-ngxlua: ") and message in only
    assert only.endswith(f"{Path(runner).name} sfive-ngxlua --help lists the options")
    assert not (tmp_path / "twistd.pid").exists()


@pytest.mark.parametrize("runner", [TWISTD, TWIST])
def test_version_is_this_projects(runner):
    from sfive_ngxlua import __version__

    cmd = [runner, "sfive-ngxlua", "--version"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"sfive-ngxlua {__version__} (Twisted ")


@pytest_twisted.inlineCallbacks
def test_twistd_sends_datasets_and_survives_an_exporter_restart(tmp_path):
    exporter = Exporter().listen()
    port = exporter.port.getHost().port
    hub = DatagramHub(str(tmp_path / "hub.sock"))
    proc = subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", "-l", str(tmp_path / "twistd.log"), "sfive-ngxlua",
         "-s", hub.path, "-n", "edge1", "-d", "1", "-t", "tag1", "-S", STREAMERS,
         "-u", exporter.url(), "--grace", "0.2"],
        cwd=tmp_path,
    )
    try:
        yield wait_for(lambda: exporter.streams, timeout=20)
        # a v1 exporter vouches for the intervals once a first valid line came (issue 17 item 4)
        exporter.send(line(iso_now(), url="/another/site"))
        yield wait_for(lambda: len(hub.read()) >= 16, timeout=10)
        datasets = hub.read()
        assert {d["hostname"] for d in datasets} == {"edge1"}
        assert {d["tags"][0] for d in datasets} == {"tag1"}
        assert all(d["version"] == 1 and d["duration-ms"] == 1000 for d in datasets)
        assert {(d["streamer-id"]["content-id"], d["streamer-id"]["format"],
                 d["streamer-id"]["quality"]) for d in datasets} == {
            (c, f, q) for c in ("C1", "C2") for f in ("hls", "dash") for q in ("high", "low")}

        yield exporter.stop()
        exporter = Exporter().listen(number=port)
        yield wait_for(lambda: exporter.streams, timeout=20)
        before = len(hub.read())
        exporter.send(line(iso_now(), ua="after-restart", sent=4242))
        yield wait_for(lambda: any(
            c == {"ip": "10.0.0.1", "user-agent": "after-restart", "bytes-sent": 4242}
            for d in hub.read()[before:] for c in d["data"]["clients"]), timeout=10)
    finally:
        proc.send_signal(signal.SIGTERM)
        yield wait_for(lambda: proc.poll() is not None, timeout=15)
        yield exporter.stop()
        hub.close()
    assert proc.returncode in (0, -signal.SIGTERM), "newer twistd re-raises the signal it got"
    log = (tmp_path / "twistd.log").read_text()
    assert "Server Shut Down." in log
    assert "reconnecting in" in log
    assert "Traceback" not in log
    assert "Starting factory" not in log and "Stopping factory" not in log, \
        "no line per reconnect from Twisted's HTTP client"


@pytest_twisted.inlineCallbacks
def test_sighup_stops_as_sigterm_does_saving_the_state_and_the_queue(tmp_path):
    """A real twistd with a real state dir and no hub yet (datasets wait in the queue): SIGHUP
    saves the running interval and keeps the queue, is logged as a stop on SIGHUP, and the
    process ends by SIGHUP (what the unit's RestartForceExitStatus=SIGHUP restarts). The next
    start delivers the queue and the saved interval: every interval once, none partial, the
    record's bytes once."""
    exporter = Exporter().listen()
    hub_path = str(tmp_path / "hub.sock")
    state = tmp_path / "state"

    def twistd(log, *more):
        return subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "-l", str(log), "sfive-ngxlua", "-s", hub_path,
             "-n", "edge1", "-d", "1", "-S", "C1/hls/high", "-u", exporter.url(),
             "--grace", "0.2", "--state-dir", str(state), *more], cwd=tmp_path)

    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    metrics = free_port()
    proc = twistd(first_log, "--metrics", f"tcp:{metrics}:interface=127.0.0.1")
    hub = None
    try:
        yield wait_for(lambda: exporter.streams, timeout=30, what="the exporter")
        # a v1 exporter vouches for its intervals once a first exporter line came (coverage)
        exporter.send(line(iso_now(), url="/another/site"))

        def reported():
            return first_log.read_text().count(" reported: ") if first_log.exists() else 0

        # after the first interval began (earlier records count as before_start)
        yield wait_for(lambda: reported() >= 1, timeout=30, what="a first interval")
        exporter.send(line(iso_now(), ua="before-hup", sent=4242))
        yield wait_for(lambda: reported() >= 3, timeout=30, what="intervals queued")
        exporter.send(line(iso_now(), ua="before-hup", sent=1000))
        # the fake exporter cannot send it again: it must be read before the HUP
        yield wait_for(lambda: accepted(metrics) == 2, timeout=30, what="the second record")
        hup_at = time.time()
        proc.send_signal(signal.SIGHUP)
        yield wait_for(lambda: proc.poll() is not None, timeout=30, what="the stop on SIGHUP")
        assert proc.returncode == -signal.SIGHUP, "it must end by the signal, for systemd"
        text = first_log.read_text()
        assert "stop on SIGHUP" in text and "state saved in" in text, text
        assert "Traceback" not in text

        hub = DatagramHub(hub_path)
        proc = twistd(second_log)
        yield wait_for(lambda: exporter.streams, timeout=30, what="the exporter")
        exporter.send(line(iso_now(), url="/another/site"))  # v1 vouches again

        def ours():
            return [c["bytes-sent"] for d in hub.read() for c in d["data"]["clients"]
                    if c["user-agent"] == "before-hup"]

        yield wait_for(lambda: sum(ours()) >= 5242, timeout=30, what="the saved records")
        before = [d for d in hub.read() if start_seconds(d) < hup_at]
        starts = [d["start-time"] for d in before]
        assert len(starts) >= 3 and len(set(starts)) == len(starts), starts
        assert all(d["duration-ms"] == 1000 for d in hub.read()), "a partial interval"
        assert sorted(ours()) == [1000, 4242]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            yield wait_for(lambda: proc.poll() is not None, timeout=30)
        yield exporter.stop()
        if hub is not None:
            hub.close()


def start_seconds(dataset):
    from datetime import datetime

    return datetime.fromisoformat(dataset["start-time"].replace("Z", "+00:00")).timestamp()


def free_port():
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def accepted(port):
    """The service's records_accepted_total, from its metrics endpoint (None while it is not
    listening)."""
    import re
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as answer:
            text = answer.read().decode()
    except OSError:
        return None
    found = re.search(r"^sfive_ngxlua_records_accepted_total (\S+)$", text, re.M)
    return float(found.group(1)) if found else None
