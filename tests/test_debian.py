"""The Debian package, built and exercised for real.

Builds sfive-ngxlua with dpkg-buildpackage in a copy of the tree and lints
it; installs it with apt-get; runs the service through its init script (no
systemd here) with this test as the hub (a real unix datagram socket) and a
small HTTP server as the exporter; runs the systemd unit's command as its
user against a private nginx that includes the installed exporter files;
then purges the package. The package is per architecture: it ships the C
accelerator, which the running service (confined too) must have loaded. It
changes the host (the package, /etc/default, /dev/log while it runs): run it
as root on a throwaway Debian machine or container, as CI does.

Select it with ``pytest -m debian``; the build's output goes to a log file
whose path is printed, with a line per build step.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = "sfive-ngxlua"
INIT = f"/etc/init.d/{PKG}"
DEFAULT = Path(f"/etc/default/{PKG}")
PIDFILE = Path(f"/run/{PKG}/{PKG}.pid")
PLUGIN = Path("/usr/lib/python3/dist-packages/twisted/plugins/sfive_ngxlua_plugin.py")
PLUGIN_CACHE = PLUGIN.parent / "dropin.cache"
# Debian's own tools and interpreter, not a venv's or pyenv's python3.
CLEAN_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": os.environ.get("HOME", "/root"),
    "LANG": "C.UTF-8",
    "DEBIAN_FRONTEND": "noninteractive",
}

DECODED_BY_C = "lines decoded by the C accelerator (c)"  # the service's line at its start
HOSTNAME = "debtest-host"
TAG = "debian-test"
CLIENT = "192.0.2.7"
UA = "debtest/1.0"
STREAM_URL = "/live/hls/test-high/seg{seq}.ts"
STREAMER_ID = {"content-id": "test", "format": "hls", "quality": "high"}

pytestmark = [
    pytest.mark.debian,
    pytest.mark.timeout(300),
    pytest.mark.skipif(
        shutil.which("dpkg-buildpackage") is None,
        reason="dpkg-buildpackage is not available (not a Debian build host)",
    ),
    pytest.mark.skipif(
        shutil.which("apt-get") is None or os.geteuid() != 0,
        reason="installing the package needs apt-get and root",
    ),
]


@pytest.fixture(scope="module")
def say(request: pytest.FixtureRequest):
    """Print a progress line past pytest's output capture."""
    capman = request.config.pluginmanager.getplugin("capturemanager")

    def say(message: str) -> None:
        with capman.global_and_fixture_disabled():
            print(f"[debian] {message}", flush=True)

    return say


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run a command with Debian's environment, output captured as text."""
    kwargs.setdefault("env", CLEAN_ENV)
    return subprocess.run(cmd, capture_output=True, text=True, **kwargs)


