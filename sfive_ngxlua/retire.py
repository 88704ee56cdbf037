"""``sfive-ngxlua-retire``: deliver what a stopped service's state dir still holds, then remove it.

For an operator retiring a node (or moving its service elsewhere): the saved intervals (the
running one at the stop, cut at the moment it was saved, and any held ones) are reported under
the settings they were counted with, into the saved hub queue behind the datasets already
waiting there, in one transaction; then the queue goes to the hub (or standard output) in
order. Once everything is delivered the state files are deleted; if the hub does not take it
all within ``--timeout`` the state stays (run the command again).
"""

from __future__ import annotations

import os
import sys
from typing import Any, List, Optional

from twisted.python import usage

from . import __version__
from .settings import Settings, _seconds, check_hub, parse_command_line
from .stats import Stats

DEFAULT_STATE_DIR = "/var/lib/sfive-ngxlua"


class RetireOptions(usage.Options):
    synopsis = ("Usage: sfive-ngxlua-retire [--state-dir DIR] [-s SOCKET | --hub ENDPOINT] "
                "[options]")
    longdesc = (
        "Delivers what the sfive-ngxlua service's state directory holds (the saved intervals "
        "and the hub queue) to the sfive hub, then removes the state. Stop the service first."
    )
    optParameters = [
        ["state-dir", None, DEFAULT_STATE_DIR, "the service's --state-dir"],
        ["socket", "s", None, "the sfive hub's unix datagram socket [default: stdout]"],
        ["hub", None, None,
         "the sfive hub as a stream client endpoint, e.g. unix:path=/run/sfive/pipe"],
        ["timeout", None, "30", "give up when the hub takes nothing for this many seconds"],
    ]
    optFlags = [["keep", None, "keep the (emptied) state files"]]

    def opt_version(self) -> None:
        """print the version and exit"""
        print(f"sfive-ngxlua-retire {__version__}")
        sys.exit(0)

    def postOptions(self) -> None:
        check_hub(self["socket"], self["hub"])
        if not os.path.isdir(self["state-dir"]):
            raise usage.UsageError(f"--state-dir {self['state-dir']!r}: no such directory")
        self["timeout"] = _seconds("--timeout", self["timeout"], positive=True)

    def settings(self) -> Settings:
        """The hub and the state dir; everything else the saved state brings along (its
        intervals are reported under the settings they were counted with)."""
        return Settings(streamers=(), socket=self["socket"], hub=self["hub"],
                        state_dir=os.path.abspath(self["state-dir"]))


def become_owner(directory: str) -> None:
    """Run as root: become the state directory's owner (the service user, with its groups),
    so that no file in it ends up root's and the service can still open it."""
    import pwd

    st = os.stat(directory)
    if os.geteuid() != 0 or st.st_uid == 0:
        return
    try:
        name = pwd.getpwuid(st.st_uid).pw_name
        os.initgroups(name, st.st_gid)
    except KeyError:
        os.setgroups([])
    os.setgid(st.st_gid)
    os.setuid(st.st_uid)


def retire(options: RetireOptions, reactor: Any, err: Any = sys.stderr,
           out: Any = None) -> Any:
    """The whole retirement on ``reactor``; a Deferred firing with the exit status."""
    from twisted.internet.defer import ensureDeferred

    return ensureDeferred(_retire(options, reactor, err, out))


async def _retire(options: RetireOptions, reactor: Any, err: Any, out: Any) -> int:
    from .service import make_sink, report_saved
    from .store import LOCK_FILE, STATE_FILE, StateLocked, StateStore

    settings = options.settings()
    stats = Stats()
    try:
        store = StateStore(settings.state_dir, settings, stats, reactor)
    except StateLocked as e:
        err.write(f"sfive-ngxlua-retire: {e}\n")
        return 2
    queue = store.queue(sys.maxsize, sys.maxsize)
    queued = len(queue)
    saved = store.saved()
    intervals: list = []
    if saved is not None:
        intervals, _ = report_saved(store, saved, settings, "is being retired", queue)
    total = len(queue)
    datasets = total - queued
    try:
        if settings.socket or settings.hub:
            sink = make_sink(settings, reactor, stats, reactor, queue)
            sink.startService()
            await _delivered(queue, options["timeout"], reactor)
            await sink.stopService()
        else:
            stream = out if out is not None else sys.__stdout__.buffer
            while (data := queue.head()) is not None:
                stream.write(data)
                stream.flush()  # on the way out before it leaves the disk
                queue.sent()
    finally:
        left = len(queue)
        store.close()
    where = settings.socket or settings.hub or "standard output"
    err.write(f"sfive-ngxlua-retire: {len(intervals)} saved intervals as {datasets} datasets and "
              f"{queued} queued datasets: {total - left} of {total} delivered to {where}\n")
    if left:
        err.write(f"sfive-ngxlua-retire: {left} datasets not delivered; the state in "
                  f"{settings.state_dir} is kept: run again when the hub takes them\n")
        return 1
    if not options["keep"]:
        for name in (STATE_FILE, STATE_FILE + "-wal", STATE_FILE + "-shm", LOCK_FILE):
            path = os.path.join(settings.state_dir, name)
            if os.path.exists(path):
                os.unlink(path)
        err.write(f"sfive-ngxlua-retire: state in {settings.state_dir} removed\n")
    return 0


async def _delivered(queue: Any, timeout: float, reactor: Any) -> None:
    """Until the queue is empty, or it has not shrunk for ``timeout`` seconds."""
    while len(queue):
        before = len(queue)
        await queue.empty(timeout, reactor)
        if len(queue) >= before:
            return


def main(argv: Optional[List[str]] = None) -> None:
    """Console entry point."""
    from twisted.internet import task

    options = RetireOptions()
    parse_command_line(options, argv, "sfive-ngxlua-retire")
    become_owner(options["state-dir"])
    status: List[int] = []

    async def run(reactor: Any) -> None:
        status.append(await retire(options, reactor))

    from twisted.internet.defer import ensureDeferred

    try:
        task.react(lambda reactor: ensureDeferred(run(reactor)))
    except SystemExit as e:
        if e.code not in (0, None):
            sys.exit(1)
    sys.exit(status[0] if status else 1)
