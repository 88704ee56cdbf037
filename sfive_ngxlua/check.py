"""``sfive-ngxlua-check``: check the service's configuration on its node, without disturbing it.

It takes the service's own options (``sfive-ngxlua-check $DAEMON_OPTS``), probes the source,
the hub, the state dir and the metrics endpoint as the service's user, reads a sample through
the service's own parser and says what counts, per stream, and why the rest does not. It never
takes the state dir's lock, writes state or sends a dataset: it is safe on a running node.

It runs on Twisted's ``react``: the exporter is read with the HTTP client the service uses
(treq, the same credentials handling), and ``--hub`` and ``--metrics`` are Twisted endpoint
strings, which only Twisted's own parsers read exactly as the service does.
"""

from __future__ import annotations

import errno
import json
import os
import pwd
import re
import socket
import stat
import sys
import textwrap
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import IO, Any, Dict, List, Optional, Tuple
from urllib.parse import urlsplit

from twisted.python import usage

from . import __version__
from .conditions import FORMAT_REASONS, TEXT_LOG, format_verdict, parsed_as
from .lines import LineSplitter
from .records import Gap, Heartbeat, Record, RecordParser
from .retire import DEFAULT_STATE_DIR
from .settings import Options, Settings, StreamerKey, _positive_int, _seconds, endpoint_fields

EX_CONFIG = 78
SERVICE_USER = "sfive-ngxlua"
"""The Debian package's system user, as which root probes by default."""
LOG_CONF = "/usr/share/sfive-ngxlua/nginx/sfive-log.conf"
LOCATION_CONF = "/usr/share/sfive-ngxlua/nginx/sfive-location.conf"
EXAMPLES = 5
"""URLs (or URL shapes) shown per rejection reason."""
_DIGITS = re.compile(r"\d+")
_EXTENSION = re.compile(r"\.[A-Za-z][A-Za-z0-9]{0,4}\Z")
"""A file name's extension (.ts, .m4s, .mp4) keeps its digits."""
_SHOWN_URL = 120


@dataclass
class Probe:
    """One probe's outcome: ``ok``, ``warn``, ``in-use`` (by the running service: fine),
    ``fail`` or ``skip``; a failure names its fix."""

    name: str
    status: str
    message: str
    fix: Optional[str] = None


class CheckOptions(Options):
    """The service's options, plus how much to sample, as whom, and how to print."""

    synopsis = "[service options] [--sample N | --seconds S] [--user USER] [--json]"
    longdesc = (
        "Checks a sfive-ngxlua configuration (the service's own options, e.g. "
        "sfive-ngxlua-check $DAEMON_OPTS): the source, the hub, the state directory, the "
        "metrics endpoint, and a sample of what the source holds, per stream and per "
        "rejection reason. Safe on a running node: it takes no lock, writes no state and "
        "sends no dataset. Exit status: 0 usable and something counted, 1 a probe failed or "
        "nothing in the sample counts, 2 the sample is empty, 78 invalid options."
    )
    optFlags = [["json", None, "print one JSON object (for scripts) instead of text"]]
    optParameters = [
        ["sample", None, "1000",
         "records to read: the exporter's last N (or, with --file, the file's last N lines)"],
        ["seconds", None, None, "instead: the exporter's records of the next S seconds"],
        ["timeout", None, "10", "seconds the exporter sample may take at most"],
        ["user", None, None,
         f"run as root: probe as this user [default: {SERVICE_USER}, the Debian package's]"],
    ]

    def opt_version(self) -> None:
        """print the version and exit"""
        from .records import default_decoder

        print(f"sfive-ngxlua-check {__version__} (lines decoded by {default_decoder()})")
        sys.exit(0)

    def postOptions(self) -> None:
        super().postOptions()
        self["sample"] = _positive_int("--sample", self["sample"])
        self["timeout"] = _seconds("--timeout", self["timeout"], positive=True)
        if self["seconds"] is not None:
            if self["file"]:
                raise usage.UsageError(
                    "--seconds reads the exporter; with --file the sample is the file's last "
                    "--sample lines")
            self["seconds"] = _seconds("--seconds", self["seconds"], positive=True)
        self.user = probe_user(self["user"])


def probe_user(name: Optional[str]) -> Optional[pwd.struct_passwd]:
    """The user to probe as (None: as this process). Only root can become another user; root
    becomes the Debian package's user by default, if it exists."""
    if os.geteuid() != 0:
        if name is not None and name != user_name():
            raise usage.UsageError(
                f"--user {name}: only root can probe as another user (run as root, or leave "
                "out --user to probe as yourself)")
        return None
    try:
        return pwd.getpwnam(name or SERVICE_USER)
    except KeyError:
        if name is not None:
            raise usage.UsageError(f"--user {name!r}: no such user") from None
        return None