def copy_tree(dest: Path) -> None:
    """Copy the source tree (tracked and untracked, not ignored files)."""
    if (ROOT / ".git").exists():
        listing = subprocess.run(
            ["git", "-C", str(ROOT), "ls-files", "-z", "-co", "--exclude-standard"],
            check=True, capture_output=True,
        ).stdout.decode()
        for name in filter(None, listing.split("\0")):
            src = ROOT / name
            if src.is_file():
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / name)
    else:
        shutil.copytree(
            ROOT, dest, dirs_exist_ok=True,
            ignore=shutil.ignore_patterns(
                ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                "dropin.cache", ".debhelper", "debhelper-build-stamp",
            ),
        )


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, say) -> Path:
    """Build the package in a copy of the tree; return the directory of the results."""
    out = tmp_path_factory.mktemp("deb")
    src = out / "src"
    src.mkdir()
    copy_tree(src)
    log = out / "build.log"
    say(f"building with dpkg-buildpackage -us -uc -b in {src} (log: {log})")
    started = time.monotonic()
    with open(log, "w") as logf:
        proc = subprocess.Popen(
            ["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=src, env=CLEAN_ENV,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            logf.write(line)
            step = re.match(r"\s+(dh_\w+|debian/rules \S+)", line)
            if step:
                say(f"  {step.group(1)}")
        rc = proc.wait()
    tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
    assert rc == 0, f"dpkg-buildpackage failed ({rc}); end of {log}:\n{tail}"
    say(f"built in {time.monotonic() - started:.1f}s: "
        + ", ".join(sorted(p.name for p in out.iterdir() if p.is_file())))
    return out


def the(directory: Path, pattern: str) -> Path:
    (found,) = directory.glob(pattern)
    return found


def host_arch() -> str:
    return run(["dpkg", "--print-architecture"]).stdout.strip()


def deb_file(built: Path) -> Path:
    """The package's .deb: per architecture, since it ships the C accelerator."""
    return the(built, f"{PKG}_*_{host_arch()}.deb")


def accelerator(python: str = "/usr/bin/python3") -> str:
    """Where the package installs the C accelerator (sfive_ngxlua._speedups) for ``python``."""
    suffix = run([python, "-c", "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))"])
    assert suffix.returncode == 0 and suffix.stdout.startswith(".cpython-"), suffix
    return f"/usr/lib/python3/dist-packages/sfive_ngxlua/_speedups{suffix.stdout.strip()}"


def check_accelerator_loaded(pid: int) -> None:
    """The running service has the installed accelerator mapped (not the pure-Python path
    alone); under the confined unit, despite MemoryDenyWriteExecute= and the syscall filter."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert f" {accelerator()}\n" in maps, (
        f"the service (pid {pid}) has not loaded {accelerator()}:\n"
        + "".join(line + "\n" for line in maps.splitlines() if ".so" in line))


def test_lintian_clean(built: Path, say) -> None:
    assert shutil.which("lintian"), "lintian is not installed (apt-get install lintian)"
    changes = the(built, f"{PKG}_*.changes")
    say(f"lintian {changes.name}")
    default = run(["lintian", str(changes)])
    assert default.returncode == 0, default.stdout + default.stderr
    assert not re.findall(r"^[EW]: .*$", default.stdout, re.M), default.stdout
    # Also clean at every level; the two overridden tags carry a reason in
    # debian/sfive-ngxlua.lintian-overrides.
    strict = run(["lintian", "--pedantic", "-I", "-E", str(changes)])
    assert not re.findall(r"^[EWIPX]: .*$", strict.stdout, re.M), strict.stdout


def test_deb_contents(built: Path) -> None:
    listing = run(["dpkg-deb", "-c", str(deb_file(built))]).stdout
    for path in (
        "./etc/init.d/sfive-ngxlua",
        "./etc/default/sfive-ngxlua",
        "./lib/systemd/system/sfive-ngxlua.service",
        "./usr/bin/sfive-ngxlua-replay",
        "./usr/bin/sfive-ngxlua-nginx-conf",
        "./usr/share/man/man1/sfive-ngxlua-nginx-conf.1.gz",
        "./usr/lib/python3/dist-packages/sfive_ngxlua/tap.py",
        "./usr/lib/python3/dist-packages/twisted/plugins/sfive_ngxlua_plugin.py",
        "./usr/lib/python3/dist-packages/sfive_ngxlua/service.py",
        "./usr/share/man/man8/sfive-ngxlua.8.gz",
        "./usr/share/man/man1/sfive-ngxlua-replay.1.gz",
        "./usr/share/sfive-ngxlua/nginx/sfive.lua",
        "./usr/share/sfive-ngxlua/nginx/sfive.conf",
        "./usr/share/sfive-ngxlua/nginx/sfive-location.conf",
    ):
        assert f" {path}\n" in listing, f"{path} missing from the package"
    # The C accelerator, built for every python3 Debian supports; so the package is for one
    # architecture and one range of python3 (dh_python3's), and needs what it links to.
    for python in run(["py3versions", "-s"]).stdout.split():
        assert f" .{accelerator(python)}\n" in listing, f"no accelerator for {python}"
    fields = run(["dpkg-deb", "-f", str(deb_file(built)), "Architecture", "Depends"]).stdout
    assert f"Architecture: {host_arch()}\n" in fields, fields
    assert re.search(r"python3 \(<< 3\.\d+\), python3 \(>= 3\.\d+~\)", fields), fields
    assert re.search(r"\blibc6 \(>= [\d.]+\)", fields), fields  # ${shlibs:Depends}
    # compressed by dh_compress once it is over 4 kB (policy 12.3)
    assert re.search(r" \./usr/share/doc/sfive-ngxlua/README\.Debian(\.gz)?\n", listing)
    assert "dropin.cache" not in listing
    assert "dist-packages/sfive_ngxlua/nginx/" not in listing, "a second copy of the nginx files"
    assert "twisted/plugins/__init__.py" not in listing
    assert "/tests/" not in listing


class Exporter(ThreadingHTTPServer):
    """A stand-in for the nginx exporter: GET /sfive streams a record every 50 ms."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), ExporterHandler)
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.seq = 0
        self.sent: list[tuple[datetime, dict]] = []
        self.connections = 0

    def next_record(self) -> dict:
        with self.lock:
            self.seq += 1
            seq = self.seq
        now = datetime.now().astimezone()
        record = {
            "seq": seq,
            "time": now.isoformat(timespec="milliseconds"),
            "client": CLIENT,
            "ua": UA,
            "url": STREAM_URL.format(seq=seq),
            "status": 200,
            "bytes-sent": 1000 + seq,
        }
        # Every fifth record must not count: another URL, or a 404.
        if seq % 5 == 0:
            record["url"] = "/favicon.ico"
        elif seq % 5 == 1:
            record["status"] = 404
        return record


class ExporterHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Exporter

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.split("?")[0] != "/sfive":
            self.send_error(404)
            return
        self.server.connections += 1
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            while not self.server.stopping.wait(0.05):
                record = self.server.next_record()
                data = (json.dumps(record) + "\n").encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
                with self.server.lock:
                    self.server.sent.append((datetime.fromisoformat(record["time"]), record))
        except OSError:
            pass

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        pass


@pytest.fixture
def exporter() -> Iterator[Exporter]:
    server = Exporter()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.stopping.set()
    server.shutdown()
    server.server_close()


@pytest.fixture
def hub() -> Iterator[socket.socket]:
    """The hub's datagram socket, in a directory the service user can reach."""
    directory = Path(tempfile.mkdtemp(prefix="sfive-hub-"))
    directory.chmod(0o755)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = directory / "pipegram"
    sock.bind(str(path))
    path.chmod(0o666)
    yield sock
    sock.close()
    shutil.rmtree(directory)


class SyslogCapture:
    """Bind /dev/log when no syslog daemon has, and keep what twistd logs."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.sock: socket.socket | None = None
        self.stopping = threading.Event()
        if os.path.exists("/dev/log"):
            return
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("/dev/log")
        os.chmod("/dev/log", 0o666)
        self.sock.settimeout(0.1)
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        assert self.sock is not None
        while not self.stopping.is_set():
            try:
                self.lines.append(self.sock.recv(65536).decode(errors="replace"))
            except socket.timeout:
                continue
            except OSError:
                return

    def text(self) -> str:
        if self.sock is None:
            return "(/dev/log belongs to this host's syslog daemon: see its logs)"
        return "\n".join(self.lines[-40:]) or "(nothing logged)"

    def close(self) -> None:
        if self.sock is not None:
            self.stopping.set()
            self.thread.join(2)
            self.sock.close()
            os.unlink("/dev/log")


@pytest.fixture
def syslog() -> Iterator[SyslogCapture]:
    capture = SyslogCapture()
    yield capture
    capture.close()


def installed() -> bool:
    status = run(["dpkg-query", "-W", "-f=${Status}", PKG])
    return status.returncode == 0 and status.stdout.endswith(" installed")


def init(action: str) -> subprocess.CompletedProcess:
    return run([INIT, action], timeout=60)


def wait_for(predicate, deadline: float, what: str, detail=lambda: "") -> None:
    """Poll predicate every 50 ms until it holds or deadline (a monotonic time) passes."""
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}\n{detail()}")
        time.sleep(0.05)


def pid_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def proc_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid in /proc/{pid}/status")


def receive_datasets(sock: socket.socket, into: list[dict], until: float) -> None:
    sock.settimeout(0.1)
    while time.monotonic() < until:
        try:
            datagram = sock.recv(1 << 20)
        except socket.timeout:
            return
        assert datagram.endswith(b"\n"), f"dataset without its newline: {datagram[:200]!r}"
        into.append(json.loads(datagram))


def expected_bytes(exporter: Exporter, start: datetime, duration: timedelta) -> int:
    with exporter.lock:
        return sum(
            record["bytes-sent"]
            for when, record in exporter.sent
            if start <= when < start + duration
            and record["status"] in (200, 206)
            and record["url"].startswith("/live/hls/test-high/")
        )


def test_install_run_purge(built: Path, exporter: Exporter, hub: socket.socket,
                           syslog: SyslogCapture, say) -> None:
    deb = deb_file(built)
    if installed():
        say("purging an earlier installation")
        assert run(["apt-get", "purge", "-y", PKG]).returncode == 0
    say(f"apt-get install -y ./{deb.name}")
    result = run(["apt-get", "install", "-y", f"./{deb.name}"], cwd=built, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    try:
        exercise(exporter, hub, syslog, say)
    finally:
        if installed():
            init("stop")
            say(f"apt-get purge -y {PKG}")
            purge = run(["apt-get", "purge", "-y", PKG], timeout=120)
            assert purge.returncode == 0, purge.stdout + purge.stderr
    check_purged()


def exercise(exporter: Exporter, hub: socket.socket, syslog: SyslogCapture, say) -> None:
    user = pwd.getpwnam(PKG)
    assert user.pw_dir == "/nonexistent" and user.pw_uid < 1000
    log_dir = Path(f"/var/log/{PKG}")
    assert log_dir.is_dir() and log_dir.stat().st_uid == user.pw_uid
    # python3-twisted's trigger rebuilt the plugin cache, which the
    # unprivileged service cannot write itself.
    assert b"sfive_ngxlua_plugin" in PLUGIN_CACHE.read_bytes()
    assert Path(f"/etc/systemd/system/multi-user.target.wants/{PKG}.service").is_symlink()

    check_replay()
    # Debian's python3 imports the accelerator from the installed files (cwd /: not a tree's)
    # and the parsers decode with it.
    imported = run(["/usr/bin/python3", "-c", "from sfive_ngxlua import _speedups, records; "
                    "print(_speedups.__file__, records.default_decoder())"], cwd="/")
    assert imported.returncode == 0, imported.stdout + imported.stderr
    assert imported.stdout.split() == [accelerator(), "c"]

    if shutil.which("systemd-analyze"):
        # It checks Documentation=man:... with man(1), when that is installed.
        man = [] if shutil.which("man") else ["--man=no"]
        verify = run(["systemd-analyze", "verify", *man, f"/lib/systemd/system/{PKG}.service"])
        assert verify.returncode == 0, verify.stdout + verify.stderr
        say("systemd-analyze verify: unit ok")

    # A start on install (where policy-rc.d allows it) used the example
    # settings; begin from a stopped service.
    init("stop")
    sock_path = hub.getsockname()
    url = f"http://127.0.0.1:{exporter.server_address[1]}/sfive"
    options = (f"-s {sock_path} -u {url} -S test/hls/high -n {HOSTNAME} -t {TAG} -d 1")
    set_daemon_opts(options)

    say(f"{INIT} start (DAEMON_OPTS={options})")
    started = init("start")
    assert started.returncode == 0, started.stdout + started.stderr + syslog.text()
    wait_for(PIDFILE.exists, time.monotonic() + 10, "the pidfile", syslog.text)
    pid = int(PIDFILE.read_text())
    assert pid_running(pid)
    assert proc_uid(pid) == user.pw_uid, "the service does not run as its user"
    assert PIDFILE.stat().st_uid == user.pw_uid
    status = init("status")
    assert status.returncode == 0, status.stdout + status.stderr
    again = init("start")
    assert again.returncode == 0 and int(PIDFILE.read_text()) == pid

    say("waiting for datasets on the hub socket")
    datasets: list[dict] = []
    deadline = time.monotonic() + 30
    ours = []
    while True:
        receive_datasets(hub, datasets, deadline)
        ours = [d for d in datasets if d.get("streamer-id") == STREAMER_ID]
        if len([d for d in ours if d["data"]["bytes-sent"] > 0]) >= 2:
            break
        if time.monotonic() > deadline:
            pytest.fail(f"no datasets with data within 30 s; got {datasets!r}\n"
                        f"exporter connections: {exporter.connections}\n{syslog.text()}")
    say(f"{len(datasets)} datasets received")
    check_accelerator_loaded(pid)
    assert len(ours) == len(datasets), "datasets for an unconfigured stream"
    for dataset in ours:
        assert dataset["version"] == 1
        assert dataset["hostname"] == HOSTNAME
        assert dataset["tags"] == [TAG]
        assert dataset["duration-ms"] == 1000
        assert {"start-time", "data"} <= dataset.keys()
        assert {"clients", "client-count", "bytes-sent"} <= dataset["data"].keys()
    # The latest interval with data began after the first one: the exporter
    # had been streaming to the service all through it.
    last = [d for d in ours if d["data"]["bytes-sent"] > 0][-1]
    want = expected_bytes(exporter, start_of(last), timedelta(seconds=1))
    assert last["data"]["bytes-sent"] == want
    assert last["data"]["client-count"] == 1
    assert last["data"]["clients"] == [{"ip": CLIENT, "user-agent": UA, "bytes-sent": want}]
    if syslog.sock is not None:
        assert any("sfive-ngxlua" in line for line in syslog.lines), syslog.text()
        assert any(DECODED_BY_C in line for line in syslog.lines), syslog.text()

    say(f"{INIT} restart")
    restarted = init("restart")
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr + syslog.text()
    wait_for(PIDFILE.exists, time.monotonic() + 10, "the pidfile after restart", syslog.text)
    new_pid = int(PIDFILE.read_text())
    assert new_pid != pid and not pid_running(pid) and pid_running(new_pid)

    say(f"{INIT} stop")
    stopped = init("stop")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert not PIDFILE.exists()
    wait_for(lambda: not pid_running(new_pid), time.monotonic() + 5, "the process to end")
    assert init("status").returncode == 3
    if syslog.sock is not None:
        assert not [line for line in syslog.lines if "Traceback" in line or "Unhandled" in line], (
            syslog.text()
        )

    check_start_up_errors(user, say)
    run_unit_command(hub, user, say)


def check_start_up_errors(user: pwd.struct_passwd, say) -> None:
    """Debian's twistd3 (Twisted 22.4): an invalid option is one line and exit 78, through the
    unit's command and through the init script (exit 6, the line shown); --version is this
    project's; the unit does not restart on 78, restarts after SIGHUP and has no reload."""
    unit = Path(f"/lib/systemd/system/{PKG}.service").read_text()
    assert re.search(r"^RestartPreventExitStatus=78$", unit, re.M)
    assert re.search(r"^RestartForceExitStatus=SIGHUP$", unit, re.M)
    assert not re.search(r"^ExecReload=", unit, re.M)
    version = run(["twistd3", PKG, "--version"], timeout=60)
    assert version.returncode == 0 and version.stdout.startswith(
        "sfive-ngxlua 1.0.0 (Twisted 22."), version.stdout + version.stderr
    for command in (["twistd3", PKG], [f"{PKG}-replay"], [f"{PKG}-check"]):
        version = run([*command, "--version"], timeout=60)
        assert version.stdout.endswith("lines decoded by c)\n"), version.stdout + version.stderr
    nginx_conf = run(["sfive-ngxlua-nginx-conf"], timeout=60)
    assert nginx_conf.returncode == 0, nginx_conf.stderr
    assert "files are in /usr/share/sfive-ngxlua/nginx/" in nginx_conf.stdout, nginx_conf.stdout
    assert "include /usr/share/sfive-ngxlua/nginx/sfive.conf;" in nginx_conf.stdout

    set_daemon_opts("-S test/hls -s /run/sfive/pipegram --duratoin 5")
    command = unit_command()
    bad = run(["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups",
               *command], cwd="/", timeout=60)
    assert bad.returncode == 78, bad.stdout + bad.stderr
    assert bad.stdout == "" and bad.stderr == (
        "sfive-ngxlua: option --duratoin not recognized (did you mean --duration?); "
        "twistd3 sfive-ngxlua --help lists the options\n")
    set_daemon_opts("-S test/hls -s /run/sfive/pipegram")
    started = init("start")
    assert started.returncode == 6, started.stdout + started.stderr
    assert started.stderr.splitlines() == [
        "sfive-ngxlua: streamer id 'test/hls': must be three parts CONTENT/FORMAT/QUALITY "
        "separated by '/'; twistd3 sfive-ngxlua --help lists the options"], started.stderr
    assert not PIDFILE.exists() and init("status").returncode == 3
    say("an invalid option: one line, exit 78 (the init script: 6, with the line)")


def check_replay() -> None:
    """The installed console script, on Debian's interpreter, replays lines from stdin."""
    lines = [
        {"seq": 1, "time": "2026-11-28T10:00:01.250+01:00", "client": CLIENT, "ua": UA,
         "url": "/live/hls/test-high/seg1.ts", "status": 200, "bytes-sent": 1500},
        {"seq": 2, "time": "2026-11-28T10:00:07.000+01:00", "client": CLIENT, "ua": UA,
         "url": "/live/hls/test-high/seg2.ts", "status": 206, "bytes-sent": 2500},
        {"seq": 3, "time": "2026-11-28T10:00:08.000+01:00", "client": CLIENT, "ua": UA,
         "url": "/live/hls/test-high/seg3.ts", "status": 404, "bytes-sent": 99},
    ]
    stdin = "".join(json.dumps(line) + "\n" for line in lines) + "not json\n"
    replay = run(["sfive-ngxlua-replay", "-S", "test/hls/high", "-n", HOSTNAME, "-d", "10", "-"],
                 input=stdin, timeout=30)
    assert replay.returncode == 0, replay.stdout + replay.stderr
    (dataset,) = map(json.loads, replay.stdout.splitlines())
    assert dataset["start-time"] == "2026-11-28T09:00:00Z"
    assert dataset["hostname"] == HOSTNAME and dataset["streamer-id"] == STREAMER_ID
    assert dataset["data"]["bytes-sent"] == 4000
    assert replay.stderr.strip(), "no summary on standard error"


def unit_command() -> list[str]:
    """The unit's ExecStart, expanded the way systemd does from its Environment settings."""
    unit = Path(f"/lib/systemd/system/{PKG}.service").read_text()
    env: dict[str, str] = {}
    for value in re.findall(r"^Environment=(.*)$", unit, re.M):
        for assignment in shlex.split(value):
            key, _, val = assignment.partition("=")
            env[key] = val
    (env_file,) = re.findall(r"^EnvironmentFile=-?(.*)$", unit, re.M)
    for line in Path(env_file).read_text().splitlines():
        if re.match(r"^[A-Z_]+=", line):
            key, _, val = line.partition("=")
            env[key] = " ".join(shlex.split(val))
    (exec_start,) = re.findall(r"^ExecStart=(.*)$", unit, re.M)
    words: list[str] = []
    for word in exec_start.split():
        words.extend(env.get(word[1:], "").split() if word.startswith("$") else [word])
    return words


NGINX_CONF = """\
daemon off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
load_module /usr/lib/nginx/modules/ndk_http_module.so;
load_module /usr/lib/nginx/modules/ngx_http_lua_module.so;
events {{ worker_connections 64; }}
http {{
    log_format bytes '$status $bytes_sent $uri';
    access_log {prefix}/access.log bytes;
    include /usr/share/sfive-ngxlua/nginx/sfive.conf;
    server {{
        listen 127.0.0.1:{port};
        root {prefix}/www;
        include /usr/share/sfive-ngxlua/nginx/sfive-location.conf;
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Nginx:
    """A private nginx on a loopback port that includes the installed exporter files."""

    def __init__(self) -> None:
        self.prefix = Path(tempfile.mkdtemp(prefix="sfive-nginx-"))
        self.prefix.chmod(0o755)
        media = self.prefix / "www/live/hls/test-high"
        media.mkdir(parents=True)
        (media / "seg1.ts").write_bytes(bytes(range(256)) * 40)
        for directory in (self.prefix, self.prefix / "www", media.parent, media.parent.parent):
            directory.chmod(0o755)
        self.port = free_port()
        conf = self.prefix / "nginx.conf"
        conf.write_text(NGINX_CONF.format(prefix=self.prefix, port=self.port))
        error_log = self.prefix / "error.log"
        self.proc = subprocess.Popen(
            ["nginx", "-p", str(self.prefix), "-c", str(conf), "-e", str(error_log)],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        wait_for(self._up, time.monotonic() + 10, "nginx to listen", self.error_log)

    def _up(self) -> bool:
        assert self.proc.poll() is None, f"nginx exited: {self.error_log()}"
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return False
        return True

    def get(self, path: str) -> int:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}",
                                         headers={"User-Agent": UA})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                response.read()
                return response.status
        except urllib.error.HTTPError as error:
            error.read()
            return error.code

    def served(self, prefix: str) -> tuple[int, int]:
        """(requests, bytes) with status 200 under ``prefix``, from nginx's access log."""
        count = total = 0
        for line in (self.prefix / "access.log").read_text().splitlines():
            status, sent, uri = line.split(" ", 2)
            if status == "200" and uri.startswith(prefix):
                count += 1
                total += int(sent)
        return count, total

    def bytes_sent(self, prefix: str) -> int:
        return self.served(prefix)[1]

    def error_log(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text()[-3000:] if path.exists() else ""

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.prefix)


def nginx_with_lua() -> bool:
    return shutil.which("nginx") is not None and all(
        Path("/usr/lib/nginx/modules", name).exists()
        for name in ("ndk_http_module.so", "ngx_http_lua_module.so")
    )


def set_daemon_opts(options: str) -> None:
    text, count = re.subn(r"^DAEMON_OPTS=.*$", f'DAEMON_OPTS="{options}"', DEFAULT.read_text(),
                          flags=re.M)
    assert count == 1, "no DAEMON_OPTS= line in the shipped default file"
    DEFAULT.write_text(text)


def run_unit_command(hub: socket.socket, user: pwd.struct_passwd, say) -> None:
    """Run the unit's command as its User= in the foreground (no systemd here).

    Its exporter is a real nginx running the installed exporter files, so the datasets must
    add up to what nginx's access log says it sent.
    """
    unit = Path(f"/lib/systemd/system/{PKG}.service").read_text()
    assert f"User={PKG}" in unit and "/var/run" not in unit
    if not nginx_with_lua():
        pytest.fail("nginx with its Lua module is not installed "
                    "(apt-get install nginx libnginx-mod-http-lua)")
    nginx = Nginx()
    try:
        url = f"http://127.0.0.1:{nginx.port}/sfive"
        metrics = free_port()  # python3-prometheus-client comes in as a Recommends
        set_daemon_opts(f"-s {hub.getsockname()} -u {url} -S test/hls/high -n {HOSTNAME} -d 1"
                        f" --metrics tcp:{metrics}:interface=127.0.0.1")
        command = unit_command()
        assert command[:3] == ["/usr/bin/twistd3", "--nodaemon", "--pidfile="]
        say("the unit's command in the foreground, fed by nginx with the installed exporter: "
            + " ".join(command))
        while True:  # drop what the init script's service sent
            try:
                hub.recv(1 << 20)
            except OSError:
                break
        proc = subprocess.Popen(
            ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups",
             *command],
            cwd="/", env={"PATH": CLEAN_ENV["PATH"], "HOME": user.pw_dir, "LANG": "C.UTF-8"},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        try:
            exercise_unit_command(proc, hub, nginx)
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as r:
                exposition = r.read().decode()
            sent = re.search(r"^sfive_ngxlua_datasets_sent_total (\S+)$", exposition, re.M)
            assert sent and float(sent.group(1)) >= 1, exposition[:2000]
        finally:
            proc.terminate()
            output = proc.communicate(timeout=10)[0]
        # twistd ends itself with the signal that stopped it; systemd counts SIGTERM as clean.
        assert proc.returncode in (0, -signal.SIGTERM), output
        assert not Path("/twistd.pid").exists()
    finally:
        nginx.stop()


def exercise_unit_command(proc: subprocess.Popen, hub: socket.socket, nginx: Nginx) -> None:
    datasets: list[dict] = []
    deadline = time.monotonic() + 15
    # The first dataset shows the service is up (and long since subscribed to the stream).
    while not datasets and proc.poll() is None and time.monotonic() < deadline:
        receive_datasets(hub, datasets, deadline)
    assert proc.poll() is None, f"the unit's command exited: {proc.communicate()[0]}"
    assert datasets, f"no dataset within 15 s\n{nginx.error_log()}"
    began = datetime.now().astimezone()
    for _ in range(10):
        assert nginx.get("/live/hls/test-high/seg1.ts") == 200
        assert nginx.get("/live/hls/test-high/missing.ts") == 404  # must not count
    ended = datetime.now().astimezone()

    def reported_past_end() -> bool:
        return any(start_of(d) > ended for d in datasets)

    while not reported_past_end() and time.monotonic() < deadline:
        receive_datasets(hub, datasets, deadline)
    assert reported_past_end(), f"datasets stopped: {datasets!r}\n{nginx.error_log()}"
    counted = [d for d in datasets
               if start_of(d) + timedelta(milliseconds=d["duration-ms"]) > began]
    total = sum(d["data"]["bytes-sent"] for d in counted)
    assert total == nginx.bytes_sent("/live/hls/test-high/") > 10 * 10240
    clients = {(c["ip"], c["user-agent"]) for d in counted for c in d["data"]["clients"]}
    assert clients == {("127.0.0.1", UA)}


def start_of(dataset: dict) -> datetime:
    return datetime.fromisoformat(dataset["start-time"].replace("Z", "+00:00"))


def check_purged() -> None:
    assert not installed()
    for path in (
        DEFAULT, Path(INIT), Path(f"/var/log/{PKG}"), Path(f"/run/{PKG}"), PLUGIN,
        Path("/usr/lib/python3/dist-packages/sfive_ngxlua"), Path("/usr/bin/sfive-ngxlua-replay"),
        Path(f"/usr/share/{PKG}"),
    ):
        assert not path.exists(), f"{path} survived the purge"
    assert not list(Path("/etc").glob(f"rc?.d/*{PKG}")), "rc links survived the purge"
    assert not list(Path("/etc/systemd/system").rglob(f"{PKG}.service")), "unit still enabled"
    # The system user is kept on purge, as README.Debian explains.
    assert pwd.getpwnam(PKG).pw_dir == "/nonexistent"


def test_state_dir_made_private_by_the_init_script_and_removed_on_purge() -> None:
    """The shipped options keep the state in /var/lib/sfive-ngxlua; the init script makes it
    0700 for the service user (the unit has StateDirectory=); purge removes it; the retire
    command ships with its man page."""
    init = (ROOT / "debian" / f"{PKG}.init").read_text()
    assert "STATEDIR=/var/lib/$NAME" in init
    assert "install -d -o $USER -g $USER -m 0700 $STATEDIR || return 2" in init
    default = (ROOT / "debian" / f"{PKG}.default").read_text()
    (opts,) = re.findall(r'^DAEMON_OPTS="(.*)"$', default, re.M)
    assert "--state-dir /var/lib/sfive-ngxlua" in opts
    postrm = (ROOT / "debian" / f"{PKG}.postrm").read_text()
    assert re.search(r"purge\)\n(.*\n)*\s+rm -rf /var/lib/sfive-ngxlua\n", postrm)
    assert "debian/sfive-ngxlua-retire.8" in (ROOT / "debian" / f"{PKG}.manpages").read_text()
    assert "sfive-ngxlua-retire = sfive_ngxlua.retire:main" in (ROOT / "setup.cfg").read_text()


# The confined unit (issue 14).

UNIT_SOURCE = ROOT / "debian" / f"{PKG}.service"
CONFINE = ROOT / "tests" / "helpers" / "confine.py"
STATE_DIR = Path(f"/var/lib/{PKG}")
RUN_DIR = Path(f"/run/{PKG}")
# Under /run: the unit's private /tmp hides the host's /tmp (README.Debian).
CONFINED_HUB = Path("/run/sfive-debtest")


def security(unit: Path) -> tuple[float, dict[str, float]]:
    """systemd-analyze's overall exposure of a unit file, and the items it counts as open."""
    assert shutil.which("systemd-analyze"), "systemd-analyze is not installed (package systemd)"
    result = run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)])
    assert result.returncode == 0, result.stdout + result.stderr
    overall = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert overall, result.stdout
    items = {m.group(1): float(m.group(2))
             for m in re.finditer(r"^✗ (\S+)\s.*?(\d+\.\d+)\s*$", result.stdout, re.M)}
    return float(overall.group(1)), items


