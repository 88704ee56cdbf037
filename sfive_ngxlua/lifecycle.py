"""Explicit states for the long-lived parts, and the one path every unexpected error takes.

Each long-lived component (the fetcher, the follower, the reporter, the checkpoint, each sink)
owns one ``Lifecycle``: it names the component's states, publishes the current one in
``Stats.states`` (for the metrics and ``/healthz``) and turns an unexpected exception into one
logged traceback, one count in ``Stats.errors`` and a state that retries. Where the retry
happens is the component's business (its backoff, its loop); that it happens is this
module's contract: ``unexpected()`` never leaves a component in a state with nothing
scheduled.
"""

from __future__ import annotations

from typing import Callable, FrozenSet, Iterable, Optional

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from .stats import Stats

RETRYING = "retrying"
"""The state every component enters after an unexpected error, until its retry succeeds."""
STOPPED = "stopped"


class Lifecycle:
    """One component's state, published in ``stats.states[name]``.

    ``states`` lists the component's own states; ``RETRYING`` and ``STOPPED`` are always
    allowed. Entering an unknown state is a programming error (``ValueError``).
    """

    def __init__(self, name: str, stats: Stats, states: Iterable[str],
                 log: Optional[Logger] = None) -> None:
        self.name = name
        self.stats = stats
        self.states: FrozenSet[str] = frozenset(states) | {RETRYING, STOPPED}
        self.log = log if log is not None else Logger(namespace=f"sfive_ngxlua.{name}")
        self.state = STOPPED
        self._told: Optional[str] = None
        stats.states[name] = self.state
        stats.errors.setdefault(name, 0)

    def enter(self, state: str) -> None:
        """Move to ``state``; a state other than ``RETRYING`` ends the current error stretch,
        so the next unexpected error is logged with its traceback again."""
        if state not in self.states:
            raise ValueError(f"{self.name}: no state {state!r} (one of {sorted(self.states)})")
        if state != RETRYING:
            self._told = None
        self.state = state
        self.stats.states[self.name] = state

    def unexpected(self, failure: Failure, doing: str, clock: IReactorTime, delay: float,
                   retry: Callable[[], object]) -> IDelayedCall:
        """An error nobody expected while ``doing``: count it, log its traceback (once per
        stretch and kind of error), enter ``RETRYING`` and call ``retry`` after ``delay``
        seconds on ``clock``. Returns the scheduled call (cancel it at a stop)."""
        self.stats.errors[self.name] = self.stats.errors.get(self.name, 0) + 1
        kind = f"{doing}: {failure.type.__name__}"
        if self._told != kind:
            self._told = kind
            self.log.failure("{component}: unexpected error while {doing}; retrying in "
                             "{delay:.1f}s", failure, component=self.name, doing=doing,
                             delay=delay)
        else:
            self.log.warn("{component}: the same unexpected error again while {doing} "
                          "({why}); retrying in {delay:.1f}s", component=self.name,
                          doing=doing, why=f"{failure.type.__name__}: {failure.value}",
                          delay=delay)
        self.enter(RETRYING)
        return clock.callLater(delay, retry)