def become(user: Optional[pwd.struct_passwd]) -> None:
    """Take ``user``'s identity and groups for good (the probes see what the service sees).
    The code is loaded first, as a daemon's is: the interpreter may live where ``user`` cannot
    read (a virtualenv under /root)."""
    if user is None or user.pw_uid == os.geteuid():
        return
    import encodings.idna  # noqa: F401
    import grp  # noqa: F401

    import treq  # noqa: F401
    import twisted.internet.endpoints  # noqa: F401
    import twisted.internet.reactor  # noqa: F401
    import twisted.internet.task  # noqa: F401
    import twisted.web.client  # noqa: F401

    from . import fetch, store  # noqa: F401

    os.initgroups(user.pw_name, user.pw_gid)
    os.setgid(user.pw_gid)
    os.setuid(user.pw_uid)


def identity() -> str:
    """This process's user and groups, as ``id`` names them."""
    def group(gid: int) -> str:
        import grp

        try:
            return grp.getgrgid(gid).gr_name
        except KeyError:
            return str(gid)

    groups = sorted({group(g) for g in [os.getegid(), *os.getgroups()]})
    return f"{user_name()} (groups {', '.join(groups)})"


def user_name() -> str:
    """This process's user name (its uid if it has none)."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


# -- the sample -------------------------------------------------------------------------------


def shape(url: str, match: Optional[re.Match]) -> str:
    """``url`` with digit runs folded to ``#`` (segment numbers), except in what the name
    format read as content, format and quality and in the extension; shortened for display."""
    keep = []
    if match is not None:
        keep = sorted(match.span(g) for g in ("content", "format", "quality")
                      if match.start(g) >= 0)
    out, pos = [], 0
    for start, end in keep:
        if start < pos:
            continue
        out += [_DIGITS.sub("#", url[pos:start]), url[start:end]]
        pos = end
    rest = url[pos:]
    ext = _EXTENSION.search(rest)
    cut = ext.start() if ext else len(rest)
    out += [_DIGITS.sub("#", rest[:cut]), rest[cut:]]
    text = "".join(out)
    return text if len(text) <= _SHOWN_URL else text[:_SHOWN_URL - 3] + "..."


def stream_name(key: StreamerKey) -> str:
    return "/".join(key)


def streamer_specs(keys: List[StreamerKey]) -> List[str]:
    """The fewest ``-S C/F/Q`` arguments (combinations) that add exactly ``keys``."""
    per_content: Dict[str, set] = {}
    for c, f, q in keys:
        per_content.setdefault(c, set()).add((f, q))
    by_grid: Dict[Tuple[Tuple[str, ...], Tuple[str, ...]], List[str]] = {}
    specs = []
    for c, pairs in per_content.items():
        formats = tuple(sorted({f for f, _ in pairs}))
        qualities = tuple(sorted({q for _, q in pairs}))
        if len(pairs) == len(formats) * len(qualities):
            by_grid.setdefault((formats, qualities), []).append(c)
            continue
        for f in formats:
            qs = sorted(q for g, q in pairs if g == f)
            specs.append(f"{c}/{f}/{','.join(qs)}")
    for (formats, qualities), contents in by_grid.items():
        specs.append(f"{','.join(contents)}/{','.join(formats)}/{','.join(qualities)}")
    return sorted(specs)


class Sample:
    """Lines through the service's own RecordParser, counted per stream and rejection reason.
    What is kept to show holds no client address or user agent: URL shapes, statuses, times,
    field names."""

    def __init__(self, settings: Settings, kind: str) -> None:
        self.settings = settings
        self.kind = kind
        self.parser = RecordParser(settings)
        self.splitter = LineSplitter(settings.max_line_length)
        self.lines = 0
        self.counted: Dict[StreamerKey, List[int]] = {k: [0, 0] for k in settings.streamers}
        self.rejected: Counter = Counter()
        self.examples: Dict[str, Counter] = {}
        self.unlisted: Dict[StreamerKey, List[int]] = {}
        self.lost = 0
        self.complete = True
        self.note = ""

    def feed(self, data: bytes) -> List[bytes]:
        lines = self.splitter.feed(data)
        self._too_long()
        return lines

    def _too_long(self) -> None:
        if self.splitter.too_long:
            self.lines += self.splitter.too_long
            self.rejected["too-long"] += self.splitter.too_long
            self.splitter.too_long = 0

    def line(self, line: bytes) -> Any:
        """Count one complete line; returns what the parser made of it."""
        result = self.parser.parse(line)
        if type(result) is Record:
            self.lines += 1
            entry = self.counted[result.streamer]
            entry[0] += 1
            entry[1] += result.bytes_sent
        elif type(result) is str:
            self.lines += 1
            self.rejected[result] += 1
            self._explain(result, line)
        elif type(result) is Gap:
            self.lost += result.lost
        return result

    @property
    def accepted(self) -> int:
        return sum(n for n, _ in self.counted.values())

    def _explain(self, reason: str, line: bytes) -> None:
        if reason in ("invalid-json", "not-an-object", "invalid-utf8", "too-long"):
            return
        try:
            obj = json.loads(line.decode("utf-8", "replace"))
        except ValueError:
            return
        if not isinstance(obj, dict):
            return
        if reason in ("missing-field", "wrong-type"):
            types = ", ".join(f"{k}: {type(v).__name__}" for k, v in sorted(obj.items())
                              if k not in ("seq",))
            self._example(reason, types[:_SHOWN_URL], (
                "not the sfive format's fields" if reason == "missing-field" else
                "a field of another type than the sfive format's") + " (sfive-log.conf)")
            return
        if reason == "bad-time":
            self._example(reason, str(obj.get("time"))[:40],
                          "not an ISO 8601 time with a UTC offset")
            return
        url = obj.get("url")
        if not isinstance(url, str):
            return
        match = self.parser.url_match(url)
        key = None if match is None else (match.group("content"), match.group("format"),
                                          match.group("quality"))
        if reason == "url-mismatch":
            self._example(reason, shape(url, None), "not matched by the name format (-F)")
        elif reason == "unknown-streamer" and key is not None:
            self._example(reason, shape(url, match), parsed_as(key, self.settings))
            entry = self.unlisted.setdefault(key, [0, 0])
            entry[0] += 1
            sent = obj.get("bytes-sent")
            entry[1] += sent if type(sent) is int else 0
        elif reason == "status":
            statuses = ",".join(map(str, sorted(self.settings.statuses)))
            what = parsed_as(key, self.settings)
            self._example(reason, shape(url, match),
                          f"status {obj.get('status')}, not among --status {statuses}; {what}")

    def _example(self, reason: str, what: str, why: str) -> None:
        self.examples.setdefault(reason, Counter())[(what, why)] += 1

    def summary(self) -> Dict[str, Any]:
        """The sample as plain data (the JSON output)."""
        return {
            "source": self.kind,
            "lines": self.lines,
            "complete": self.complete,
            "note": self.note,
            "lost": self.lost,
            "counted": {"records": self.accepted,
                        "bytes": sum(b for _, b in self.counted.values())},
            "streams": [{"stream": stream_name(k), "records": n, "bytes": b}
                        for k, (n, b) in self.counted.items()],
            "rejected": {
                reason: {"count": n, "examples": [
                    {"what": what, "count": c, "why": why}
                    for (what, why), c in self.examples.get(reason, Counter()).most_common(
                        EXAMPLES)]}
                for reason, n in self.rejected.most_common()},
            "unlisted": [{"stream": stream_name(k), "records": n, "bytes": b}
                         for k, (n, b) in sorted(self.unlisted.items(),
                                                 key=lambda kv: -kv[1][0])],
            "add": [f"-S {spec}" for spec in streamer_specs(list(self.unlisted))],
        }


# -- processes holding what the service holds -----------------------------------------------


def _argv(pid: int) -> List[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def is_service(pid: int) -> bool:
    """Whether ``pid`` is the sfive-ngxlua service (``twistd ... sfive-ngxlua ...``)."""
    return SERVICE_USER in _argv(pid)


def describe_pid(pid: int) -> str:
    """``pid N (program)``: the program's name only (its arguments may hold credentials)."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            comm = f.read().strip()
    except OSError:
        return f"pid {pid}"
    return f"pid {pid}, {comm}" + (" sfive-ngxlua" if is_service(pid) else "")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def lock_holder(path: str) -> Tuple[bool, Optional[int]]:
    """(whether some process holds ``path``'s flock, its pid), read from /proc/locks and the
    pid the holder wrote into the file: without taking the lock, even for a moment."""
    try:
        st = os.stat(path)
        with open("/proc/locks") as f:
            table = f.read().splitlines()
    except OSError:
        return False, None
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = [int(fields[4]) for fields in map(str.split, table)
            if len(fields) > 5 and fields[1] != "->" and fields[5] == inode]
    if not pids:
        return False, None
    try:
        with open(path) as f:
            written = int(f.read(64).strip() or 0)
    except (OSError, ValueError):
        written = 0
    if written and _alive(written):
        return True, written  # the running process (twistd may have forked since it locked)
    return True, pids[0]


