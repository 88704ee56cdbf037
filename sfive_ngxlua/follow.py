"""nginx's own access log as a source: follow a file as nginx appends to it, across rotations.

The file holds lines in the exporter's format (nginx/sfive-log.conf), so they go into the same
Pipeline as the exporter's stream. Only complete lines are parsed: each open file has its own
LineSplitter, and the position kept for the state store is the end of the last complete line.

A file is known by its device, inode and first line (its "head"), never by its path alone:

- rename and create (logrotate's default, then USR1 to nginx): the renamed file is kept open and
  read while nginx's workers, one after another, reopen their logs; it is let go once it has
  been quiet for longer than the flush period (plus a second of slack), the new file at the path
  being read meanwhile from its start;
- copytruncate: the file shrinks under the reader (or its head changes): counted, logged, read
  again from its start; what the copy holds beyond the position is read from the copy, and the
  lines nginx wrote between the copy and the truncation are lost, by the nature of copytruncate;
- deleted and created again, absent at start: waited for, read from the start once it is there;
- while the service was down: the saved files are found again by identity, and the log's files
  that came after them (the ones in between when it was rotated more than once, or the copy of a
  file saved before it had a complete line, whose truncation nothing else can tell) are read from
  their start, oldest first: the position names the log's other files, done with (``seen``);
- compressed after its rotation (``compress`` without ``delaycompress``): gzip, bzip2 and xz
  are read through their decompressors (``_Packed``: the saved file's rest from its offset, a
  file that came after from its start); one that cannot be read is an announced loss, named.

A file's first lines are checked when it is opened (or once it has them): a log that is not in
the sfive format (nginx's ``combined``, say) is one error naming nginx/sfive-log.conf, counted
in ``stats.warnings``; it is followed all the same (its lines rejected and counted), so that
the sfive lines nginx writes into it after the fix count without a restart.

Changes are noticed through inotify on the file's directory where Twisted has it, and by polling
on the injected clock anyway (every second with inotify, as a safety net; four times a second
without).

Its states (lifecycle.Lifecycle): ``waiting-for-file`` (no readable file at the path),
``reading-backlog``, ``following`` (caught up), and ``retrying`` after an error nobody expected
(its traceback logged once and counted; the next look comes after a backoff, and reading goes
on from the first line not yet folded into the model).
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import math
import os
import stat
import zlib
from typing import IO, Any, Callable, Dict, Iterator, List, Optional, Tuple

from twisted.application.internet import backoffPolicy
from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from .conditions import not_sfive
from .lifecycle import STOPPED, Lifecycle
from .lines import LineSplitter
from .pipeline import Pipeline
from .settings import Settings
from .stats import Stats

CHUNK = 1 << 20
"""Bytes read at once."""
BUDGET = 8 * CHUNK
"""Bytes read per turn of the reactor while reading a backlog, so the rest of the service runs."""
HEAD = 256
"""A file's identity includes its first line, up to this many bytes."""
ROTATED_SLACK = 1.0
"""Seconds a rotated file must be quiet beyond the flush period before it is let go."""
POLL_WITH_INOTIFY = 1.0
POLL_WITHOUT_INOTIFY = 0.25
WAITING, BACKLOG, FOLLOWING = "waiting-for-file", "reading-backlog", "following"
PACKED: Dict[bytes, Tuple[str, Optional[Callable[[IO[bytes]], IO[bytes]]]]] = {
    b"\x1f\x8b": ("gzip", lambda raw: gzip.GzipFile(fileobj=raw, mode="rb")),
    b"BZh": ("bzip2", bz2.BZ2File),
    b"\xfd7zXZ\x00": ("xz", lzma.LZMAFile),
    b"\x28\xb5\x2f\xfd": ("zstd", None),
    b"\x04\x22\x4d\x18": ("lz4", None),
}
"""Magic numbers of the compressions logrotate may use, with a reader where the standard library
has one: a rotated log compressed is read through it (``_Packed``); zstd and lz4 are not."""
UNPACK_ERRORS = (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError)
"""What a decompressor raises on a file that is corrupt or cut short."""
FORMAT_LINES = 8
FORMAT_BYTES = 64 << 10
"""A file's format is checked on its first FORMAT_LINES lines, read from its first FORMAT_BYTES
bytes."""


def _digest(head: bytes) -> str:
    return hashlib.blake2b(head, digest_size=8).hexdigest()


def _first_line(data: bytes) -> bytes:
    """A file's first line (with its newline), or what it has of it, from its first bytes."""
    nl = data.find(b"\n")
    return data[: nl + 1] if nl >= 0 else data


def _int(value: Any) -> int:
    """A saved count, 0 where it is malformed."""
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _packing(head: bytes) -> Optional[str]:
    """The compression a file's first bytes name (gzip, bzip2, xz, zstd, lz4), or None."""
    for magic, (kind, _) in PACKED.items():
        if head.startswith(magic):
            return kind
    return None


