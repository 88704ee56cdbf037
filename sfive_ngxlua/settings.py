"""Command-line options, validated once and turned into one frozen Settings object."""

from __future__ import annotations

import difflib
import os
import re
import socket
import sys
from dataclasses import dataclass, field
from typing import FrozenSet, List, Optional, Tuple
from urllib.parse import urlsplit

from twisted.python import usage

from .privacy import FULL, ClientIP

DEFAULT_NAMEFORMAT = r"/[^/]+/(?P<format>hls|dash)/(?P<content>.+)-(?P<quality>[^-]+)/.*"
DEFAULT_URL = "http://localhost/sfive"

StreamerKey = Tuple[str, str, str]
"""(content-id, format, quality)"""


DEFAULT_QUEUE_BYTES = 256 << 20
"""--queue-bytes' default (the hub queue's bound in bytes)."""


@dataclass(frozen=True)
class Settings:
    """Everything the model, the sinks and the services need; built once from the options."""

    streamers: Tuple[StreamerKey, ...]
    hostname: str = field(default_factory=socket.gethostname)
    duration: int = 15
    tags: Tuple[str, ...] = ()
    nameformat: str = DEFAULT_NAMEFORMAT
    statuses: FrozenSet[int] = frozenset({200, 206})
    grace: float = 1.0
    max_delay: float = 300.0
    max_clients: int = 50000
    max_ua_length: int = 512
    max_line_length: int = 65536
    url: str = DEFAULT_URL
    socket: Optional[str] = None
    hub: Optional[str] = None
    queue_limit: int = 1000
    queue_bytes: int = DEFAULT_QUEUE_BYTES
    state_dir: Optional[str] = None
    idle_timeout: float = 60.0
    connect_timeout: float = 10.0
    metrics: Optional[str] = None
    file: Optional[str] = None
    flush_period: float = 1.0
    client_ip: ClientIP = FULL


def parse_streamer_ids(specs: list[str]) -> Tuple[StreamerKey, ...]:
    """Expand ``C1[,C2]/F1[,F2]/Q1[,Q2]`` specs into their combinations, in order, once each."""
    out: dict[StreamerKey, None] = {}
    for spec in specs:
        parts = spec.split("/")
        if len(parts) != 3:
            raise usage.UsageError(
                f"streamer id {spec!r}: must be three parts CONTENT/FORMAT/QUALITY separated by '/'"
            )
        lists = [[p for p in part.split(",")] for part in parts]
        for name, values in zip(("content", "format", "quality"), lists):
            if not all(v.strip() for v in values):
                raise usage.UsageError(f"streamer id {spec!r}: empty {name} part")
        for c in lists[0]:
            for f in lists[1]:
                for q in lists[2]:
                    out[(c.strip(), f.strip(), q.strip())] = None
    return tuple(out)


def compile_nameformat(pattern: str) -> re.Pattern[str]:
    """Compile the URL regex and check it names the groups content, format and quality."""
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise usage.UsageError(
            f"name format {pattern!r} is not a valid regular expression: {e}"
        ) from None
    missing = {"content", "format", "quality"} - set(compiled.groupindex)
    if missing:
        raise usage.UsageError(
            f"name format {pattern!r} lacks the named group(s) {', '.join(sorted(missing))}"
        )
    return compiled


def _positive_int(what: str, value: object) -> int:
    try:
        n = int(str(value), 10)
    except ValueError:
        raise usage.UsageError(f"{what} must be a positive integer, not {value!r}") from None
    if n <= 0:
        raise usage.UsageError(f"{what} must be a positive integer, not {value!r}")
    return n


def _bytes(what: str, value: object) -> int:
    """A positive number of bytes, with an optional K, M or G suffix (powers of 1024)."""
    text = str(value).strip()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
    digits = text[:-1] if scale > 1 else text
    if not digits.isdigit() or int(digits) <= 0:
        raise usage.UsageError(
            f"{what} must be a positive number of bytes (K, M, G for KiB, MiB, GiB), "
            f"not {value!r}")
    return int(digits) * scale