def port_holders(port: int) -> List[int]:
    """The pids (as far as this user can see) of processes listening on TCP ``port``."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1],
                                                             16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    pids = []
    if not inodes:
        return pids
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{entry}/fd/{fd}") in inodes:
                    pids.append(int(entry))
                    break
            except OSError:
                continue
    return pids


# -- probes -----------------------------------------------------------------------------------


def _group_fix(path: str, st: os.stat_result, what: str) -> str:
    import grp

    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    me = user_name()
    if st.st_mode & 0o020:
        return (f"{what} belongs to group {group} (mode {stat.S_IMODE(st.st_mode):04o}): add "
                f"{me} to it (adduser {me} {group}), then restart the service")
    return (f"{what} is not writable by its group {group} (mode "
            f"{stat.S_IMODE(st.st_mode):04o}): have it made group-writable (0660), then "
            f"adduser {me} {group}")


def probe_socket(path: str) -> Probe:
    """``--socket``: it exists, is a datagram socket this user may write to, someone reads it.
    Connecting a datagram socket sends nothing."""
    me = user_name()
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return Probe("hub", "fail", f"{path}: no such socket",
                     "start the sfive hub (it creates its socket), or correct --socket")
    except PermissionError:
        return Probe("hub", "fail", f"{path}: {me} cannot reach it (a directory on the way is "
                     "not searchable)", f"let {me} search the directories above {path}")
    if not stat.S_ISSOCK(st.st_mode):
        return Probe("hub", "fail", f"{path}: not a socket",
                     "--socket names the hub's unix datagram socket (e.g. /run/sfive/pipegram)")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.connect(path)
    except PermissionError:
        return Probe("hub", "fail", f"{path}: not writable by {me}", _group_fix(path, st,
                                                                                 "the socket"))
    except ConnectionRefusedError:
        return Probe("hub", "fail", f"{path}: nobody receives on it (a socket left behind: "
                     "the hub is not running)", "start the sfive hub")
    except OSError as e:
        if e.errno == errno.EPROTOTYPE:
            return Probe("hub", "fail", f"{path}: a stream socket, not a datagram socket",
                         f"use --hub unix:path={path} instead of --socket")
        return Probe("hub", "fail", f"{path}: {e.strerror}", "check the hub and --socket")
    finally:
        sock.close()
    return Probe("hub", "ok", f"{path}: a datagram socket, writable by {me}, the hub listens")


async def probe_hub(settings: Settings, reactor: Any) -> Probe:
    """``--hub``: connect and disconnect at once (nothing is sent)."""
    from twisted.internet.endpoints import clientFromString
    from twisted.internet.protocol import Factory, Protocol

    from .fetch import describe

    endpoint = clientFromString(reactor, settings.hub)
    path = unix_path(settings.hub)
    if path is not None and not os.path.exists(path):
        return Probe("hub", "fail", f"{settings.hub}: no such socket {path}",
                     "start the sfive hub (it creates its socket), or correct --hub")
    d = endpoint.connect(Factory.forProtocol(Protocol))
    d.addTimeout(settings.connect_timeout, reactor)
    try:
        protocol = await d
    except Exception:
        from twisted.python.failure import Failure

        failure = Failure()
        why = describe(failure)
        fix = "start the sfive hub, or correct --hub"
        if path is not None and "ermission" in why:
            fix = _group_fix(path, os.stat(path), "the socket")
        return Probe("hub", "fail", f"{settings.hub}: cannot connect ({why})", fix)
    protocol.transport.loseConnection()
    return Probe("hub", "ok", f"{settings.hub}: connectable (connected and closed, nothing sent)")


def unix_path(description: str) -> Optional[str]:
    """The socket path of a ``unix:`` client endpoint string (``unix:path=P`` or ``unix:P``,
    with Twisted's backslash escapes), or None for another kind of endpoint."""
    kind, args, kwargs = endpoint_fields(description)
    if kind != "unix":
        return None
    return kwargs.get("path", args[0] if args else None)


def probe_state(directory: Optional[str]) -> Probe:
    """The state dir: usable by this user, and who holds its lock (never taken here)."""
    from .store import LOCK_FILE, STATE_FILE

    if directory is None:
        return Probe("state", "skip", "no --state-dir: a restart loses the running interval "
                     "and the hub queue")
    me = user_name()
    if not os.path.exists(directory):
        parent = os.path.dirname(directory.rstrip("/")) or "/"
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if directory == DEFAULT_STATE_DIR:
            return Probe("state", "ok", f"{directory}: not there yet; the Debian unit "
                         "(StateDirectory=) and init script make it at the start")
        if os.access(parent, os.W_OK | os.X_OK):
            return Probe("state", "ok", f"{directory}: not there yet; the service makes it "
                         "(0700) at its start")
        return Probe("state", "fail", f"{directory}: not there, and {me} cannot make it in "
                     f"{parent}", f"install -d -o {me} -m 0700 {directory} (the Debian "
                     "unit's StateDirectory= makes /var/lib/sfive-ngxlua)")
    if not os.access(directory, os.R_OK | os.W_OK | os.X_OK):
        return Probe("state", "fail", f"{directory}: not usable by {me} (needs read, write "
                     "and search)", f"chown -R {me} {directory}")
    for name in (STATE_FILE, STATE_FILE + "-wal", STATE_FILE + "-shm", LOCK_FILE):
        path = os.path.join(directory, name)
        if os.path.exists(path) and not os.access(path, os.R_OK | os.W_OK):
            return Probe("state", "fail", f"{path}: not readable and writable by {me}",
                         f"chown -R {me} {directory} (was a command run there as root?)")
    held, pid = lock_holder(os.path.join(directory, LOCK_FILE))
    saved = os.path.exists(os.path.join(directory, STATE_FILE))
    what = "a saved state" if saved else "no saved state yet"
    if not held:
        return Probe("state", "ok", f"{directory}: usable by {me}, {what}, not locked")
    if pid is not None and is_service(pid):
        return Probe("state", "in-use", f"{directory}: in use by the running service "
                     f"({describe_pid(pid)})")
    who = describe_pid(pid) if pid is not None else "a process this user cannot see"
    return Probe("state", "fail", f"{directory}: locked by {who}, which is not the "
                 "service: the service cannot start while it holds it",
                 "let that process finish (sfive-ngxlua-retire?) or stop it, or give the "
                 "service its own --state-dir")


async def probe_metrics(settings: Settings, reactor: Any) -> Probe:
    """Listen on the --metrics endpoint and stop at once; a port that is taken: by whom."""
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.error import CannotListenError
    from twisted.internet.protocol import Factory, Protocol

    if settings.metrics is None:
        return Probe("metrics", "skip", "no --metrics endpoint")
    endpoint = serverFromString(reactor, settings.metrics)
    try:
        port = await endpoint.listen(Factory.forProtocol(Protocol))
    except CannotListenError as e:
        code = getattr(e.socketError, "errno", None)
        number = getattr(endpoint, "_port", None)
        if code == errno.EADDRINUSE and isinstance(number, int):
            holders = port_holders(number)
            service = [p for p in holders if is_service(p)]
            if not holders and settings.state_dir:
                from .store import LOCK_FILE

                held, pid = lock_holder(os.path.join(settings.state_dir, LOCK_FILE))
                if held and pid is not None and is_service(pid):
                    return Probe("metrics", "in-use", f"{settings.metrics}: taken, by the "
                                 f"running service as it seems ({describe_pid(pid)} holds "
                                 "the state dir; its sockets are not visible to this user)")
            if service:
                return Probe("metrics", "in-use", f"{settings.metrics}: served by the running "
                             f"service ({describe_pid(service[0])})")
            who = describe_pid(holders[0]) if holders else "a process this user cannot see"
            return Probe("metrics", "fail", f"{settings.metrics}: port {number} is taken by "
                         f"{who}", "give --metrics a free port (e.g. "
                         "tcp:9166:interface=127.0.0.1)")
        if code == errno.EACCES:
            return Probe("metrics", "fail", f"{settings.metrics}: {user_name()} may not listen "
                         "there (ports below 1024 need privileges the service does not have)",
                         "give --metrics a port above 1023, e.g. tcp:9166:interface=127.0.0.1")
        why = e.socketError.strerror if hasattr(e.socketError, "strerror") else e
        return Probe("metrics", "fail", f"{settings.metrics}: cannot listen ({why})",
                     "give --metrics an address of this host and a free port")
    await port.stopListening()
    return Probe("metrics", "ok", f"{settings.metrics}: can listen (listened and closed)")


# -- the source -------------------------------------------------------------------------------


def _source_address(host: str, port: int) -> Optional[str]:
    """The address this host connects from toward ``host`` (no packet is sent)."""
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, kind) as s:
            s.connect(address)
            return s.getsockname()[0]
    except (OSError, IndexError):
        return None


