"""A private nginx running the shipped sfive exporter, for the demo, the benchmarks and the tests.

Each NginxServer has its own prefix directory, a free loopback port, its own nginx.conf that
includes the shipped snippets (nginx/sfive.conf with its module path pointed at this source
tree, nginx/sfive-location.conf as shipped), an access log in JSON with $bytes_sent to compare
against, and HLS/DASH-shaped files of deterministic sizes. Twisted helpers at the end make real
HTTP requests and read the /sfive stream.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import treq
from treq.client import HTTPClient
from twisted.internet import defer, reactor
from twisted.internet.protocol import Protocol
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http_headers import Headers

SOURCE_DIR = Path(__file__).resolve().parent.parent / "nginx"
SNIPPET = SOURCE_DIR / "sfive.conf"
LOCATION_SNIPPET = SOURCE_DIR / "sfive-location.conf"
INSTALLED_MODULE_DIR = "/usr/share/sfive-ngxlua/nginx/"

MODULE_DIRS = ("/usr/lib/nginx/modules", "/usr/share/nginx/modules", "/usr/lib64/nginx/modules")
NGINX_CANDIDATES = ("nginx", "openresty", "/usr/sbin/nginx", "/usr/local/openresty/bin/openresty",
                    "/usr/local/openresty/nginx/sbin/nginx")


def _segment(size: int, seed: int) -> bytes:
    pattern = bytes((seed + i) % 251 for i in range(251))
    return (pattern * (size // len(pattern) + 1))[:size]


def _playlist(segments: Iterable[str]) -> bytes:
    lines = ["#EXTM3U", "#EXT-X-VERSION:3", "#EXT-X-TARGETDURATION:4", "#EXT-X-MEDIA-SEQUENCE:1"]
    for name in segments:
        lines += ["#EXTINF:4.000,", name]
    return ("\n".join(lines) + "\n").encode()


_MPD = (b'<?xml version="1.0"?>\n<MPD xmlns="urn:mpeg:dash:schema:mpd:2011" type="dynamic">'
        b'<Period><AdaptationSet mimeType="video/mp4"><Representation id="low" bandwidth="400000">'
        b'<SegmentTemplate media="seg$Number$.m4s" initialization="init.mp4"/></Representation>'
        b'</AdaptationSet></Period></MPD>\n')

#: The files served under the document root: path -> content (sizes are deterministic).
MEDIA_FILES: Mapping[str, bytes] = {
    "live/hls/foo-high/index.m3u8": _playlist(["seg1.ts", "seg2.ts"]),
    "live/hls/foo-high/seg1.ts": _segment(18800, 1),
    "live/hls/foo-high/seg2.ts": _segment(37600, 2),
    "live/hls/foo-low/index.m3u8": _playlist(["seg1.ts"]),
    "live/hls/foo-low/seg1.ts": _segment(9400, 3),
    "live/dash/bar-low/manifest.mpd": _MPD,
    "live/dash/bar-low/init.mp4": _segment(812, 4),
    "live/dash/bar-low/seg.m4s": _segment(12345, 5),
    "live/dash/bar-low/seg1.m4s": _segment(23456, 6),
}

ACCESS_LOG_FORMAT = (
    "log_format sfive_test escape=json '{\"msec\":\"$msec\",\"client\":\"$remote_addr\","
    "\"ua\":\"$http_user_agent\",\"uri\":\"$uri\",\"status\":$status,"
    "\"bytes_sent\":$bytes_sent,\"request\":\"$request\",\"pid\":$pid}';"
)


class NginxUnavailable(Exception):
    """nginx or its Lua module is not installed here: the reason says which."""


class NginxError(Exception):
    """The private nginx did not start, reload or stop as asked; carries its error log."""


@dataclass(frozen=True)
class NginxBinary:
    """An nginx executable and the dynamic modules it needs for Lua."""

    path: str
    load_modules: tuple[str, ...] = ()


def find_nginx() -> NginxBinary:
    """Find an nginx that can run the exporter (Debian nginx + lua module, or OpenResty).

    $SFIVE_NGINX names the executable explicitly. Raises NginxUnavailable with the reason.
    """
    candidates = [os.environ["SFIVE_NGINX"]] if os.environ.get("SFIVE_NGINX") else NGINX_CANDIDATES
    path = next((p for p in map(shutil.which, candidates) if p), None)
    if path is None:
        raise NginxUnavailable("nginx is not installed (apt-get install nginx "
                               "libnginx-mod-http-lua, or set $SFIVE_NGINX)")
    info = subprocess.run([path, "-V"], capture_output=True, text=True, timeout=10).stderr
    if re.search(r"--add-module=\S*lua", info):
        return NginxBinary(path)
    match = re.search(r"--modules-path=(\S+)", info)
    dirs = ([match.group(1)] if match else []) + list(MODULE_DIRS)
    for directory in dirs:
        lua = Path(directory, "ngx_http_lua_module.so")
        if lua.exists():
            ndk = Path(directory, "ndk_http_module.so")
            return NginxBinary(path, tuple(str(p) for p in (ndk, lua) if p.exists()))
    raise NginxUnavailable(f"{path} has no Lua module (looked for ngx_http_lua_module.so in "
                           f"{', '.join(dirs)}; apt-get install libnginx-mod-http-lua)")


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_pids(parent: int) -> set[int]:
    """The pids of parent's live child processes (from /proc/*/stat)."""
    pids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == parent and fields[0] != "Z":
            pids.add(int(stat.parent.name))
    return pids


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (and is not a zombie)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def snippet_text(ring_size: Optional[int] = None, knobs: Optional[Mapping[str, Any]] = None,
                 dict_size: Optional[str] = None, source_dir: Path = SOURCE_DIR) -> str:
    """The shipped sfive.conf (of source_dir), edited as an operator would: module path (to
    source_dir's sfive.lua), dict size, knobs."""
    text = (source_dir / "sfive.conf").read_text()
    assert INSTALLED_MODULE_DIR in text, "sfive.conf no longer names the install dir"
    text = text.replace(INSTALLED_MODULE_DIR, f"{source_dir}/")
    if dict_size is not None:
        text, count = re.subn(r"^lua_shared_dict sfive \w+;", f"lua_shared_dict sfive {dict_size};",
                              text, flags=re.M)
        assert count == 1, "sfive.conf no longer declares the dict"
    knobs = dict(knobs or {})
    if ring_size is not None:
        knobs["ring_size"] = int(ring_size)
    for key, value in knobs.items():
        setting = f"{key} = {json.dumps(value)},"
        text, count = re.subn(rf"\b{key} = [^,\n]+,", setting, text)
        if count == 0:
            text, count = re.subn(r"configure\(\{\n",
                                  lambda m, line=setting: f"{m.group(0)}        {line}\n", text)
        assert count == 1, f"cannot set {key} in sfive.conf"
    return text