def _seconds(what: str, value: object, positive: bool = False) -> float:
    """A finite number of seconds, at least 0 (above 0 if ``positive``)."""
    try:
        x = float(str(value))
    except ValueError:
        raise usage.UsageError(f"{what} must be a number of seconds, not {value!r}") from None
    if not (x > 0 if positive else x >= 0) or x == float("inf"):
        kind = "positive" if positive else "non-negative"
        raise usage.UsageError(f"{what} must be a {kind} number of seconds, not {value!r}")
    return x


def _check_endpoint(option: str, description: str, client: bool, example: str) -> None:
    """Parse a Twisted endpoint string now (no reactor needed), so a typo fails at start, with
    the reason in the operator's own terms (``tcp needs port=``, not Twisted's TypeError)."""
    from twisted.internet.endpoints import clientFromString, serverFromString

    problem = _endpoint_problem(description, client)
    if problem is None:
        try:
            (clientFromString if client else serverFromString)(None, description)
        except (ValueError, TypeError, KeyError) as e:
            problem = _endpoint_error(e, description)
    if problem is not None:
        kind = "client" if client else "server"
        raise usage.UsageError(
            f"{option} {description!r}: not a {kind} endpoint ({problem}); e.g. {example}")


def endpoint_fields(description: str) -> Tuple[str, List[str], dict]:
    """An endpoint string's type, positional and keyword parameters (``\\:`` escapes)."""
    parts, current, escaped = [], [], False
    for char in description:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    args = [p for p in parts[1:] if "=" not in p]
    kwargs = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    return parts[0], args, kwargs


def _endpoint_problem(description: str, client: bool) -> Optional[str]:
    """What Twisted would accept here and fail on later: a unix socket without a path, a TCP
    port out of range."""
    kind, args, kwargs = endpoint_fields(description)
    if kind == "unix" and not (kwargs.get("path") or (args and args[0])):
        return "unix needs path=PATH"
    if kind in ("tcp", "tcp6"):
        port = kwargs.get("port", args[1 if client else 0] if len(args) > int(client) else None)
        if port is not None and port.isdigit() and not (int(client) <= int(port) <= 65535):
            return f"port {port} is out of range ({int(client)}-65535)"
    return None


def _endpoint_error(error: Exception, description: str) -> str:
    """Twisted's parse error (a TypeError of a constructor, an int() error) in the terms of
    the endpoint string the operator wrote."""
    kind = endpoint_fields(description)[0]
    text = str(error)
    missing = re.search(r"missing \d+ required (?:positional|keyword-only) arguments?: (.*)", text)
    if missing:
        names = re.findall(r"'(\w+)'", missing.group(1))
        return f"{kind} needs " + " and ".join(f"{name}=" for name in names)
    unexpected = re.search(r"unexpected keyword argument '(\w+)'", text)
    if unexpected:
        return f"{kind} has no parameter {unexpected.group(1)}="
    unknown = re.search(r"Unknown endpoint type: '(.*)'", text)
    if unknown:
        if "/" in kind:
            return f"no endpoint type before {kind!r}: a unix socket is unix:path={kind}"
        return f"unknown endpoint type {kind!r}" if kind else "empty"
    number = re.search(r"invalid literal for int\(\) with base 10: '(.*)'", text)
    if number:
        return f"{number.group(1)!r} is not a whole number"
    return text


def _statuses(value: str) -> FrozenSet[int]:
    codes = set()
    for part in value.split(","):
        part = part.strip()
        if not (part.isdigit() and 100 <= int(part) <= 599):
            raise usage.UsageError(f"--status: {part!r} is not an HTTP status code (100-599)")
        codes.add(int(part))
    return frozenset(codes)


def _client_ip(value: str) -> ClientIP:
    try:
        return ClientIP.parse(value)
    except ValueError as e:
        raise usage.UsageError(f"--client-ip: {e}") from None


def parse_command_line(options: usage.Options, argv: Optional[List[str]], program: str) -> None:
    """A console command's options from ``argv`` (default: the process's arguments); on a
    usage error, one line on standard error and exit status 64 (EX_USAGE)."""
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        sys.stderr.write(error_line(program, e, options, f"{program} --help") + "\n")
        sys.exit(64)