def _http_fix(code: int, settings: Settings, safe_url: str) -> str:
    parts = urlsplit(settings.url)
    if code == 403:
        source = _source_address(parts.hostname or "localhost", parts.port or 80)
        who = f"this host's address toward it, {source}" if source else "this host's address"
        return (f"nginx's allow list for location = {parts.path or '/'} (sfive-location.conf) "
                f"does not admit {who}: add 'allow {source or 'ADDRESS'};' before 'deny all;' "
                "in a copy of sfive-location.conf that you include instead, then reload nginx")
    if code == 401:
        return "the exporter asks for credentials: give them in -u http://USER:PASSWORD@HOST/..."
    if code == 500:
        return ("nginx's error log says why; usually sfive.conf is not included in http { }, "
                "so its lua_shared_dict sfive is missing")
    return (f"include {LOCATION_CONF} in the server {{ }} that answers {safe_url} (and "
            "sfive.conf in http { }), then reload nginx; or correct -u")


class _LineReader:
    """A response body, split into lines and handed to ``on_line`` until it returns True, the
    body ends or ``stop`` is called; ``done`` fires then."""

    def __init__(self, sample: Sample, on_line: Any) -> None:
        from twisted.internet.defer import Deferred
        from twisted.internet.protocol import Protocol

        reader = self
        self.done = Deferred()
        self.stopped = False

        class Body(Protocol):
            def dataReceived(self, data: bytes) -> None:
                if reader.stopped:
                    return
                for line in sample.feed(data):
                    if on_line(line):
                        reader.stop()
                        return

            def connectionLost(self, reason: Any = None) -> None:
                if not reader.done.called:
                    reader.done.callback(None)

        self.protocol = Body()

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            if self.protocol.transport is not None:
                self.protocol.transport.stopProducing()


