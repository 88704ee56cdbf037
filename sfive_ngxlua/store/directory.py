"""The state directory: created private (0700, files 0600 whatever the umask) and locked for
one service at a time (the lock file names the holder's pid)."""

from __future__ import annotations

import fcntl
import os
from typing import Optional

from twisted.logger import Logger

LOCK_FILE = "lock"

log = Logger()


class StateLocked(Exception):
    """Another process holds the state directory's lock."""


class StateUnusable(Exception):
    """The state directory or its database cannot be used at all (permissions, I/O)."""


def private(path: str, mode: int) -> None:
    """Give ``path`` ``mode`` if it has another (a warning if that is not allowed): the state
    holds client addresses and user agents."""
    try:
        if os.stat(path).st_mode & 0o777 != mode:
            os.chmod(path, mode)
    except OSError as e:
        log.warn("cannot make {path} private ({mode:o}): {why}", path=path, mode=mode,
                 why=e.strerror)


class StateDirectory:
    """``directory``, made 0700 and locked (``StateLocked`` if another process has it,
    ``StateUnusable`` if it cannot be made or opened)."""

    def __init__(self, directory: str) -> None:
        self.path = directory
        self._lock_fd: Optional[int] = None
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            private(directory, 0o700)
            self._lock()
        except OSError as e:
            raise StateUnusable(f"state directory {directory}: {e.strerror or e}") from None

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def _lock(self) -> None:
        old = os.umask(0o077)
        try:
            fd = os.open(self.file(LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        finally:
            os.umask(old)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise StateLocked(
                f"state directory {self.path} is in use by another sfive-ngxlua "
                f"(pid {holder}); one state directory serves one service: stop the other one "
                "or give this one its own --state-dir") from None
        self._lock_fd = fd
        self.write_pid()

    def write_pid(self) -> None:
        """Name this process in the lock file (again after twistd forked)."""
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, f"{os.getpid()}\n".encode("ascii"), 0)

    def release(self) -> None:
        """Give up the lock (also what a process's death does)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