def error_line(program: str, error: Exception, options: usage.Options, help_command: str) -> str:
    """One line saying what is wrong with the options and how to find the right ones; an
    unknown option gets the nearest known ones."""
    text = " ".join(str(error).split())
    unknown = re.match(r"option (--?[\w-]+) not recognized", text)
    if unknown:
        known = ["--" + name.rstrip("=") for name in getattr(options, "longOpt", [])]
        near = difflib.get_close_matches(unknown.group(1), known, n=2, cutoff=0.85)
        if near:
            text += f" (did you mean {' or '.join(near)}?)"
    return f"{program}: {text}; {help_command} lists the options"


class ModelOptions(usage.Options):
    """The options that decide what is counted and how it is reported (service and replay)."""

    optParameters = [
        ["hostname", "n", None, "hostname reported in the datasets [default: this machine's name]"],
        ["duration", "d", "15", "interval length in seconds"],
        ["nameformat", "F", DEFAULT_NAMEFORMAT,
         "regex over the URL with named groups content, format, quality"],
        ["status", None, "200,206", "HTTP status codes that count, comma separated"],
        ["grace", None, "1", "seconds to wait after an interval's end before reporting it"],
        ["max-delay", None, "300",
         "seconds an interval is held while the exporter's records for it are not in (it is "
         "unreachable, or its backlog is being read); then what is known is reported "
         "(partial), or the interval is withheld if the source vouched for none of it"],
        ["max-clients", None, "50000",
         "distinct clients kept per interval and streamer; more are folded into one entry"],
        ["max-ua-length", None, "512", "user agents are truncated to this many characters"],
        ["max-line-length", None, "65536", "longer exporter lines are skipped and counted"],
        ["client-ip", None, "full",
         "client addresses as counted and sent: full, truncate (IPv4 /24, IPv6 /48) or "
         "keyed:FILE (a keyed hash, the key in FILE; a new key is picked up while running)"],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["tags"] = []
        self["streamer-ids"] = []

    def opt_tag(self, tag: str) -> None:
        """tag added to every dataset (repeatable)"""
        self["tags"].append(tag)

    opt_t = opt_tag

    def opt_streamer_id(self, spec: str) -> None:
        """C1[,C2]/F1[,F2]/Q1[,Q2]: the streamers to report (repeatable, at least one)"""
        self["streamer-ids"].append(spec)

    opt_S = opt_streamer_id

    def postOptions(self) -> None:
        if not self["streamer-ids"]:
            raise usage.UsageError("at least one --streamer-id/-S is required")
        compile_nameformat(self["nameformat"])
        self.settings_kwargs = dict(
            streamers=parse_streamer_ids(self["streamer-ids"]),
            hostname=self["hostname"] or socket.gethostname(),
            duration=_positive_int("--duration", self["duration"]),
            tags=tuple(self["tags"]),
            nameformat=self["nameformat"],
            statuses=_statuses(self["status"]),
            grace=_seconds("--grace", self["grace"]),
            max_delay=_seconds("--max-delay", self["max-delay"]),
            max_clients=_positive_int("--max-clients", self["max-clients"]),
            max_ua_length=_positive_int("--max-ua-length", self["max-ua-length"]),
            max_line_length=_positive_int("--max-line-length", self["max-line-length"]),
            client_ip=_client_ip(self["client-ip"]),
        )
        super().postOptions()

    def settings(self) -> Settings:
        """The validated options as one frozen object."""
        return Settings(**self.settings_kwargs)


def check_hub(socket: Optional[str], hub: Optional[str]) -> None:
    """``--socket`` or ``--hub`` (a client endpoint), not both (the service, replay, retire)."""
    if socket and hub:
        raise usage.UsageError("give either --socket or --hub, not both")
    if hub is not None:
        _check_endpoint("--hub", hub, client=True,
                        example="unix:path=/run/sfive/pipe or tcp:host=hub:port=4000")


class HubOptions(usage.Options):
    """Where the datasets go (the service and replay): the hub and its queue's bounds. Mixed
    in after ``ModelOptions``, whose ``postOptions`` hands on to this one's."""

    optParameters = [
        ["socket", "s", None, "the sfive hub's unix datagram socket [default: stdout]"],
        ["hub", None, None,
         "the sfive hub as a stream client endpoint, e.g. unix:path=/run/sfive/pipe"],
        ["queue-limit", None, "1000", "datasets kept while the hub is away or slow"],
        ["queue-bytes", None, "256M",
         "bytes of datasets kept while the hub is away or slow (K, M, G suffixes)"],
    ]

    def postOptions(self) -> None:
        check_hub(self["socket"], self["hub"])
        self.settings_kwargs.update(
            socket=self["socket"],
            hub=self["hub"],
            queue_limit=_positive_int("--queue-limit", self["queue-limit"]),
            queue_bytes=_bytes("--queue-bytes", self["queue-bytes"]),
        )
        super().postOptions()


class Options(ModelOptions, HubOptions):
    """``twistd sfive-ngxlua`` options: the model's and the hub's, plus the source (the
    exporter or the access log), the state dir and the metrics endpoint."""

    synopsis = "[options]"
    longdesc = (
        "Reads the nginx-lua exporter's stream of finished requests (or, with --file, nginx's "
        "own access log in the sfive format) and sends one sfive version-1 dataset per "
        "streamer and interval to the sfive hub."
    )
    optParameters = [
        ["url", "u", DEFAULT_URL, "URL of the nginx sfive exporter (http or https)"],
        ["idle-timeout", None, "60", "reconnect when the exporter sends nothing for this long"],
        ["connect-timeout", None, "10", "give up on a connection attempt after this long"],
        ["metrics", None, None,
         "serve Prometheus metrics on this server endpoint, e.g. tcp:9166:interface=127.0.0.1"],
        ["state-dir", None, None,
         "keep the open intervals, the exporter position and the hub queue in this directory "
         "across restarts and crashes [default: none, all in memory]"],
        ["file", None, None,
         "follow nginx's access log in the sfive format (nginx/sfive-log.conf) instead of -u"],
        ["flush-period", None, "1",
         "with --file: the access_log's flush= in seconds (lines lag that much)"],
    ]

    def opt_version(self) -> None:
        """print this program's version and exit"""
        from twisted import version as twisted_version

        from . import __version__
        from .records import default_decoder

        print(f"sfive-ngxlua {__version__} (Twisted {twisted_version.short()}, "
              f"Python {sys.version.split()[0]}, lines decoded by {default_decoder()})")
        sys.exit(0)

    def postOptions(self) -> None:
        super().postOptions()
        parts = urlsplit(self["url"])
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise usage.UsageError(f"--url {self['url']!r}: must be an http:// or https:// URL")
        try:
            port = parts.port
        except ValueError as e:
            raise usage.UsageError(f"--url {self['url']!r}: {e}") from None
        if port == 0:
            raise usage.UsageError(f"--url {self['url']!r}: port 0")
        idle = _seconds("--idle-timeout", self["idle-timeout"], positive=True)
        connect = _seconds("--connect-timeout", self["connect-timeout"], positive=True)
        if self["metrics"]:
            try:
                import prometheus_client  # noqa: F401
            except ImportError:
                raise usage.UsageError(
                    "--metrics needs the prometheus_client library: pip install "
                    "'sfive-ngxlua[metrics]' or apt-get install python3-prometheus-client"
                ) from None
            _check_endpoint("--metrics", self["metrics"], client=False,
                            example="tcp:9166:interface=127.0.0.1")
        state_dir = self["state-dir"]
        if state_dir is not None:
            if not state_dir.strip():
                raise usage.UsageError("--state-dir: empty path")
            state_dir = os.path.abspath(state_dir)
            if os.path.exists(state_dir) and not os.path.isdir(state_dir):
                raise usage.UsageError(f"--state-dir {state_dir!r}: not a directory")
        self.settings_kwargs.update(
            url=self["url"], idle_timeout=idle, connect_timeout=connect, metrics=self["metrics"],
            state_dir=state_dir,
        )
        self._file_options()

    def _file_options(self) -> None:
        """--file (the access-log follower) and its --flush-period."""
        path = self["file"]
        if path is not None:
            if self["url"] != DEFAULT_URL:
                raise usage.UsageError("give either --url or --file, not both")
            if not path or path.endswith("/"):
                raise usage.UsageError(f"--file {path!r}: must name a file")
            path = os.path.abspath(path)
        elif self["flush-period"] != "1":
            raise usage.UsageError("--flush-period goes with --file (the access log's flush=)")
        self.settings_kwargs.update(
            file=path, flush_period=_seconds("--flush-period", self["flush-period"]))