async def probe_exporter(options: CheckOptions, settings: Settings,
                         reactor: Any) -> Tuple[Probe, Optional[Sample]]:
    """Reachable, allowed, protocol 2, its ring; then the sample: the ring's last N records
    (``?v=2&ring=ID&after=S-N``, S from the first heartbeat), or S seconds of new ones."""
    import treq
    from twisted.web.client import Agent, HTTPConnectionPool

    from .fetch import USER_AGENT, _Discard, _header, describe, split_credentials

    url, auth, safe = split_credentials(settings.url)
    pool = HTTPConnectionPool(reactor, persistent=False)
    client = treq.client.HTTPClient(Agent(reactor, connectTimeout=settings.connect_timeout,
                                          pool=pool))

    async def get(params: Dict[str, str]) -> Any:
        return await client.get(url, params=params, headers={b"User-Agent": [USER_AGENT]},
                                auth=auth, unbuffered=True, timeout=settings.connect_timeout,
                                reactor=reactor)

    try:
        response = await get({"v": "2"})
    except Exception:
        from twisted.python.failure import Failure

        why = describe(Failure())
        return Probe("exporter", "fail", f"{safe}: cannot fetch ({why or 'no answer'})",
                     "is nginx running and listening there? -u must name the server { } that "
                     "includes sfive-location.conf"), None
    if response.code != 200:
        response.deliverBody(_Discard())
        phrase = response.phrase.decode("latin-1")
        return Probe("exporter", "fail", f"{safe}: HTTP {response.code} {phrase}",
                     _http_fix(response.code, settings, safe)), None
    protocol = _header(response, b"X-Sfive-Protocol")
    ring = _header(response, b"X-Sfive-Ring")
    kind = _header(response, b"Content-Type") or "none"
    sample = Sample(settings, "exporter")
    if protocol is None and not kind.startswith("application/x-ndjson"):
        response.deliverBody(_Discard())
        return Probe("exporter", "fail", f"{safe}: answers, but not as the sfive exporter "
                     f"(Content-Type {kind})", _http_fix(404, settings, safe)), None
    if protocol != "2" or ring is None:
        probe = Probe("exporter", "warn", f"{safe}: protocol 1 (an older sfive.lua): no "
                      "heartbeats, so intervals close by the clock",
                      "install this release's sfive.lua and reload nginx")
        sample.note = "new records while the timeout lasted (protocol 1 has no ring position)"
        await _read(sample, response, reactor, options["timeout"],
                    lambda line: (sample.line(line), sample.lines >= options["sample"])[1])
        return probe, sample

    first: List[Heartbeat] = []
    seconds = options["seconds"]

    def until_heartbeat(line: bytes) -> bool:
        result = sample.line(line) if seconds is not None else sample.parser.parse(line)
        if type(result) is Heartbeat and not first:
            first.append(result)
            return seconds is None
        return False

    started = time.monotonic()
    timeout = seconds if seconds is not None else options["timeout"]
    await _read(sample, response, reactor, timeout, until_heartbeat)
    newest = first[0].seq if first else None
    message = f"{safe}: protocol 2, ring {ring}" + (
        "" if newest is None else f", newest record {newest}")
    if newest is None:
        return Probe("exporter", "fail", message + ": no heartbeat within "
                     f"{options['timeout']:g}s", "nginx's error log says why"), None
    probe = Probe("exporter", "ok", message)
    if seconds is not None:
        sample.note = f"the records of {seconds:g} seconds"
        return probe, sample
    want = options["sample"]
    if newest == 0:
        sample.note = "the ring is empty: nginx has finished no request since it started"
        return probe, sample
    after = max(0, newest - want)
    sample = Sample(settings, "exporter")
    sample.note = f"the ring's last {min(want, newest)} records ({after + 1} to {newest})"
    try:
        response = await get({"v": "2", "ring": ring, "after": str(after)})
    except Exception:
        from twisted.python.failure import Failure

        return Probe("exporter", "fail", f"{safe}: cannot fetch the sample "
                     f"({describe(Failure())})", "try again"), None

    def until_newest(line: bytes) -> bool:
        sample.line(line)
        return sample.parser.last_seq is not None and sample.parser.last_seq >= newest

    left = max(0.5, options["timeout"] - (time.monotonic() - started))
    if not await _read(sample, response, reactor, left, until_newest):
        sample.complete = False
        sample.note += f"; cut at --timeout {options['timeout']:g}s"
    if sample.lost:
        sample.note += f"; the ring no longer held {sample.lost} of them"
    return probe, sample