class _File:
    """One open log file: identity, read position, end of the last complete line, own splitter.
    Its bytes are read through ``pread`` (a compressed rotation, ``_Packed``, decompresses)."""

    packed = False

    def __init__(self, name: str, fd: int, st: os.stat_result, now: float,
                 max_line: int) -> None:
        self.name = name
        self.fd = fd
        self.dev = st.st_dev
        self.ino = st.st_ino
        self.offset = 0
        self.line_end = 0
        self.splitter = LineSplitter(max_line)
        self.head: Optional[bytes] = None
        self.last_growth = now
        self.skip = 0
        """Lines at ``offset`` already folded into the model: a feed raised after them."""
        self.sfive: Optional[bool] = None
        """Whether its first lines are in the sfive format (None: not checked yet)."""

    def pread(self, n: int, offset: int) -> bytes:
        return os.pread(self.fd, n, offset)

    def fits(self, offset: int) -> bool:
        """Whether a saved offset lies within the file."""
        return 0 <= offset <= os.fstat(self.fd).st_size

    def rewritten(self) -> bool:
        """Shrunk below the read offset, or begins otherwise (copytruncate, a rewrite)."""
        return os.fstat(self.fd).st_size < self.offset or not self.head_matches()

    def unread(self) -> bool:
        """Whether it holds bytes not read yet."""
        return os.fstat(self.fd).st_size != self.offset

    def catch_up(self, budget: int) -> int:
        """Bytes passed over on the way to ``offset`` (a compressed file only)."""
        return 0

    def behind(self) -> bool:
        return False

    def finished(self, now: float, quiet: float) -> bool:
        """A rotated file is let go once quiet for longer than ``quiet`` (nginx's workers may
        write it until they have reopened their logs)."""
        return now - self.last_growth > quiet

    def learn_head(self) -> None:
        """Remember the first line (up to HEAD bytes) once the file has it."""
        data = self.pread(HEAD, 0)
        nl = data.find(b"\n")
        if nl >= 0:
            self.head = data[: nl + 1]
        elif len(data) == HEAD:
            self.head = data

    def head_matches(self) -> bool:
        """Whether the file still begins as it did (False: truncated or rewritten in place)."""
        return self.head is None or self.pread(len(self.head), 0) == self.head

    def ident(self) -> dict:
        head = self.head or b""
        return {"dev": self.dev, "ino": self.ino, "head": _digest(head), "head_len": len(head),
                "offset": self.line_end}

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _Packed(_File):
    """A rotated log compressed after its rotation (logrotate's ``compress``: gzip, bzip2 or
    xz), read once to its end from its start or from a saved offset (in its uncompressed
    bytes), reached a budget at a time (``catch_up``); it never grows. Its first FORMAT_BYTES
    are kept apart for the head and format checks."""

    packed = True

    def __init__(self, name: str, fd: int, st: os.stat_result, now: float, max_line: int,
                 kind: str, opener: Callable[[IO[bytes]], IO[bytes]]) -> None:
        super().__init__(name, fd, st, now, max_line)
        self.kind = kind
        self._opener = opener
        self._raw: Optional[IO[bytes]] = None
        self._stream: Optional[IO[bytes]] = None
        self._pos = 0
        self._first: Optional[bytes] = None
        self._error: Optional[BaseException] = None
        self.eof = False

    def _unpacked(self) -> Tuple[IO[bytes], IO[bytes]]:
        """A decompressor from the file's start (one at a time: a dup shares the offset)."""
        raw = os.fdopen(os.dup(self.fd), "rb")
        try:
            raw.seek(0)
            return raw, self._opener(raw)
        except BaseException:
            raw.close()
            raise

    def _restart(self) -> None:
        self._close_stream()
        self._raw, self._stream = self._unpacked()
        self._pos, self.eof, self._error = 0, False, None

    def _skip(self, n: int) -> int:
        done = 0
        while done < n and not self.eof:
            done += len(self._some(min(CHUNK, n - done)))
        return done

    def _some(self, n: int) -> bytes:
        """At most ``n`` bytes from one step of the decompressor (b"": its end), so that what
        precedes a cut or a corrupt block is read before the error is."""
        assert self._stream is not None
        data = self._stream.read1(n)  # type: ignore[attr-defined]
        self._pos += len(data)
        self.eof = not data
        return data

    def pread(self, n: int, offset: int) -> bytes:
        """Its first bytes (up to FORMAT_BYTES): the head and format checks' reads."""
        if offset != 0:
            raise ValueError("a compressed file is read in order (catch_up, read_on)")
        if self._first is None:
            raw, stream = self._unpacked()
            try:
                self._first = stream.read(FORMAT_BYTES)
            finally:
                stream.close()
                raw.close()
        return self._first[:n]

    def read_on(self, n: int) -> bytes:
        """Up to ``n`` bytes at ``offset`` (where ``catch_up`` brought the decompressor); an
        error after some bytes is raised by the next call, after they are read."""
        assert self._pos == self.offset
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        parts: List[bytes] = []
        got = 0
        try:
            while got < n and not self.eof:
                data = self._some(n - got)
                parts.append(data)
                got += len(data)
        except UNPACK_ERRORS as e:
            if not parts:
                raise
            self._error = e
        return b"".join(parts)

    def fits(self, offset: int) -> bool:
        return offset >= 0  # known once decompressed that far (``catch_up``)

    def rewritten(self) -> bool:
        return False

    def unread(self) -> bool:
        return not self.eof

    def catch_up(self, budget: int) -> int:
        if self._stream is None or self._pos > self.offset:  # (a feed raised after a read)
            self._restart()
        return self._skip(max(0, min(budget, self.offset - self._pos)))

    def behind(self) -> bool:
        return self._pos != self.offset

    def finished(self, now: float, quiet: float) -> bool:
        return self.eof and not self.behind()

    def _close_stream(self) -> None:
        for part in (self._stream, self._raw):
            if part is not None:
                part.close()
        self._stream = self._raw = None

    def close(self) -> None:
        self._close_stream()
        super().close()


