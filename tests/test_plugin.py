"""The installed twistd plugin, run as operators run it: ``twistd -n sfive-ngxlua ...``.

These tests need the project installed (``pip install .``, not an editable install: see the
README); they run real twistd processes against a real exporter and a real hub socket.
"""

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_twisted
from helpers.faults import iso
from support import DatagramHub, ExporterServer, line, wait_for

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
])
@pytest.mark.parametrize("runner", [TWISTD, TWIST])
def test_bad_options_are_refused_before_anything_starts(tmp_path, runner, args, message):
    cmd = [runner, "-n", "sfive-ngxlua"] if runner == TWISTD else [runner, "sfive-ngxlua"]
    done = subprocess.run(cmd + args, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert message in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert not (tmp_path / "twistd.pid").exists()


@pytest_twisted.inlineCallbacks
def test_twistd_sends_datasets_and_survives_an_exporter_restart(tmp_path):
    exporter = ExporterServer()
    port = exporter.port.getHost().port
    hub = DatagramHub(str(tmp_path / "hub.sock"))
    proc = subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", "-l", str(tmp_path / "twistd.log"), "sfive-ngxlua",
         "-s", hub.path, "-n", "edge1", "-d", "1", "-t", "tag1", "-S", STREAMERS,
         "-u", exporter.url, "--grace", "0.2"],
        cwd=tmp_path,
    )
    try:
        yield wait_for(lambda: exporter.resource.requests, timeout=20)
        # a v1 exporter vouches for the intervals once a first valid line came (issue 17 item 4)
        exporter.resource.send(line(iso_now(), url="/another/site"))
        yield wait_for(lambda: len(hub.read()) >= 16, timeout=10)
        datasets = hub.read()
        assert {d["hostname"] for d in datasets} == {"edge1"}
        assert {d["tags"][0] for d in datasets} == {"tag1"}
        assert all(d["version"] == 1 and d["duration-ms"] == 1000 for d in datasets)
        assert {(d["streamer-id"]["content-id"], d["streamer-id"]["format"],
                 d["streamer-id"]["quality"]) for d in datasets} == {
            (c, f, q) for c in ("C1", "C2") for f in ("hls", "dash") for q in ("high", "low")}

        yield exporter.stop()
        exporter = ExporterServer(port)
        yield wait_for(lambda: exporter.resource.requests, timeout=20)
        before = len(hub.read())
        exporter.resource.send(line(iso_now(), ua="after-restart", sent=4242))
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