async def _read(sample: Sample, response: Any, reactor: Any, timeout: float,
                on_line: Any) -> bool:
    """Feed the body's lines to ``on_line`` until it says stop (True) or ``timeout`` seconds
    passed (False); the connection is closed either way."""
    reader = _LineReader(sample, on_line)
    expired: List[bool] = []

    def expire() -> None:
        expired.append(True)
        reader.stop()

    call = reactor.callLater(timeout, expire)
    response.deliverBody(reader.protocol)
    await reader.done
    if call.active():
        call.cancel()
    return not expired


def tail(fd: int, lines: int, max_line: int) -> Tuple[bytes, bool]:
    """The last ``lines`` complete lines of an open file (at most ``lines`` lines as long as
    the service reads), and whether they reach back to the file's start."""
    size = os.fstat(fd).st_size
    end = size
    budget = lines * (max_line + 2)
    chunk = 1 << 16
    data = b""
    while end > 0 and data.count(b"\n") <= lines and len(data) < budget:
        start = max(0, end - chunk)
        data = os.pread(fd, end - start, start) + data
        end = start
    last = data.rfind(b"\n")
    data = data[: last + 1]  # a line nginx is still writing is not complete yet
    if end > 0:
        data = data[data.find(b"\n") + 1:]  # a partial first line
    return data, end == 0