@dataclass
class NginxServer:
    """One private nginx: start(), reload(), stop(), url(), access_log(), error_log()."""

    binary: NginxBinary
    prefix: Path
    ring_size: Optional[int] = None
    knobs: Optional[Mapping[str, Any]] = None
    dict_size: Optional[str] = None
    workers: int = 2
    files: Mapping[str, bytes] = field(default_factory=lambda: dict(MEDIA_FILES))
    extra_server: str = ""
    extra_http: str = ""
    env: Optional[Mapping[str, str]] = None
    #: where sfive.conf and sfive.lua come from (another revision's copy, for the benchmarks)
    source_dir: Path = SOURCE_DIR
    #: None: include the exporter's sfive.conf; else this text goes in http { } instead
    http_config: Optional[str] = None
    #: write the JSON access log the tests compare against (off for CPU measurements)
    test_log: bool = True
    #: run nginx under this command (e.g. valgrind), for the benchmarks
    wrapper: tuple[str, ...] = ()
    port: int = 0
    process: Optional[subprocess.Popen] = None
    #: graceful stops that took longer than their timeout and needed TERM (tests assert none)
    forced_stops: int = 0

    @property
    def conf_path(self) -> Path:
        return self.prefix / "conf" / "nginx.conf"

    @property
    def access_log_path(self) -> Path:
        return self.prefix / "logs" / "access.log"

    @property
    def error_log_path(self) -> Path:
        return self.prefix / "logs" / "error.log"

    def url(self, path: str = "/") -> str:
        """The http URL of path on this nginx."""
        return f"http://127.0.0.1:{self.port}{path}"

    def _write_tree(self) -> None:
        for sub in ("conf", "logs", "html", "tmp"):
            (self.prefix / sub).mkdir(parents=True, exist_ok=True)
        for rel, content in self.files.items():
            target = self.prefix / "html" / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
        if self.http_config is None:
            snippet = snippet_text(self.ring_size, self.knobs, self.dict_size,
                                   source_dir=self.source_dir)
        else:
            snippet = self.http_config
        (self.prefix / "conf" / "sfive.conf").write_text(snippet)

    def _config(self) -> str:
        p = self.prefix
        user = "user root;\n" if os.geteuid() == 0 else ""
        modules = "".join(f"load_module {m};\n" for m in self.binary.load_modules)
        temps = "".join(f"    {kind}_temp_path {p}/tmp/{kind};\n"
                        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        return f"""{user}{modules}worker_processes {self.workers};
daemon off;
master_process on;
pid {p}/nginx.pid;
error_log {self.error_log_path} notice;
events {{ worker_connections 512; }}
http {{
{temps}    types {{
        application/vnd.apple.mpegurl m3u8;
        video/mp2t ts;
        application/dash+xml mpd;
        video/iso.segment m4s;
        video/mp4 mp4;
    }}
    default_type application/octet-stream;
    {ACCESS_LOG_FORMAT}
    {self._access_log()}
    include {p}/conf/sfive.conf;
{self.extra_http}
    server {{
        listen 127.0.0.1:{self.port};
        server_name localhost;
        root {p}/html;
        include {LOCATION_SNIPPET};
{self.extra_server}
    }}
}}
"""

    def _access_log(self) -> str:
        if self.test_log:
            return f"access_log {self.access_log_path} sfive_test;"
        if "access_log" in (self.http_config or ""):
            return ""  # its own (an "off" beside it would switch it off too)
        return "access_log off;"

    def start(self, timeout: float = 10.0) -> NginxServer:
        """Start nginx and wait until it accepts connections (retrying on a port clash)."""
        self._write_tree()
        for _attempt in range(5):
            self.port = free_port()
            self.conf_path.write_text(self._config())
            self.error_log_path.write_text("")
            self.process = subprocess.Popen(
                [*self.wrapper, self.binary.path, "-p", f"{self.prefix}/", "-c",
                 str(self.conf_path),
                 "-e", str(self.error_log_path)],
                env={**os.environ, **(self.env or {})},
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=open(self.prefix / "logs" / "stderr.log", "ab"))  # noqa: SIM115
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    break
                if self._accepts() and self.worker_pids():
                    return self
                time.sleep(0.02)
            self._kill()
            if "Address already in use" not in self.error_log():
                raise NginxError(f"nginx did not start:\n{self.error_log()}")
        raise NginxError("nginx found no free port")

    def _accepts(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return False
        return True

    def worker_pids(self) -> set[int]:
        """The pids of this nginx's worker processes (children of its master)."""
        if self.process is None:
            return set()
        return child_pids(self.process.pid)

    def reload(self, timeout: float = 10.0) -> set[int]:
        """Send HUP; wait for a new set of workers; return the old workers' pids."""
        assert self.process is not None
        old = self.worker_pids()
        starts = self.error_log().count("start worker process")
        os.kill(self.process.pid, signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.error_log()
            if log.count("start worker process") >= starts + self.workers:
                return old
            time.sleep(0.02)
        raise NginxError(f"nginx did not reload:\n{self.error_log()}")

    def quit(self, timeout: float = 10.0) -> float:
        """`nginx -s quit`: a graceful stop (QUIT), waiting for the master to exit; returns
        the seconds it took."""
        return self.stop(graceful=True, timeout=timeout)

    def stop(self, graceful: bool = False, timeout: float = 10.0) -> float:
        """Stop nginx (QUIT if graceful, else TERM) and wait for it; KILL as a last resort;
        returns the seconds the stop took (0 if nginx was not running).
        A graceful stop that takes longer than ``timeout`` goes on with TERM, as Debian's
        nginx.service does (``--retry QUIT/5``): a slow graceful quit is nginx's, not a
        failure of the stop; it is counted in ``forced_stops`` (a test that needs nginx to
        stop gracefully asserts it stayed 0)."""
        if self.process is None or self.process.poll() is not None:
            return 0.0
        began = time.monotonic()
        self.process.send_signal(signal.SIGQUIT if graceful else signal.SIGTERM)
        try:
            self.process.wait(timeout)
            return time.monotonic() - began
        except subprocess.TimeoutExpired:
            if not graceful:
                self._kill()
                raise NginxError(f"nginx did not stop within {timeout}s") from None
        self.forced_stops += 1
        print(f"[nginx] a graceful stop took more than {timeout:g}s: TERM, as Debian's unit does")
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self._kill()
            raise NginxError(f"nginx did not stop within {timeout}s of TERM either") from None
        return time.monotonic() - began

    def _kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def error_log(self) -> str:
        """The error log so far."""
        try:
            return self.error_log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def access_log(self) -> list[dict[str, Any]]:
        """The access log's records so far: msec, client, ua, uri, status, bytes_sent, request,
        pid (the worker's)."""
        try:
            text = self.access_log_path.read_text(errors="surrogateescape")
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line]


def burst(server: NginxServer, paths: list[str], user_agents: list[str],
          per_connection: int = 500) -> int:
    """Make one request per (path, user agent) fast: pipelined on keep-alive connections
    (raw sockets, a sender thread per connection), blocking until every response has come.
    Returns how many responses came. For bursts of thousands of requests (a scanner, a bot)."""
    requests = [f"GET {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: {ua}\r\n".encode()
                for path, ua in zip(paths, user_agents)]
    answered = 0
    for start in range(0, len(requests), per_connection):
        chunk = requests[start:start + per_connection]
        data = (b"".join(r + b"\r\n" for r in chunk[:-1])
                + chunk[-1] + b"Connection: close\r\n\r\n")
        with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
            sender = threading.Thread(target=sock.sendall, args=(data,), daemon=True)
            sender.start()
            reply = bytearray()
            while block := sock.recv(1 << 20):
                reply += block
            sender.join(60)
        answered += len(re.findall(rb"HTTP/1\.1 \d\d\d [A-Z][A-Za-z ]*\r\n", bytes(reply)))
    return answered


# --- Twisted helpers: real HTTP clients -------------------------------------------------------


def make_agent(bind: Optional[str] = None) -> Agent:
    """An Agent without persistent connections (nothing left open between tests)."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    return Agent(reactor, connectTimeout=5, pool=pool,
                 bindAddress=(bind, 0) if bind else None)


@defer.inlineCallbacks
def fetch(url: str, ua: Optional[str] = "sfive-test", headers: Optional[dict] = None,
          method: str = "GET", bind: Optional[str] = None):
    """Make one request; return (status, body bytes). ua=None sends no User-Agent."""
    hdrs = Headers({k.encode(): [v.encode()] for k, v in (headers or {}).items()})
    if ua is not None:
        hdrs.setRawHeaders(b"user-agent", [ua.encode()])
    response = yield HTTPClient(make_agent(bind)).request(method, url, headers=hdrs)
    body = yield treq.content(response)
    return response.code, body


class LineStream(Protocol):
    """Collects a never-ending body of JSON lines; `done` fires when the body ends."""

    def __init__(self) -> None:
        self.buffer = b""
        self.raw: list[bytes] = []
        self.lines: list[dict[str, Any]] = []
        self.done: defer.Deferred = defer.Deferred()
        self.reason = None

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.buffer += data
        *complete, self.buffer = self.buffer.split(b"\n")
        for line in complete:
            self.raw.append(line)
            self.lines.append(json.loads(line))

    def connectionLost(self, reason) -> None:  # noqa: N802, ANN001
        self.reason = reason
        self.done.callback(reason.check(ResponseDone) is not None)

    def records(self) -> list[dict[str, Any]]:
        """The request records received (no gap lines, no heartbeats)."""
        return [line for line in self.lines if "time" in line]

    def heartbeats(self) -> list[dict[str, Any]]:
        """The heartbeat lines received (protocol 2)."""
        return [line for line in self.lines if "hb" in line]

    def close(self) -> None:
        """Disconnect from the exporter."""
        if self.reason is None:
            self.transport.stopProducing()


@defer.inlineCallbacks
def subscribe(server: NginxServer, after: Optional[int] = None, path: str = "/sfive",
              v: Optional[int] = None, ring: Optional[str] = None):
    """Open the exporter stream; return (response, LineStream) once the headers arrived.

    v=2 asks for protocol 2 (heartbeats), ring=ID names the ring the subscriber read before.
    """
    params = [(k, val) for k, val in (("v", v), ("after", after), ("ring", ring))
              if val is not None]
    query = ("?" + "&".join(f"{k}={val}" for k, val in params)) if params else ""
    response = yield make_agent().request(
        b"GET", server.url(path + query).encode(),
        Headers({b"user-agent": [b"sfive-test-subscriber"]}))
    stream = LineStream()
    response.deliverBody(stream)
    return response, stream
