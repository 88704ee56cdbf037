"""twistd's side of the service: options that end a bad start in one line (exit 78), and the
service tree with SIGHUP handled as a stop that saves the state."""

from __future__ import annotations

import atexit
import os
import signal
import sys
from typing import Any, List, Optional

from twisted.application.service import MultiService, Service
from twisted.logger import Logger
from twisted.python import usage

from . import service, settings

EX_CONFIG = 78
"""sysexits.h: a configuration error; the unit's ``RestartPreventExitStatus=`` lists it."""


class Options(settings.Options):
    """``twistd sfive-ngxlua`` options: an invalid one is a single line on standard error and
    exit status 78, before anything starts (twistd itself would print its whole usage)."""

    def parseOptions(self, options: Optional[List[str]] = None) -> None:
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            runner = os.path.basename(sys.argv[0]) or "twistd"
            sys.stderr.write(settings.error_line(
                "sfive-ngxlua", e, self, f"{runner} sfive-ngxlua --help") + "\n")
            sys.stderr.flush()
            raise SystemExit(EX_CONFIG) from None


class HangupStop(Service):
    """SIGHUP stops the service as SIGTERM does (the state saved, the queue kept), and the
    process then ends by SIGHUP, which the unit's ``RestartForceExitStatus=SIGHUP`` restarts:
    with a state dir a lossless restart that re-reads the options, the nearest to a reload."""

    log = Logger()

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.stopping = False

    def startService(self) -> None:
        super().startService()
        signal.signal(signal.SIGHUP, self._signalled)

    def _signalled(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.hangup)

    def hangup(self) -> None:
        """Stop the reactor (the services stop and save as on SIGTERM); end by SIGHUP."""
        if self.stopping:
            return
        self.stopping = True
        self.log.info("stop on SIGHUP: stopping as on SIGTERM (state saved, queue kept); "
                      "under systemd the unit restarts the service with its options re-read")
        atexit.register(_end_by_sighup)
        self.reactor.stop()


def _end_by_sighup() -> None:
    """At the interpreter's exit (after twistd removed its pidfile): die by the signal that
    stopped us, so that a supervisor sees it (twistd does the same for SIGTERM and SIGINT)."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGHUP)


def makeService(options: Options, reactor: Any = None) -> MultiService:
    """The service tree of ``service.makeService``, plus the SIGHUP stop (twistd only: an
    application that embeds the importer keeps its own signal handling)."""
    if reactor is None:
        from twisted.internet import reactor
    top = service.makeService(options, reactor)
    hangup = HangupStop(reactor)
    hangup.setName("hangup")
    hangup.setServiceParent(top)
    return top