def probe_file(options: CheckOptions, settings: Settings) -> Tuple[Probe, Optional[Sample]]:
    """Present, readable by this user, in the sfive format; the sample is its last N lines."""
    path = settings.file
    assert path is not None
    me = user_name()
    directory = os.path.dirname(path)
    access = ("keep the log in a directory of its own that the service's group may read "
              f"(install -d -o www-data -g {me} -m 2750 {directory}) and have nginx write it "
              "there (README.Debian, \"Reading nginx's access log\")")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        if os.path.isdir(directory) and not os.access(directory, os.X_OK):
            return Probe("file", "fail", f"{path}: {me} cannot look into {directory}",
                         access), None
        return Probe("file", "fail", f"{path}: no such file",
                     f"include {LOG_CONF} in http {{ }} and add 'access_log {path} sfive "
                     "buffer=64k flush=1s;' where the streams are served, then reload nginx "
                     "(the service waits for the file meanwhile)"), None
    except PermissionError:
        return Probe("file", "fail", f"{path}: not readable by {me}", access), None
    except OSError as e:
        return Probe("file", "fail", f"{path}: {e.strerror}", "--file names nginx's access "
                     "log in the sfive format"), None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return Probe("file", "fail", f"{path}: not a regular file",
                         "--file names nginx's access log in the sfive format"), None
        data, whole = tail(fd, options["sample"], settings.max_line_length)
    finally:
        os.close(fd)
    sample = Sample(settings, "file")
    sample.parser.repair_utf8 = True  # escape=json passes invalid UTF-8 through (follow.py)
    lines = sample.feed(data)[-options["sample"]:]
    for line in lines:
        sample.line(line)
    sample.note = f"the file's last {sample.lines} lines" + (" (all of it)" if whole else "")
    bad = sum(n for reason, n in sample.rejected.items() if reason in FORMAT_REASONS)
    fix = (f"include {LOG_CONF} in http {{ }} and log with its format by name: 'access_log "
           f"{path} sfive buffer=64k flush=1s;', then reload nginx")
    verdict = format_verdict(sample.parser, lines)
    if verdict is not None:
        what = ("nginx's combined (or another text) format" if verdict[0] == TEXT_LOG
                else "not the sfive format")
        return Probe("file", "fail", f"{path}: readable, but its lines are in {what}",
                     fix), sample
    if bad:
        return Probe("file", "warn", f"{path}: {bad} of {sample.lines} lines are not in the "
                     "sfive format (another access_log writes into it?)", fix), sample
    return Probe("file", "ok", f"{path}: readable by {me}" + (
        ", in the sfive format" if sample.lines else ", empty")), sample


# -- the whole check --------------------------------------------------------------------------


