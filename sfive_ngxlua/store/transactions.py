"""Transactions on the state database: BEGIN ... COMMIT with actions that run only once it
committed, a failing write counted and logged once per outage, and the WAL scrubbed after
deletions (delivered datasets and closed intervals hold client addresses)."""

from __future__ import annotations

import sqlite3
from contextlib import contextmanager
from typing import Callable, Iterator, List, Optional

from twisted.logger import Logger

from ..stats import Stats
from .database import Database


class Transactions:
    """The one way to write the state: ``transaction()``; ``failing`` holds the last write
    error while writes fail (the state is then kept in memory by its owners)."""

    log = Logger()

    def __init__(self, database: Database, stats: Stats) -> None:
        self.database = database
        self.stats = stats
        self.failing: Optional[str] = None
        self.scrub = False
        """Rows were deleted: the next ``scrub_wal`` truncates the WAL."""
        self._after_commit: List[Callable[[], None]] = []
        self._in_transaction = False
        self._on_failure: List[Callable[[], None]] = []

    @property
    def db(self) -> sqlite3.Connection:
        return self.database.db

    def on_failure(self, action: Callable[[], None]) -> None:
        """Call ``action`` after every failed write (e.g. to write everything next time)."""
        self._on_failure.append(action)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN ... COMMIT (ROLLBACK on an exception); ``after_commit`` actions run after."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        self._in_transaction = True
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            self._after_commit.clear()
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            self._in_transaction = False
        actions, self._after_commit = self._after_commit, []
        for action in actions:
            action()

    def after_commit(self, action: Callable[[], None]) -> None:
        """Run ``action`` once the current transaction has committed (now if there is none)."""
        if self._in_transaction:
            self._after_commit.append(action)
        else:
            action()

    def failed(self, error: Exception, what: str) -> None:
        """A write failed (an expected error: a full disk): one counted line per outage."""
        for action in self._on_failure:
            action()
        self.stats.state_errors += 1
        if self.failing is None:
            self.log.error(
                "state store {path}: {what} failed ({why}); keeping the state in memory and "
                "retrying at every checkpoint (a crash now loses what was not written)",
                path=self.database.path, what=what, why=error)
        self.failing = str(error)

    def recovered(self) -> None:
        """A write worked again."""
        if self.failing is not None:
            self.log.info("state store {path} writable again; state written in full",
                          path=self.database.path)
        self.failing = None

    def scrub_wal(self) -> None:
        """After deletions: copy the WAL into the file and truncate it, so delivered datasets
        and closed intervals (client addresses) do not linger in the WAL."""
        if not self.scrub:
            return
        self.scrub = False
        try:
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.Error as e:
            self.failed(e, "WAL checkpoint")