def test_unit_security_exposure_is_at_most_2_and_every_open_item_is_explained() -> None:
    exposure, items = security(UNIT_SOURCE)
    assert exposure <= 2.0, (exposure, items)
    text = UNIT_SOURCE.read_text()
    comments = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    unexplained = [name for name in items if name not in comments]
    assert not unexplained, f"open items without a comment in the unit: {unexplained}"
    # what the state and access-log work needs
    assert re.search(r"^StateDirectory=sfive-ngxlua$", text, re.M)
    assert re.search(r"^StateDirectoryMode=0700$", text, re.M)
    (after,) = re.findall(r"^After=(.*)$", text, re.M)
    assert {"network.target", "nginx.service", "time-sync.target"} <= set(after.split())
    assert re.search(r"^ProtectSystem=strict$", text, re.M)  # /var/log/nginx stays readable


def systemd_running() -> bool:
    return Path("/run/systemd/system").is_dir()


def test_confined_unit_does_its_whole_job(built: Path, syslog: SyslogCapture, say) -> None:
    """The installed unit, confined, sends exact datasets from a real nginx to the hub's
    socket, answers on its metrics port, and writes its state directory privately.

    Under systemd (PID 1) the unit itself is started. Without it (a container) the unit's
    ExecStart runs under tests/helpers/confine.py, which applies what can be had without
    systemd (its docstring lists what it cannot: PrivateUsers=, ProtectProc=, the cgroup
    BPF IP and device filters, and a few seccomp-based ones)."""
    deb = deb_file(built)
    if installed():
        assert run(["apt-get", "purge", "-y", PKG]).returncode == 0
    say(f"apt-get install -y ./{deb.name} (confined unit)")
    result = run(["apt-get", "install", "-y", f"./{deb.name}"], cwd=built, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    CONFINED_HUB.mkdir(mode=0o755, exist_ok=True)
    hub = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        hub.bind(str(CONFINED_HUB / "pipegram"))
        (CONFINED_HUB / "pipegram").chmod(0o666)
        hub.settimeout(0.1)
        exercise_confined(hub, syslog, say)
    finally:
        hub.close()
        shutil.rmtree(CONFINED_HUB, ignore_errors=True)
        # client addresses: never left behind on the test machine, whatever the purge does
        shutil.rmtree(STATE_DIR, ignore_errors=True)
        if installed():
            init("stop")
            if systemd_running():
                run(["systemctl", "stop", PKG])
            purge = run(["apt-get", "purge", "-y", PKG], timeout=120)
            assert purge.returncode == 0, purge.stdout + purge.stderr
    check_purged()


class ConfinedService:
    """The confined service: the unit under systemd, or its command under confine.py."""

    def __init__(self, user: pwd.struct_passwd) -> None:
        self.user = user
        self.proc: subprocess.Popen | None = None
        if systemd_running():
            assert run(["systemctl", "daemon-reload"]).returncode == 0
            started = run(["systemctl", "restart", PKG])
            assert started.returncode == 0, started.stdout + started.stderr
            shown = run(["systemctl", "show", "-p", "MainPID", "--value", PKG]).stdout
            self.pid = int(shown.strip())
            return
        # What systemd makes before ExecStart: RuntimeDirectory= and StateDirectory=.
        for path, mode in ((RUN_DIR, "0755"), (STATE_DIR, "0700")):
            made = run(["install", "-d", "-o", PKG, "-g", PKG, "-m", mode, str(path)])
            assert made.returncode == 0, made.stderr
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--uts", "--ipc", "--propagation", "private",
             "/usr/bin/python3", str(CONFINE), f"/lib/systemd/system/{PKG}.service", PKG,
             "--", *unit_command()],
            cwd="/", env=CLEAN_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.pid = self.proc.pid  # unshare and confine.py exec: the same process

    def poll(self) -> int | None:
        if self.proc is not None:
            return self.proc.poll()
        return None if run(["systemctl", "is-active", "--quiet", PKG]).returncode == 0 else 1

    def communicate(self, timeout: float = 10) -> tuple[str, None]:
        if self.proc is not None:
            return self.proc.communicate(timeout=timeout)[0], None
        return run(["journalctl", "-u", PKG, "-n", "50", "--no-pager"]).stdout, None

    def stop(self, sig: int = signal.SIGTERM) -> str:
        """Stop it with ``sig`` (under systemd: systemctl stop)."""
        if self.proc is None:
            assert run(["systemctl", "stop", PKG]).returncode == 0
            return self.communicate()[0]
        self.proc.send_signal(sig)
        output = self.proc.communicate(timeout=15)[0]
        # twistd ends itself with the signal that stopped it (SIGTERM: systemd counts it as
        # clean; SIGHUP: the unit's RestartForceExitStatus=SIGHUP restarts it).
        allowed = (0, -signal.SIGTERM) if sig == signal.SIGTERM else (-sig,)
        assert self.proc.returncode in allowed, output
        return output


