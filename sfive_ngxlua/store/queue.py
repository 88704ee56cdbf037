"""The hub queue in the state database (its ``queue`` table): it survives restarts and crashes,
in order, and memory holds only its oldest ``window`` datasets. A dataset is deleted from disk
once sent (a crash between sending and deleting sends it again after the restart: the only
duplicate). While the database cannot be written (a full disk), new datasets wait in memory
behind those on disk (``spill``; the bounds count both) and are written at the next
transaction that works."""

from __future__ import annotations

import sqlite3
from collections import deque
from typing import Callable, Deque, List, Optional, Tuple

from twisted.logger import Logger

from ..queues import BoundedQueue
from ..settings import DEFAULT_QUEUE_BYTES
from ..stats import Stats
from .transactions import Transactions

WINDOW_DATASETS = 64
"""Datasets of the disk queue held in memory at a time (its oldest)."""


class SqliteQueue(BoundedQueue):
    """The hub queue on disk (see the module's docstring)."""

    log = Logger()
    persistent = True

    def __init__(self, transactions: Transactions, limit: int, stats: Stats,
                 max_bytes: int = DEFAULT_QUEUE_BYTES, window: int = WINDOW_DATASETS) -> None:
        super().__init__(limit, stats, max_bytes)
        self.transactions = transactions
        self.window_size = window
        self.window: Deque[Tuple[int, bytes]] = deque()
        self.spill: Deque[bytes] = deque()
        """Datasets the database could not take (yet), after those on disk."""
        self.on_disk, self.size = self.totals()
        self._last_id = 0
        if self.on_disk:
            self.log.info("{n} datasets ({mib:.1f} MiB) saved in the hub queue, sent first",
                          n=self.on_disk, mib=self.size / (1 << 20))
        self.stats.queued = len(self)

    def __len__(self) -> int:
        return self.on_disk + len(self.spill)

    # -- the table ------------------------------------------------------------------------

    def totals(self) -> Tuple[int, int]:
        """(datasets, bytes) in the queue table."""
        n, size = self.transactions.db.execute(
            "SELECT count(*), total(length(data)) FROM queue").fetchone()
        return n, int(size)

    def _insert(self, rows: List[bytes]) -> List[int]:
        """Append encoded datasets (inside a transaction); their ids, in order."""
        db = self.transactions.db
        return [db.execute("INSERT INTO queue (data) VALUES (?)", (sqlite3.Binary(data),)
                           ).lastrowid for data in rows]

    def _after(self, id: int, limit: int) -> List[Tuple[int, bytes]]:
        """Up to ``limit`` queued datasets after ``id``, oldest first."""
        return [(i, bytes(d)) for i, d in self.transactions.db.execute(
            "SELECT id, data FROM queue WHERE id > ? ORDER BY id LIMIT ?", (id, limit))]

    # -- the queue ------------------------------------------------------------------------

    def push(self, data: bytes) -> None:
        """One dataset, in its own transaction."""
        try:
            with self.transactions.transaction():
                self.stage([data])
        except sqlite3.Error as e:
            self.transactions.failed(e, "hub queue write")
            self.push_memory([data])

    def stage(self, items: List[bytes]) -> None:
        """Inside the caller's transaction: write ``items`` (behind any that waited in memory
        while the database could not be written); they count once it commits."""
        spilled = list(self.spill)
        rows = spilled + items
        ids = self._insert(rows)

        def committed() -> None:
            for data in spilled:
                self.spill.popleft()
                self.size -= len(data)
            self._appended(list(zip(ids, rows)))

        self.transactions.after_commit(committed)

    def _appended(self, rows: List[Tuple[int, bytes]]) -> None:
        for i, data in rows:
            if len(self.window) == self.on_disk and len(self.window) < self.window_size:
                self.window.append((i, data))
                self._last_id = i
            self.on_disk += 1
            self.size += len(data)
        self._bound()

    def push_memory(self, items: List[bytes]) -> None:
        """Datasets the database could not take: they wait in memory, after those on disk."""
        for data in items:
            self.spill.append(data)
            self.size += len(data)
        self._bound()

    def _fill(self) -> None:
        if not self.window and self.on_disk:
            try:
                rows = self._after(self._last_id, self.window_size)
            except sqlite3.Error as e:  # the rows stay on disk; the next send tries again
                self.transactions.failed(e, "hub queue read")
                return
            self.window.extend(rows)
            if rows:
                self._last_id = rows[-1][0]

    def head(self) -> Optional[bytes]:
        self._fill()
        if self.window:
            return self.window[0][1]
        return self.spill[0] if self.spill else None

    def replace_head(self, data: bytes) -> None:
        if self.window:
            i, old = self.window[0]
            self._write(lambda db: db.execute("UPDATE queue SET data = ? WHERE id = ?",
                                              (sqlite3.Binary(data), i)))
            self.window[0] = (i, data)
        else:
            old = self.spill[0]
            self.spill[0] = data
        self.size += len(data) - len(old)

    def _pop_head(self) -> None:
        self._fill()
        if self.window:
            i, data = self.window.popleft()
            self._write(lambda db: db.execute("DELETE FROM queue WHERE id = ?", (i,)))
            self.transactions.scrub = True
            self.on_disk -= 1
        else:
            data = self.spill.popleft()
        self.size -= len(data)

    def warn_undelivered(self) -> None:
        if self.on_disk:
            self.log.info("stopping with {n} datasets not yet delivered to the hub; kept in "
                          "the state dir, sent after the restart", n=self.on_disk)
        if self.spill:
            self.log.warn("stopping with {n} datasets not delivered to the hub that the state "
                          "store could not take: lost", n=len(self.spill))

    def _write(self, action: Callable[[sqlite3.Connection], object]) -> None:
        """A single-statement change (it commits on its own); a failure is the store's."""
        try:
            action(self.transactions.db)
        except sqlite3.Error as e:
            self.transactions.failed(e, "hub queue update")