class FileFollowService(Service):
    """Follows ``settings.file`` into a Pipeline for as long as the service runs.

    ``clock`` drives the polling and the quiet timers (a ``task.Clock`` in tests); ``inotify``
    None uses inotify where the reactor and the platform have it, False only polls.
    """

    log = Logger()

    def __init__(self, settings: Settings, reactor: Any, pipeline: Pipeline, stats: Stats,
                 clock: Optional[IReactorTime] = None,
                 on_watermark: Optional[Callable[[], Any]] = None,
                 inotify: Optional[bool] = None) -> None:
        if not settings.file:
            raise ValueError("FileFollowService needs settings.file")
        self.path = os.path.abspath(settings.file)
        self.flush_period = settings.flush_period
        self.reactor = reactor
        self.clock: IReactorTime = clock if clock is not None else reactor
        self.pipeline = pipeline
        self.stats = stats
        self.on_watermark = on_watermark
        self.use_inotify = inotify
        self.max_line = settings.max_line_length
        self.current: Optional[_File] = None
        self.rotated: List[_File] = []
        self._resume: Optional[dict] = None
        self._notify: Any = None
        self._poll = LoopingCall(self.check)
        self._poll.clock = self.clock
        self._soon: Optional[IDelayedCall] = None
        self._caught_up = False
        self._caught_up_at = -math.inf
        self._last_time = -math.inf
        self._watermark = -math.inf
        self._warned: set = set()
        self._base = os.path.basename(self.path)
        self._writes = 0
        self._heads: dict = {}
        """(dev, ino) -> ((size, mtime_ns), first line) of the log's other files (``seen``)."""
        self.lifecycle = Lifecycle("follow", stats, (WAITING, BACKLOG, FOLLOWING), log=self.log)
        self.retry_policy = backoffPolicy(initialDelay=1.0, maxDelay=30.0)
        self.failures = 0
        self._retry: Optional[IDelayedCall] = None

    # --- the source's contract: watermark, position, resume ----------------------------------

    def watermark(self, now: float) -> float:
        """Event time up to which every line is in the model, minus the flush period (nginx
        writes a line at most that long after its request; workers interleave out of order by
        up to that much). Caught up: ``now`` if every open file is read to its end when asked
        (``_all_read``), else the time the last read to the end *began*: what was written
        before then is in, what came after waits for its read (an inotify event or a poll not
        handled yet, as after a stall of the reactor, whose timers run before its I/O). Reading
        a backlog: the last line's time. -inf before the first look at the file. It stands
        still while no file is open, or one is not in the sfive format (coverage: nothing is
        vouched for then)."""
        if not self._vouches():
            return self._watermark
        if self._caught_up:
            base = now if self._all_read() else self._caught_up_at
        else:
            base = self._last_time
        self._watermark = max(self._watermark, base - self.flush_period)
        return self._watermark

    def _all_read(self) -> bool:
        """Whether, now, every open file ends where it was read to and the path names the file
        read last: nothing written so far waits for a read (an fstat per open file, a stat)."""
        cur = self.current
        if cur is None:
            return False
        try:
            for f in self._files():
                if f.unread():
                    return False
            st = os.stat(self.path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == (cur.dev, cur.ino)

    def _vouches(self) -> bool:
        """A readable file in the sfive format is open (a quiet one too)."""
        files = list(self._files())
        return bool(files) and all(f.sfive is not False for f in files)

    def position(self) -> dict:
        """Where the model stands in the log, for the state store: the file at the path and the
        rotated ones still read, each by device, inode and first line, with the offset just after
        the last complete line fed to the pipeline; and ``seen``, the log's other files in its
        directory (its rotated names, done with), each by device, inode and first line, so that
        a resume tells the files that came after (rotations and copytruncate's copies while the
        service was down) from those already read."""
        if not self.running and self._resume is not None:
            return self._resume
        return {"kind": "file", "path": self.path,
                "file": self.current.ident() if self.current is not None else None,
                "rotated": [f.ident() for f in self.rotated],
                "seen": self._seen()}

    def _siblings(self) -> List[Tuple[str, os.stat_result]]:
        """The log's other regular files in its directory (names beginning with its own:
        ``sfive.log.1``, ``sfive.log-20261201``), with their stat."""
        out = []
        try:
            with os.scandir(os.path.dirname(self.path)) as entries:
                for e in entries:
                    if e.path == self.path or not e.name.startswith(self._base):
                        continue
                    try:
                        if e.is_file(follow_symlinks=False):
                            out.append((e.path, e.stat(follow_symlinks=False)))
                    except OSError:
                        continue
        except OSError:
            pass
        return out

    def _head_of(self, name: str, st: os.stat_result) -> Optional[bytes]:
        """The first line (or what there is of it, up to HEAD bytes) of a sibling, cached while
        its size and mtime stay; None if it cannot be read."""
        key, version = (st.st_dev, st.st_ino), (st.st_size, st.st_mtime_ns)
        cached = self._heads.get(key)
        if cached is not None and cached[0] == version:
            return cached[1]
        try:
            with open(name, "rb") as fh:
                now = os.fstat(fh.fileno())
                if (now.st_dev, now.st_ino) != key:
                    return None
                head = _first_line(fh.read(HEAD))
        except OSError:
            return None
        self._heads[key] = (version, head)
        return head

    def _seen(self) -> List[dict]:
        followed = {(f.dev, f.ino) for f in self._files()}
        seen, keep = [], set()
        for name, st in self._siblings():
            key = (st.st_dev, st.st_ino)
            if key in followed:
                continue
            head = self._head_of(name, st)
            if head is None:
                continue
            keep.add(key)
            seen.append({"dev": st.st_dev, "ino": st.st_ino, "head": _digest(head),
                         "head_len": len(head)})
        for key in set(self._heads) - keep:
            del self._heads[key]
        return seen

    def resume(self, position: dict) -> None:
        """Continue from a saved position when the service starts (instead of the file's end);
        ValueError (and the file's end) for a position that is not this file's."""
        if not isinstance(position, dict) or position.get("kind") != "file":
            raise ValueError(f"not a file's position: {position!r}")
        if position.get("path") != self.path:
            raise ValueError(f"the position is for {position.get('path')!r}, not {self.path!r}")
        self._resume = position

    # --- service ------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        now = self.clock.seconds()
        if self._resume is not None:
            self._reopen(self._resume, now)
        else:
            self._open_at_end(now)
        self._resume = None
        self._watch()
        interval = POLL_WITH_INOTIFY if self._notify is not None else POLL_WITHOUT_INOTIFY
        self._poll.start(interval, now=False).addErrback(self._poll_ended, interval)
        # the first read waits for the next turn of the reactor: the services started after
        # this one (the reporter, which begins the live model) are running by then
        self._soon = self.clock.callLater(0, self.check)

    def stopService(self) -> None:
        """Stop reading; the position stays (a later start resumes from it)."""
        self._resume = self.position()
        super().stopService()
        if self._poll.running:
            self._poll.stop()
        for call in (self._soon, self._retry):
            if call is not None and call.active():
                call.cancel()
        self._soon = self._retry = None
        if self._notify is not None:
            self._notify.loseConnection()
            self._notify = None
        for f in self._files():
            f.close()
        self.current = None
        self.rotated = []
        self._caught_up = False
        self.stats.source_connected = False
        self.lifecycle.enter(STOPPED)

    def _poll_ended(self, failure: Failure, interval: float) -> None:
        """The polling loop stopped on an error (``check`` catches its own, so this is a
        safety net): counted, logged, and the loop started again after the backoff."""
        def again() -> None:
            self._retry = None
            if self.running and not self._poll.running:
                self._poll.start(interval, now=True).addErrback(self._poll_ended, interval)

        self._unexpected(failure, "polling", again)

    def _unexpected(self, failure: Failure, doing: str, retry: Callable[[], object]) -> None:
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        if not self.running:
            self.log.failure("follow: unexpected error while {doing} (stopping)", failure,
                             doing=doing)
            return
        self.stats.source_connected = False
        delay = self.retry_policy(self.failures)
        self.failures += 1
        self._retry = self.lifecycle.unexpected(failure, f"{doing} {self.path}", self.clock,
                                                delay, retry)

    def _retried(self) -> None:
        self._retry = None
        self.check()

    def _watch(self) -> None:
        if self.use_inotify is False:
            return
        try:
            from twisted.internet import inotify
            from twisted.python.filepath import FilePath

            notify = inotify.INotify(self.reactor)
            notify.startReading()
            mask = (inotify.IN_MODIFY | inotify.IN_CREATE | inotify.IN_DELETE
                    | inotify.IN_MOVED_FROM | inotify.IN_MOVED_TO | inotify.IN_ATTRIB
                    | inotify.IN_CLOSE_WRITE)
            notify.watch(FilePath(os.path.dirname(self.path)), mask=mask,
                         callbacks=[self._changed])
            self._writes = inotify.IN_MODIFY | inotify.IN_CLOSE_WRITE
        except Exception as e:  # no inotify here, or the directory is not there yet
            if self.use_inotify:
                raise
            self.log.info("not watching {dir} with inotify ({why}); polling every {poll}s",
                          dir=os.path.dirname(self.path), why=e, poll=POLL_WITHOUT_INOTIFY)
            return
        self._notify = notify

    def _changed(self, _watch: Any, path: Any, mask: int) -> None:
        """inotify: something changed in the directory; look soon (events are coalesced).
        Writes to other files (another log written for every request) are not looked at; the
        log's own rotated names (``sfive.log.1``, ...) are."""
        if mask & self._writes and not os.fsdecode(path.basename()).startswith(self._base):
            return
        if self._soon is None and self.running:
            self._soon = self.clock.callLater(0, self.check)

    # --- following ----------------------------------------------------------------------------

    def check(self) -> None:
        """Look at the path, read what every open file gained, let quiet rotated files go.
        While a retry is pending (after an unexpected error) only the retry looks."""
        if self._soon is not None and self._soon.active():
            self._soon.cancel()
        self._soon = None
        if not self.running or (self._retry is not None and self._retry.active()):
            return
        try:
            self._check()
        except Exception:
            self._unexpected(Failure(), "following", self._retried)
            return
        self.failures = 0

    def _check(self) -> None:
        now = self.clock.seconds()
        self._follow_path(now)
        for f in list(self.rotated):  # truncated too (copytruncate, then renamed before a look)
            if f.rewritten():
                self._truncated(f, now)
        budget = BUDGET
        for f in self._files():
            budget -= self._read(f, now, budget)
            if budget <= 0:
                break
        self._retire_quiet(now)
        self._caught_up = budget > 0
        if self._caught_up:
            self._caught_up_at = now
        else:
            self._soon = self.clock.callLater(0, self.check)
        self.stats.source_connected = self.current is not None
        if self.current is None and not self.rotated:
            self.lifecycle.enter(WAITING)
        else:
            self.lifecycle.enter(FOLLOWING if self._caught_up else BACKLOG)
        if self.on_watermark is not None:
            self.on_watermark()

    def _files(self) -> Iterator[_File]:
        """Rotated files first: they hold the older lines."""
        yield from list(self.rotated)
        if self.current is not None:
            yield self.current

    def _follow_path(self, now: float) -> None:
        try:
            st: Optional[os.stat_result] = os.stat(self.path)
        except FileNotFoundError:
            st = None
        except OSError as e:
            self._warn_once("stat", "cannot look at {path}: {why}", why=e.strerror)
            return
        cur = self.current
        if cur is not None:
            if st is not None and (st.st_dev, st.st_ino) == (cur.dev, cur.ino):
                if st.st_size < cur.offset or not cur.head_matches():
                    self._truncated(cur, now)
                return
            self._rotated_away(cur, now, "deleted" if st is None else "rotated")
        if st is None:
            self._warn_once("absent", "{path} is not there (yet): waiting for it", info=True)
            return
        if not stat.S_ISREG(st.st_mode):
            self._warn_once("notfile", "{path} is not a regular file: waiting")
            return
        f = self._open(self.path, now)
        if f is not None:
            self.current = f
            self._warned.discard("absent")
            self.log.info("following {path} from its start", path=self.path)

    def _open(self, name: str, now: float) -> Optional[_File]:
        """The file ``name`` opened; a rotated one compressed (not the path) through its
        decompressor (None if the standard library has none: zstd, lz4)."""
        try:
            fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as e:
            self._warn_once("open", "cannot read {path}: {why} (see README.Debian: the "
                            "service's user must be able to read the log)", why=e.strerror)
            return None
        self._warned.discard("open")
        try:
            st = os.fstat(fd)
            kind = None if name == self.path else _packing(os.pread(fd, 8, 0))
        except OSError:
            os.close(fd)
            return None
        if kind is None:
            return _File(name, fd, st, now, self.max_line)
        opener = next(o for k, o in PACKED.values() if k == kind)
        if opener is None:
            os.close(fd)
            return None
        f = _Packed(name, fd, st, now, self.max_line, kind, opener)
        try:
            f.pread(FORMAT_BYTES, 0)  # its first bytes, kept: the head checks never fail later
        except UNPACK_ERRORS:
            f.close()
            return None
        return f

    def _open_at_end(self, now: float) -> None:
        """A start without a saved position: from the end of the file's last complete line (the
        live model counts from its first full interval on, so older lines would not count)."""
        f = self._open(self.path, now)
        if f is None:
            return
        size = os.fstat(f.fd).st_size
        tail = os.pread(f.fd, min(size, self.max_line + 2), max(0, size - self.max_line - 2))
        nl = tail.rfind(b"\n")
        f.offset = f.line_end = size - len(tail) + nl + 1 if nl >= 0 else size
        f.learn_head()
        self.current = f
        self.log.info("following {path} from its end (offset {offset})", path=self.path,
                      offset=f.offset)

    def _reopen(self, position: dict, now: float) -> None:
        """Find the saved files again (by device, inode and head: they may have been renamed),
        then the files that came after the saved one while the service was down (``_came``)."""
        rotated = position.get("rotated")
        saved = position.get("file")
        for ident in (list(rotated) if isinstance(rotated, list) else []) + [saved]:
            if not ident:
                continue
            try:
                f = self._reopen_one(ident, now)
            except (AttributeError, TypeError, ValueError):
                self.log.warn("ignoring a malformed entry in the saved position: {ident!r}",
                              ident=ident)
                continue
            if f is None:
                continue
            try:
                at_path = os.stat(self.path)
                here = (at_path.st_dev, at_path.st_ino) == (f.dev, f.ino)
            except OSError:
                here = False
            if here and self.current is None:
                self.current = f
            else:
                self.rotated.append(f)
            self.log.info("resuming {name} at offset {offset}", name=f.name, offset=f.offset)
        seen = position.get("seen")
        if not isinstance(seen, list):
            return  # saved by an earlier release: only the saved files are known
        try:
            headless = isinstance(saved, dict) and not int(saved.get("head_len") or 0)
        except (TypeError, ValueError):
            headless = False
        if self.current is None or headless:
            self._came(seen, now)

    def _came(self, seen: list, now: float) -> None:
        """The log's files that came after the saved position, read from their start, oldest
        (by first line, then mtime) first, before the file at the path: the files in between
        when it was rotated more than once while the service was down, or the copy when a file
        saved without a complete line (no head to tell a truncation by) was copytruncated. A
        file is old if it was ``seen`` then with the same first line; a file beginning as the
        file at the path or one being read does (logrotate's ``copy``) is not read twice, nor
        a compressed one beginning as a file seen then (read before, compressed since). One
        compressed in a way the follower cannot read (zstd, lz4, or corrupt) is an announced
        loss, logged by name."""
        old, done = {}, set()
        for e in seen:
            if isinstance(e, dict):
                old[(e.get("dev"), e.get("ino"))] = e
                done.add((_int(e.get("head_len")), e.get("head")))
        followed = {(f.dev, f.ino) for f in self._files()}
        heads = {f.head for f in self._files() if f.head}
        try:
            at_path = os.stat(self.path)
            here = self._head_of(self.path, at_path)
            if here and here.endswith(b"\n"):
                heads.add(here)
        except OSError:
            pass
        came, unread = [], []
        for name, st in self._siblings():
            key = (st.st_dev, st.st_ino)
            if key in followed:
                continue
            head = self._head_of(name, st)
            if head is None or head in heads:
                continue
            e = old.get(key)
            if e is not None:
                head_len = _int(e.get("head_len"))
                if st.st_size == 0 or (head_len and _digest(head[:head_len]) == e.get("head")):
                    continue  # done with before the stop (or nothing in it)
            kind = _packing(head)
            if kind is not None:
                head = self._unpacked_head(name, now)
                if head is None:
                    unread.append((name, kind))
                    continue
                if head in heads or any(n and _digest(head[:n]) == h for n, h in done):
                    continue  # read before the stop, compressed since
            t = self.pipeline.time_of(head.rstrip(b"\n")) if head.endswith(b"\n") else None
            came.append((st.st_mtime_ns / 1e9 if t is None else t, st.st_mtime_ns, name, key))
        for name, kind in unread:
            self.stats.file_rotations += 1
            self.pipeline.lose(None, now)
            self.log.warn("{name} came while the service was down, but it cannot be read ({kind}; "
                          "the follower reads gzip, bzip2 and xz): the lines in it that were not "
                          "read before are lost (decompress it and run sfive-ngxlua-replay "
                          "--from/--until over it)", name=name, kind=kind)
        if not came:
            return
        truncated = self.current is not None  # the saved file is still at the path: copies
        for _t, _mtime, name, key in sorted(came):
            f = self._open(name, now)
            if f is None:
                continue
            if (f.dev, f.ino) != key:
                f.close()
                continue
            f.learn_head()
            self.rotated.append(f)
            if not truncated:
                self.stats.file_rotations += 1
            self.log.info("{name} came after the saved position (while the service was down): "
                          "reading it from its start", name=name)
        if truncated:
            self.stats.file_truncations += 1
            self.pipeline.lose(None, now)
            self.log.warn("{path} was truncated in place (copytruncate?) while the service was "
                          "down, before it had a complete line: reading its copy from its start; "
                          "lines nginx wrote between the copy and the truncation are lost",
                          path=self.path)

    def _unpacked_head(self, name: str, now: float) -> Optional[bytes]:
        """The first line of a compressed file, decompressed; None if it cannot be read."""
        f = self._open(name, now)
        if f is None:
            return None
        try:
            return _first_line(f.pread(HEAD, 0))
        except UNPACK_ERRORS:
            return None
        finally:
            f.close()

    def _reopen_one(self, ident: dict, now: float) -> Optional[_File]:
        """One saved file, opened at its saved offset (or at its start, or its copy's offset
        after a copytruncate while the service was down); None, counted and logged, if it is
        gone. Raises AttributeError, TypeError or ValueError for a malformed entry."""
        offset = int(ident.get("offset") or 0)
        f = self._find(ident, now)
        if f is None:  # copytruncate while the service was down: the copy has the rest
            key = (ident.get("dev"), ident.get("ino"))
            f = self._find_copy(int(ident.get("head_len") or 0), ident.get("head"), offset - 1,
                                now, key)
            if f is None:
                self.stats.file_rotations += 1
                self.pipeline.lose(None, now)
                self.log.warn(
                    "the file followed before (inode {ino}, at offset {offset}) is gone from "
                    "{dir} (deleted, compressed with {unread}, or moved elsewhere: logrotate's "
                    "olddir): the lines it got after that are lost (sfive-ngxlua-replay "
                    "--from/--until over the rotated logs fills the hole)", ino=key[1],
                    offset=offset, dir=os.path.dirname(self.path),
                    unread=" or ".join(k for k, o in PACKED.values() if o is None))
                return None
            if f.packed and not self._at_path(key):
                self.log.info("{name} is the file followed before (inode {ino}), compressed "
                              "after its rotation while the service was down: reading it on "
                              "from offset {offset}", name=f.name, ino=key[1], offset=offset)
                f.offset = f.line_end = offset
                return f
            self.stats.file_truncations += 1
            self.pipeline.lose(None, now)
            self.log.warn("{path} was truncated in place (copytruncate?) while the service was "
                          "down: reading the rest from its copy {name}; lines nginx wrote "
                          "between the copy and the truncation are lost", path=self.path,
                          name=f.name)
        if not f.fits(offset):
            self.stats.file_truncations += 1
            self.log.warn("{name} does not reach the saved offset {offset}: reading it from its "
                          "start", name=f.name, offset=offset)
            offset = 0
        f.offset = f.line_end = offset
        return f

    def _find(self, ident: dict, now: float) -> Optional[_File]:
        """The file with this device, inode and head, at the path or elsewhere in its directory."""
        want = (ident.get("dev"), ident.get("ino"))
        head_len = int(ident.get("head_len") or 0)  # a malformed entry fails before any open
        if head_len < 0:
            raise ValueError(f"head_len {head_len}")
        for name in self._candidates():
            try:
                st = os.stat(name)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) != want:
                continue
            f = self._open(name, now)
            if f is None or (f.dev, f.ino) != want:
                if f is not None:
                    f.close()
                continue
            if _digest(f.pread(head_len, 0)) != ident.get("head"):
                f.close()
                continue
            f.learn_head()
            return f
        return None

    def _candidates(self) -> List[str]:
        """The path, then the other regular files in its directory (rotated names)."""
        directory = os.path.dirname(self.path)
        names = [self.path]
        try:
            with os.scandir(directory) as entries:
                names += sorted(e.path for e in entries
                                if e.path != self.path and e.is_file(follow_symlinks=False))
        except OSError:
            pass
        return names

    def _read(self, f: _File, now: float, budget: int) -> int:
        """Feed what ``f`` gained (at most about ``budget`` bytes); return the bytes read (or,
        in a compressed file, passed over on the way to a saved offset)."""
        if isinstance(f, _Packed):
            return self._read_packed(f, now, budget)
        if f.sfive is None:
            self._check_format(f)
        got = 0
        while got < budget:
            try:
                data = f.pread(CHUNK, f.offset)
            except OSError as e:
                self._warn_once("read", "error reading {name}: {why}", name=f.name, why=e.strerror)
                break
            if not data:
                break
            got += len(data)
            self._take(f, data, now)
            if len(data) < CHUNK:
                break
        return got

    def _take(self, f: _File, data: bytes, now: float) -> None:
        """``data``, read at ``f.offset``, into the pipeline; the file's offsets past it."""
        lines = self._feed(f, data)
        start = f.offset
        f.offset += len(data)
        nl = data.rfind(b"\n")
        if nl >= 0:
            f.line_end = start + nl + 1
        f.last_growth = now
        if f.head is None:
            f.learn_head()
        if lines:
            self._note_time(lines, now)

    def _read_packed(self, f: _Packed, now: float, budget: int) -> int:
        """A compressed rotation: decompressed (and passed over) up to its saved offset a
        budget at a time, then read to its end; one that cannot be (corrupt, cut short) is let
        go as an announced loss (``_unreadable``)."""
        if f.sfive is None:
            self._check_format(f)
        try:
            got = f.catch_up(budget)
        except UNPACK_ERRORS as e:
            self._unreadable(f, now, str(e) or type(e).__name__)
            return 0
        if f.behind():
            if not f.eof:
                return max(got, budget)  # on, on the next turn of the reactor
            self._unreadable(f, now, f"it ends before the saved offset {f.offset}")
            return got
        while got < budget and not f.eof:
            try:
                data = f.read_on(CHUNK)
            except UNPACK_ERRORS as e:
                self._unreadable(f, now, str(e) or type(e).__name__)
                break
            got += len(data)
            self._take(f, data, now)
        return got

    def _unreadable(self, f: _File, now: float, why: str) -> None:
        """A compressed rotation that cannot be read on (corrupt, cut short): let go, the rest of
        its lines an announced loss, logged."""
        if f in self.rotated:
            self.rotated.remove(f)
        f.close()
        self.stats.file_truncations += 1
        self.pipeline.lose(None, now)
        self.log.warn("{name} cannot be read on from offset {offset} ({why}): the lines in it "
                      "after that are lost (sfive-ngxlua-replay --from/--until over a good "
                      "copy fills the hole)", name=f.name, offset=f.line_end, why=why)

    def _check_format(self, f: _File) -> None:
        """Once a file has its first complete lines: are they in the sfive format? If not, one
        error naming the fix, counted (``stats.warnings["not-sfive-log"]``). The file is read
        on all the same, its lines rejected and counted, so that nginx writing the right
        format after a fix and a reload is counted from its first line on."""
        try:
            data = f.pread(FORMAT_BYTES, 0)
        except OSError:
            return  # the read says it
        lines = data.split(b"\n")[:-1][:FORMAT_LINES]
        if not lines:
            if len(data) < FORMAT_BYTES:
                return  # no complete line yet: checked when there is one
            lines = [data]
        why = not_sfive(self.pipeline.parser, lines)
        f.sfive = why is None
        if why is None:
            return
        self.stats.warnings["not-sfive-log"] += 1
        self.log.error(
            "{name} is not in the sfive format: {why}. nginx must write it with the sfive "
            "log format: include nginx/sfive-log.conf (/usr/share/sfive-ngxlua/nginx/ in the "
            "package) in http {{ }} and name it on the access_log (access_log {name} sfive "
            "buffer=64k flush=1s;), then reload nginx; until then its lines are rejected "
            "(counted) and nothing from it counts", name=f.name, why=why)

    @property
    def in_sfive_format(self) -> Optional[bool]:
        """Whether the file at the path is known to be in the sfive format (None: no file, or
        not checked yet)."""
        return None if self.current is None else self.current.sfive

    def _feed(self, f: _File, data: bytes) -> List[bytes]:
        """``data`` (read at ``f.offset``) to the pipeline. If the pipeline raises, ``f`` is
        left as it was before, knowing how many of the lines there are already in the model,
        so that the next read neither skips a line nor counts one twice."""
        before = f.splitter.state()
        try:
            lines = self.pipeline.feed_split(f.splitter, data, f.skip)
        except Exception:
            f.splitter.restore(before)
            f.skip += self.pipeline.handled
            raise
        f.skip = 0
        return lines

    def _note_time(self, lines: List[bytes], now: float) -> None:
        """The time of the last line that has one (not beyond the clock: a hostile line's future
        time must not move the watermark)."""
        for line in reversed(lines[-16:]):
            t = self.pipeline.time_of(line)
            if t is not None and t <= now:
                self._last_time = max(self._last_time, t)
                return

    def _rotated_away(self, cur: _File, now: float, how: str) -> None:
        """The path no longer names ``cur``: keep reading it while nginx may still write it."""
        self.current = None
        cur.last_growth = now
        self.rotated.append(cur)
        self.stats.file_rotations += 1
        self.log.info("{path} was {how}: reading the old file (inode {ino}) until it has been "
                      "quiet for {quiet:g}s", path=self.path, how=how, ino=cur.ino,
                      quiet=self.flush_period + ROTATED_SLACK)

    def _retire_quiet(self, now: float) -> None:
        quiet = self.flush_period + ROTATED_SLACK
        for f in list(self.rotated):
            if not f.finished(now, quiet):
                continue
            self.rotated.remove(f)
            dropped = f.splitter.reset()
            if dropped:
                self.stats.lines += 1
                self.stats.reject("invalid-json")
                self.log.warn("{name} (inode {ino}) ended in a partial line of {n} bytes: "
                              "discarded", name=f.name, ino=f.ino, n=dropped)
            self.log.info("done with the old file (inode {ino}) at offset {offset}",
                          ino=f.ino, offset=f.line_end)
            f.close()

    def _truncated(self, cur: _File, now: float) -> None:
        """copytruncate (or another in-place rewrite): read the copy's rest, then start over.
        The lines between the copy and the truncation are an announced loss, from the last
        line's time on."""
        self.stats.file_truncations += 1
        self.pipeline.lose(self._last_time if math.isfinite(self._last_time) else None, now)
        cur.splitter.reset()
        cur.skip = 0
        copy = None
        if cur.head is not None:
            copy = self._find_copy(len(cur.head), _digest(cur.head), cur.line_end, now,
                                   (cur.dev, cur.ino))
        recovered = ""
        if copy is not None:
            copy.offset = copy.line_end = cur.line_end
            self.rotated.append(copy)
            recovered = f"; what was not read yet is read from its copy {copy.name}"
        self.log.warn(
            "{path} was truncated in place (copytruncate?) after offset {offset}: lines nginx "
            "wrote between the copy and the truncation are lost{recovered}; rotate by renaming "
            "instead (logrotate without copytruncate, then USR1 to nginx)", path=self.path,
            offset=cur.line_end, recovered=recovered)
        cur.offset = cur.line_end = 0
        cur.head = None
        cur.last_growth = now

    def _find_copy(self, head_len: int, head: str, past: int, now: float,
                   not_ino: Tuple[int, int]) -> Optional[_File]:
        """Another file in the directory that begins with the same first line (``head_len``
        bytes hashing to ``head``) and goes on beyond ``past``: copytruncate's copy."""
        if head_len <= 0:
            return None
        for name in self._candidates()[1:]:
            try:
                st = os.stat(name)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == not_ino:
                continue
            if st.st_size <= past:  # too short, unless compressed
                first = self._head_of(name, st)
                if first is None or _packing(first) is None:
                    continue
            f = self._open(name, now)
            if f is None:
                continue
            if _digest(f.pread(head_len, 0)) == head:
                f.learn_head()
                return f
            f.close()
        return None

    def _at_path(self, key: Tuple[Any, Any]) -> bool:
        """Whether the path names the file with this device and inode."""
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == key

    def _warn_once(self, key: str, text: str, info: bool = False, **kw: Any) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        (self.log.info if info else self.log.warn)(text, path=self.path, **kw)