def status_fields(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def check_confined(pid: int, user: pwd.struct_passwd) -> None:
    """What the kernel says about the running service."""
    def exec_done() -> bool:  # confine.py (with twistd3 among its arguments) has exec'd
        words = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
        return CONFINE.name not in " ".join(words) and "/usr/bin/twistd3" in words

    wait_for(exec_done, time.monotonic() + 10, "the confined exec of twistd3")
    status = status_fields(pid)
    assert status["Uid"].split()[0] == str(user.pw_uid)
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2", "no system call filter"
    assert int(status["CapBnd"], 16) == 0 and int(status["CapEff"], 16) == 0
    assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    options = {}
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        options[fields[4]] = fields[5].split(",")
    assert "ro" in options["/"] and "ro" in options.get("/etc", options["/"])
    assert "rw" in options[str(STATE_DIR)]
    assert "/tmp" in options  # private /tmp


def check_state_modes(user: pwd.struct_passwd) -> list[str]:
    """The state directory 0700 and every file in it 0600, the service user's; their names."""
    info = STATE_DIR.stat()
    assert info.st_uid == user.pw_uid and info.st_mode & 0o777 == 0o700, oct(info.st_mode)
    names = []
    for path in STATE_DIR.iterdir():
        names.append(path.name)
        mode = path.stat().st_mode & 0o777
        assert path.stat().st_uid == user.pw_uid and mode == 0o600, (path, oct(mode))
    return names


def drain(hub: socket.socket) -> list[dict]:
    """What the hub socket holds now."""
    got: list[dict] = []
    receive_datasets(hub, got, time.monotonic() + 2)
    return got


def check_metrics(port: int) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        exposition = response.read().decode()
    assert re.search(r"^sfive_ngxlua_datasets_sent_total [1-9]", exposition, re.M), exposition


def open_interval_requests(nginx: Nginx) -> tuple[datetime, datetime, int]:
    """A few requests just before a stop: with --grace 3 their interval is not due for at
    least 3 s, so the stop finds it open. Returns their time window and bytes."""
    prefix = "/live/hls/test-high/"
    count, before = nginx.served(prefix)
    begin = datetime.now().astimezone()
    for _ in range(3):
        assert nginx.get(prefix + "seg1.ts") == 200
    end = datetime.now().astimezone()
    # nginx logs a request after its response went out: wait for the three log lines
    deadline = time.monotonic() + 10
    while nginx.served(prefix)[0] < count + 3:
        assert time.monotonic() < deadline, "nginx did not log the three requests"
        time.sleep(0.01)
    return begin, end, nginx.bytes_sent(prefix) - before


def exercise_confined(hub: socket.socket, syslog: SyslogCapture, say) -> None:
    user = pwd.getpwnam(PKG)
    unit = Path(f"/lib/systemd/system/{PKG}.service")
    assert unit.read_text() == UNIT_SOURCE.read_text()
    man = [] if shutil.which("man") else ["--man=no"]
    verify = run(["systemd-analyze", "verify", *man, str(unit)])
    assert verify.returncode == 0, verify.stdout + verify.stderr
    exposure, _ = security(unit)
    assert exposure <= 2.0
    init("stop")  # the start on install used the example settings
    if not nginx_with_lua():
        pytest.fail("nginx with its Lua module is not installed "
                    "(apt-get install nginx libnginx-mod-http-lua)")
    nginx = Nginx()
    try:
        metrics = free_port()
        # --grace 3 keeps the interval open at the stop open for 3 s more than its end (see
        # open_interval_requests).
        set_daemon_opts(f"-s {hub.getsockname()} -u http://127.0.0.1:{nginx.port}/sfive"
                        f" -S test/hls/high -n {HOSTNAME} -d 1 --grace 3"
                        f" --metrics tcp:{metrics}:interface=127.0.0.1 --state-dir {STATE_DIR}")
        how = "systemd" if systemd_running() else f"{CONFINE.name} (systemd is not PID 1 here)"
        say(f"the confined unit under {how}: {' '.join(unit_command())}")
        # First run: exact datasets from nginx, the metrics port; then a few more requests
        # and a stop while their interval is still open, by SIGHUP (as SIGTERM: saved).
        drain(hub)
        service = ConfinedService(user)
        try:
            check_confined(service.pid, user)
            exercise_unit_command(service, hub, nginx)
            check_accelerator_loaded(service.pid)
            check_metrics(metrics)
            say(f"state files while running: {check_state_modes(user)}")
            begin, end, sent = open_interval_requests(nginx)
        finally:
            output = service.stop(signal.SIGHUP)
        assert "Traceback" not in output, output
        if syslog.sock is not None and service.proc is not None:
            assert any("stop on SIGHUP" in line for line in syslog.lines), syslog.text()
            assert any(DECODED_BY_C in line for line in syslog.lines), syslog.text()
        before_restart = drain(hub)
        say(f"after the stop: state directory 0700, files 0600: {check_state_modes(user)}")
        # Second run: it starts again under the same confinement and reports the interval the
        # first one saved at its stop.
        service = ConfinedService(user)
        restarted = datetime.now().astimezone()
        try:
            check_confined(service.pid, user)
            after_restart: list[dict] = []
            deadline = time.monotonic() + 20
            while (not any(start_of(d) >= restarted for d in after_restart)
                   and service.poll() is None and time.monotonic() < deadline):
                receive_datasets(hub, after_restart, deadline)
            assert any(start_of(d) >= restarted for d in after_restart), (
                f"no datasets after the restart: {after_restart!r}\n{service.communicate()[0]}")
            check_metrics(metrics)
            check_state_modes(user)
        finally:
            output = service.stop()
        assert "Traceback" not in output, output

        def in_window(d: dict) -> bool:
            return (start_of(d) < end
                    and start_of(d) + timedelta(milliseconds=d["duration-ms"]) > begin)

        early = sum(d["data"]["bytes-sent"] for d in before_restart if in_window(d))
        restored = sum(d["data"]["bytes-sent"] for d in after_restart if in_window(d))
        assert early + restored == sent, (early, restored, sent)
        assert restored > 0 and early == 0, (
            f"the interval open at the stop was reported before the restart ({early} bytes)"
            " instead of saved and reported after it")
        say(f"the interval open at the stop ({sent} bytes) was saved, read back and "
            "reported after the restart")
        if syslog.sock is not None:
            assert not [line for line in syslog.lines if "Traceback" in line], syslog.text()
    finally:
        nginx.stop()
        shutil.rmtree(RUN_DIR, ignore_errors=True)


def test_deb_ships_the_access_log_source(built: Path) -> None:
    """The access-log pieces: the log format next to the exporter's snippets, the logrotate
    example (rename and create as www-data:sfive-ngxlua, never copytruncate), the --file
    variant in the default file."""
    deb = deb_file(built)
    listing = run(["dpkg-deb", "-c", str(deb)]).stdout
    for path in ("./usr/share/sfive-ngxlua/nginx/sfive-log.conf",
                 "./usr/share/doc/sfive-ngxlua/examples/sfive-log.logrotate"):
        assert f" {path}\n" in listing, f"{path} missing from the package"
    unpacked = built / "unpacked-access-log"
    run(["dpkg-deb", "-x", str(deb), str(unpacked)])
    stanza = (unpacked / "usr/share/doc/sfive-ngxlua/examples/sfive-log.logrotate").read_text()
    rules = [ln.strip() for ln in stanza.splitlines() if not ln.lstrip().startswith("#")]
    assert "create 0640 www-data sfive-ngxlua" in rules and "copytruncate" not in rules
    assert "invoke-rc.d nginx rotate >/dev/null 2>&1 || true" in rules
    default = (unpacked / "etc/default/sfive-ngxlua").read_text()
    assert re.search(r'^#DAEMON_OPTS=".*--file /var/log/nginx/sfive/sfive\.log', default, re.M)


def test_state_dir_through_init_restarts_and_purge(built: Path, exporter: Exporter,
                                                   hub: socket.socket, syslog: SyslogCapture,
                                                   say) -> None:
    """The installed service with the shipped --state-dir, started by the init script (twistd
    forks into the background after opening the state): the directory is the service user's,
    0700, its files 0600; a restart goes on from the saved state; purge removes it."""
    deb = deb_file(built)
    if installed():
        assert run(["apt-get", "purge", "-y", PKG]).returncode == 0
    result = run(["apt-get", "install", "-y", f"./{deb.name}"], cwd=built, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    state = Path(f"/var/lib/{PKG}")
    try:
        init("stop")
        user = pwd.getpwnam(PKG)
        url = f"http://127.0.0.1:{exporter.server_address[1]}/sfive"
        set_daemon_opts(f"-s {hub.getsockname()} -u {url} -S test/hls/high -n {HOSTNAME} -d 1"
                        f" --state-dir {state}")
        datasets: list[dict] = []
        for round_ in (1, 2):
            say(f"{INIT} start with --state-dir {state} ({round_})")
            started = init("start")
            assert started.returncode == 0, started.stdout + started.stderr + syslog.text()
            had = len([d for d in datasets if d["data"]["bytes-sent"] > 0])
            deadline = time.monotonic() + 30
            while len([d for d in datasets if d["data"]["bytes-sent"] > 0]) < had + 2:
                receive_datasets(hub, datasets, deadline)
                if time.monotonic() > deadline:
                    pytest.fail(f"no datasets within 30 s\n{syslog.text()}")
            stopped = init("stop")
            assert stopped.returncode == 0, stopped.stdout + stopped.stderr
            assert state.stat().st_uid == user.pw_uid and state.stat().st_mode & 0o777 == 0o700
            files = sorted(p.name for p in state.iterdir())
            assert "state.sqlite" in files and "lock" in files, files
            for path in state.iterdir():
                assert path.stat().st_uid == user.pw_uid, path
                assert path.stat().st_mode & 0o777 == 0o600, path
        starts = [d["start-time"] for d in datasets]
        assert len(starts) == len(set(starts)), "an interval reported twice across the restart"
        assert all(d["duration-ms"] == 1000 for d in datasets), "a partial interval at a stop"
        if syslog.sock is not None:
            assert not [line for line in syslog.lines if "Traceback" in line], syslog.text()
    finally:
        if installed():
            init("stop")
            purge = run(["apt-get", "purge", "-y", PKG], timeout=120)
            assert purge.returncode == 0, purge.stdout + purge.stderr
    assert not state.exists(), f"{state} survived the purge"
