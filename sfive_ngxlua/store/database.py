"""The state database: opened with its pragmas, its schema made or upgraded, and a file that
cannot be read moved aside (``state.sqlite.corrupt-<time>``) for a fresh one."""

from __future__ import annotations

import os
import sqlite3
import time
from typing import Callable, Dict, Optional

from twisted.logger import Logger

from .directory import private

STATE_FILE = "state.sqlite"
SCHEMA_VERSION = 1
"""``PRAGMA user_version`` of the layout below. A later release that changes the layout adds a
step to ``MIGRATIONS`` that takes a file of the previous version to its own."""

SCHEMA_V1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE clients (id INTEGER PRIMARY KEY, k INTEGER NOT NULL, s INTEGER NOT NULL,
                      ip TEXT NOT NULL, ua TEXT NOT NULL);
CREATE INDEX clients_k ON clients (k);
CREATE TABLE counts (id INTEGER PRIMARY KEY, bytes INTEGER NOT NULL);
CREATE TABLE folded (k INTEGER NOT NULL, s INTEGER NOT NULL, h INTEGER NOT NULL,
                     PRIMARY KEY (k, s, h)) WITHOUT ROWID;
CREATE TABLE queue (id INTEGER PRIMARY KEY AUTOINCREMENT, data BLOB NOT NULL);
"""
"""A client's identity (interval k, streamer index s, ip, user agent) is written once, its bytes
in the narrow ``counts`` table: a checkpoint rewrites only those pages."""

MIGRATIONS: Dict[int, str] = {}
"""from version -> SQL that upgrades a file of that version to the next one."""

SUFFIXES = ("", "-wal", "-shm")


def script(db: sqlite3.Connection, sql: str) -> None:
    """Statements separated by ';', inside the caller's transaction (``executescript`` would
    commit it)."""
    for statement in sql.split(";"):
        if statement.strip():
            db.execute(statement)


class Database:
    """The connection to ``path`` (``db``; None while detached across twistd's fork)."""

    log = Logger()

    def __init__(self, path: str, on_damage: Callable[[], None]) -> None:
        """Open ``path``; a file that is not a readable state is moved aside and
        ``on_damage`` is called (to count it). Raises ``sqlite3.Error`` or ``OSError`` when
        the file cannot be opened at all."""
        self.path = path
        self.db: Optional[sqlite3.Connection]
        try:
            self.db = self.connect()
        except sqlite3.OperationalError:
            raise  # cannot open, I/O, locked, full: not the file's fault; never moved aside
        except sqlite3.DatabaseError as e:
            aside = self.move_aside("corrupt")
            on_damage()
            self.log.error(
                "state database {path} cannot be read ({why}); moved it to {aside} and starting "
                "with an empty state (what it held is not reported)", path=path, why=e,
                aside=aside)
            self.db = self.connect()

    def connect(self) -> sqlite3.Connection:
        old = os.umask(0o077)
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            try:
                db.execute("PRAGMA journal_mode=WAL").fetchone()
                db.execute("PRAGMA synchronous=NORMAL")
                db.execute("PRAGMA secure_delete=ON")
                if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                    raise sqlite3.DatabaseError("quick_check failed")
                _schema(db)
            except BaseException:
                db.close()
                raise
        finally:
            os.umask(old)
        for suffix in SUFFIXES:
            if os.path.exists(self.path + suffix):
                private(self.path + suffix, 0o600)
        return db

    def move_aside(self, why: str) -> str:
        """Rename the file (and its WAL) to ``<path>.<why>-<time>``; returns that name."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = f"{self.path}.{why}-{stamp}"
        for suffix in SUFFIXES:
            if os.path.exists(self.path + suffix):
                os.replace(self.path + suffix, aside + suffix)
        return aside

    def renew(self, why: str) -> str:
        """Close, move the file aside and start with an empty one; returns where it went."""
        self.close()
        aside = self.move_aside(why)
        self.db = self.connect()
        return aside

    def close(self, checkpoint: bool = False) -> None:
        """Close the connection (after copying the WAL into the file, with ``checkpoint``)."""
        if self.db is None:
            return
        if checkpoint:
            try:
                self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass
        self.db.close()
        self.db = None


def _schema(db: sqlite3.Connection) -> None:
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version == SCHEMA_VERSION:
        return
    if version > SCHEMA_VERSION:
        raise sqlite3.DatabaseError(
            f"schema version {version} is newer than this release's {SCHEMA_VERSION}")
    db.execute("BEGIN IMMEDIATE")
    try:
        if version == 0:
            if db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                raise sqlite3.DatabaseError("not a sfive-ngxlua state (no schema version)")
            script(db, SCHEMA_V1)
            version = 1
        while version < SCHEMA_VERSION:
            script(db, MIGRATIONS[version])
            version += 1
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
