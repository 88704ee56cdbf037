"""The state store: the model, the source's position and the hub queue in one SQLite file.

``--state-dir DIR`` keeps ``DIR/state.sqlite`` and ``DIR/lock``; the parts, one job each:
``directory`` (the directory, its lock and modes), ``database`` (opening, schema, a corrupt
file moved aside), ``transactions`` (commit hooks, write failures, the WAL scrub), ``tables``
(the model and the position) and ``queue`` (the hub queue). ``StateStore`` puts them together:
a checkpoint is one transaction (the model's changes, the position they cover and any datasets
into the queue), so a restart never counts a record twice or misses one. What to do with a
state saved under other settings is the service's (and retire's) business, not the store's.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Callable, List, Optional

from twisted.logger import Logger

from ..model import IntervalModel
from ..settings import DEFAULT_QUEUE_BYTES, Settings
from ..stats import Stats
from .database import STATE_FILE, Database
from .directory import LOCK_FILE, StateDirectory, StateLocked, StateUnusable
from .queue import SqliteQueue
from .tables import ModelTables, Saved
from .transactions import Transactions

__all__ = ["STATE_FILE", "LOCK_FILE", "StateStore", "StateLocked", "StateUnusable", "Saved",
           "SqliteQueue"]


class StateStore:
    """One service's state directory, opened and locked for as long as the service runs."""

    log = Logger()

    def __init__(self, directory: str, settings: Settings, stats: Stats,
                 clock: object = None) -> None:
        """Create or open ``directory``; raises ``StateLocked`` if another process has it,
        ``StateUnusable`` if it cannot be used at all."""
        self.directory = directory
        self.stats = stats
        self.now: Callable[[], float] = getattr(clock, "seconds", time.time)
        self.lock = StateDirectory(directory)
        self.path = self.lock.file(STATE_FILE)
        try:
            self.database = Database(self.path, self._damaged_file)
        except (sqlite3.Error, OSError) as e:
            self.lock.release()
            raise StateUnusable(f"state database {self.path} cannot be opened: {e}") from None
        self.transactions = Transactions(self.database, stats)
        self.tables = ModelTables(self.transactions, settings)

    def _damaged_file(self) -> None:
        self.stats.state_errors += 1

    @property
    def db(self) -> sqlite3.Connection:
        return self.database.db

    @property
    def failing(self) -> Optional[str]:
        return self.transactions.failing

    def queue(self, limit: int, max_bytes: int = DEFAULT_QUEUE_BYTES, **kw: int) -> SqliteQueue:
        """The hub queue in this store."""
        return SqliteQueue(self.transactions, limit, self.stats, max_bytes, **kw)

    def checkpoint(self, model: IntervalModel, position: Optional[dict],
                   queue: Optional[SqliteQueue] = None,
                   items: Optional[List[bytes]] = None) -> bool:
        """One transaction: the model's changes, the position they cover, and ``items``
        (encoded datasets) into ``queue`` with any that waited in memory. False if it could
        not be written (an expected error, counted: the state is kept in memory, ``items``
        wait in the queue's memory, and the next checkpoint writes everything)."""
        try:
            with self.transactions.transaction():
                self.tables.write(model, position, self.now())
                if queue is not None and (items or queue.spill):
                    queue.stage(items or [])
        except sqlite3.Error as e:
            self.transactions.failed(e, "checkpoint")
            if items:
                queue.push_memory(items)
            return False
        self.transactions.recovered()
        return True

    def write_all_next(self) -> None:
        """The next checkpoint writes the whole model (after an unexpected error)."""
        self.tables.need_full = True

    def position(self) -> Optional[dict]:
        """The saved source position (None if there is none)."""
        return self.tables.position()

    def saved(self) -> Optional[Saved]:
        """The saved state, or None (nothing saved, or damaged rows: those are set aside)."""
        try:
            return self.tables.load()
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            self.set_aside("its saved rows are damaged", e)
            return None

    def set_aside(self, why: str, error: Exception) -> None:
        """A state that cannot be used: moved aside (kept for a person to look at), counted,
        one error line; the store goes on with an empty file."""
        aside = self.database.renew("unusable")
        self.tables.need_full = True
        self.stats.state_errors += 1
        self.log.error("state {path}: {why} ({error}); moved it to {aside} and starting fresh",
                       path=self.path, why=why, error=error, aside=aside)

    def scrub_wal(self, force: bool = False) -> None:
        """Truncate the WAL after deletions (always, with ``force``)."""
        if force:
            self.transactions.scrub = True
        self.transactions.scrub_wal()

    def detach(self) -> None:
        """Close the database connection but keep the lock: before twistd forks into the
        background (an SQLite connection must not cross a fork; the lock's descriptor may)."""
        self.database.close()

    def attach(self) -> None:
        """Open the connection again after ``detach`` (in the process that runs, whose pid the
        lock file then names)."""
        if self.database.db is None:
            self.lock.write_pid()
            self.database.db = self.database.connect()

    def close(self) -> None:
        """Checkpoint the WAL into the file, close it and release the lock."""
        self.database.close(checkpoint=True)
        self.lock.release()