async def check(options: CheckOptions, reactor: Any) -> Tuple[int, Dict[str, Any]]:
    """Every probe and the sample: (exit status, report)."""
    settings = options.settings()
    probes = [Probe("options", "ok", f"{len(settings.streamers)} streams from -S, "
                    f"{settings.duration}s intervals, hostname {settings.hostname}")]
    if options.user is None and os.geteuid() == 0:
        probes.append(Probe("user", "warn", f"probing as root: there is no user {SERVICE_USER}"
                            " (the Debian package's) to probe as",
                            "give --user with the user the service runs as"))
    if settings.file:
        source, sample = probe_file(options, settings)
    else:
        source, sample = await probe_exporter(options, settings, reactor)
    probes.append(source)
    if settings.socket:
        probes.append(probe_socket(settings.socket))
    elif settings.hub:
        probes.append(await probe_hub(settings, reactor))
    else:
        probes.append(Probe("hub", "warn", "no --socket or --hub: datasets go to standard "
                            "output (which the Debian daemon discards)",
                            "give --socket PATH (the hub's datagram socket) or --hub ENDPOINT"))
    probes.append(probe_state(settings.state_dir))
    probes.append(await probe_metrics(settings, reactor))
    failed = [p for p in probes if p.status == "fail"]
    if failed or sample is None:
        status = 1
        verdict = f"{len(failed)} probe(s) failed"
    elif sample.lines == 0:
        status = 2
        verdict = "the sample is empty: nothing to judge the configuration by"
    elif sample.accepted == 0:
        status = 1
        verdict = f"nothing of the {sample.lines} sampled records counts"
    else:
        status = 0
        verdict = f"usable; {sample.accepted} of {sample.lines} sampled records count"
    report = {"version": __version__, "user": identity(), "status": status,
              "verdict": verdict, "probes": [asdict(p) for p in probes],
              "sample": sample.summary() if sample is not None else None}
    return status, report


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def render(report: Dict[str, Any], out: IO[str]) -> None:
    """The report for a person at a terminal."""
    w = out.write
    w(f"sfive-ngxlua-check {report['version']}, probing as {report['user']}\n")
    labels = {"ok": "ok", "warn": "WARN", "in-use": "in use", "fail": "FAIL", "skip": "-"}
    for p in report["probes"]:
        w(textwrap.fill(p["message"], 100, initial_indent=f"  {labels[p['status']]:<7}"
                        f"{p['name']:<9}", subsequent_indent=" " * 18,
                        break_on_hyphens=False) + "\n")
        if p["fix"] and p["status"] in ("fail", "warn"):
            w(textwrap.fill(p["fix"], 100, initial_indent=" " * 18 + "fix: ",
                            subsequent_indent=" " * 23, break_on_hyphens=False) + "\n")
    sample = report["sample"]
    if sample is not None:
        w(f"sample: {sample['lines']} lines, {sample['note']}\n")
        counted = sample["counted"]
        w(f"  counted: {counted['records']} records, {_size(counted['bytes'])}\n")
        width = max([len(s["stream"]) for s in sample["streams"] + sample["unlisted"]] + [10])
        for s in sample["streams"]:
            if s["records"]:
                w(f"    {s['stream']:<{width}}  {s['records']:>7} records  "
                  f"{_size(s['bytes'])}\n")
        idle = [s["stream"] for s in sample["streams"] if not s["records"]]
        if idle:
            w(textwrap.fill(", ".join(idle), 100, initial_indent="    no records: ",
                            subsequent_indent=" " * 16, break_on_hyphens=False) + "\n")
        for reason, r in sample["rejected"].items():
            w(f"  rejected, {reason}: {r['count']}\n")
            for e in r["examples"]:
                w(f"    {e['count']:>7}  {e['what']}: {e['why']}\n")
        if sample["unlisted"]:
            w("  streams the name format yields but -S does not list:\n")
            for s in sample["unlisted"]:
                w(f"    {s['stream']:<{width}}  {s['records']:>7} records  "
                  f"{_size(s['bytes'])}\n")
            w(f"  to count them, add: {' '.join(sample['add'])}\n")
    w(f"result: {report['verdict']} (exit status {report['status']})\n")


def main(argv: Optional[List[str]] = None) -> None:
    """Console entry point."""
    args = sys.argv[1:] if argv is None else argv
    options = CheckOptions()
    try:
        options.parseOptions(args)
    except usage.UsageError as e:
        sys.stderr.write(f"sfive-ngxlua-check: {e} (sfive-ngxlua-check --help lists the "
                         "options)\n")
        if "--json" in args:
            print(json.dumps({"version": __version__, "status": EX_CONFIG,
                              "verdict": f"invalid options: {e}", "probes": [],
                              "sample": None}))
        sys.exit(EX_CONFIG)
    become(options.user)
    from twisted.internet import task
    from twisted.internet.defer import ensureDeferred

    status: List[int] = []

    async def run(reactor: Any) -> None:
        code, report = await check(options, reactor)
        if options["json"]:
            print(json.dumps(report, indent=2))
        else:
            render(report, sys.stdout)
        sys.stdout.flush()
        status.append(code)

    try:
        task.react(lambda reactor: ensureDeferred(run(reactor)))
    except SystemExit:
        pass
    sys.exit(status[0] if status else 1)

