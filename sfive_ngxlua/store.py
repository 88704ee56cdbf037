"""The state store: the model, the source's position and the hub queue in one SQLite file.

``--state-dir DIR`` keeps ``DIR/state.sqlite`` (WAL, synchronous=NORMAL, secure_delete=ON) and
``DIR/lock``. The directory is 0700 and the files 0600 whatever the umask: they hold client
addresses and user agents. A checkpoint is one transaction (the model's changes since the last
one and the position they cover), so a restart never counts a record twice or misses one; a
report is one transaction too (the closed intervals' changes, their datasets into the queue, the
position), and nothing is sent before it commits. Delivered datasets and closed intervals are
deleted, and the WAL is checkpointed after deletions so they do not linger in it.

Trouble is one log line and a safe choice, never a crash loop: a second instance on the same
directory refuses to start (``StateLocked``); a corrupt file is moved aside
(``state.sqlite.corrupt-<time>``) and the service starts fresh; a failing write (a full disk)
keeps the state in memory and is retried at every checkpoint, writing everything once it works.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from twisted.logger import Logger

from .datasets import Dataset, datasets, encode, start_time
from .model import IntervalModel, StateMismatch
from .settings import Settings
from .stats import Stats

STATE_FILE = "state.sqlite"
LOCK_FILE = "lock"
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


def _script(db: sqlite3.Connection, sql: str) -> None:
    """Statements separated by ';', inside the caller's transaction (``executescript`` would
    commit it)."""
    for statement in sql.split(";"):
        if statement.strip():
            db.execute(statement)


class StateLocked(Exception):
    """Another process holds the state directory's lock."""


class StateUnusable(Exception):
    """The state directory or its database cannot be used at all (permissions, I/O)."""


def _settings_record(settings: Settings) -> dict:
    """What the saved state's meaning depends on (and what its datasets are reported under)."""
    return {"duration": settings.duration, "streamers": [list(s) for s in settings.streamers],
            "hostname": settings.hostname, "tags": list(settings.tags),
            "max_clients": settings.max_clients, "max_ua_length": settings.max_ua_length,
            "client_ip": settings.client_ip.saved}


def _settings_from(record: dict, settings: Settings) -> Settings:
    """``settings`` as they were when the state was saved."""
    return replace(settings, duration=record["duration"],
                   streamers=tuple(tuple(s) for s in record["streamers"]),
                   hostname=record["hostname"], tags=tuple(record["tags"]),
                   max_clients=record["max_clients"], max_ua_length=record["max_ua_length"])


class StateStore:
    """One service's state directory, opened and locked for as long as the service runs."""

    log = Logger()

    def __init__(self, directory: str, settings: Settings, stats: Stats,
                 clock: Any = None) -> None:
        """Create or open ``directory``; raises ``StateLocked`` if another process has it."""
        self.directory = directory
        self.path = os.path.join(directory, STATE_FILE)
        self.settings = settings
        self.stats = stats
        self.now: Callable[[], float] = clock.seconds if clock is not None else time.time
        self.failing: Optional[str] = None
        self.need_full = True
        self._ids: Dict[int, Dict[Tuple[int, str, str], int]] = {}
        self._next_id = 1
        self.scrub = False
        self._after_commit: List[Callable[[], None]] = []
        self.pending: List[Dataset] = []
        """Datasets of a saved state that did not fit, for a sink without a queue."""
        self._in_transaction = False
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            self._private(directory, 0o700)
            self._lock_fd = self._lock()
        except OSError as e:
            raise StateUnusable(f"state directory {directory}: {e.strerror or e}") from None
        try:
            self.db = self._open()
        except (sqlite3.Error, OSError) as e:
            os.close(self._lock_fd)
            raise StateUnusable(f"state database {self.path} cannot be opened: {e}") from None

    # -- opening --------------------------------------------------------------------------

    def _private(self, path: str, mode: int) -> None:
        try:
            if os.stat(path).st_mode & 0o777 != mode:
                os.chmod(path, mode)
        except OSError as e:
            self.log.warn("cannot make {path} private ({mode:o}): {why}", path=path, mode=mode,
                          why=e.strerror)

    def _lock(self) -> int:
        path = os.path.join(self.directory, LOCK_FILE)
        old = os.umask(0o077)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        finally:
            os.umask(old)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise StateLocked(
                f"state directory {self.directory} is in use by another sfive-ngxlua "
                f"(pid {holder}); one state directory serves one service: stop the other one "
                "or give this one its own --state-dir") from None
        self._lock_fd = fd
        self._write_pid()
        return fd

    def _write_pid(self) -> None:
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, f"{os.getpid()}\n".encode("ascii"), 0)

    def _open(self) -> sqlite3.Connection:
        """The database, made or upgraded; a file that cannot be read is moved aside."""
        try:
            return self._connect()
        except sqlite3.OperationalError:
            raise  # cannot open, I/O, locked, full: not the file's fault; never moved aside
        except sqlite3.DatabaseError as e:
            aside = self._move_aside("corrupt")
            self.stats.state_errors += 1
            self.log.error(
                "state database {path} cannot be read ({why}); moved it to {aside} and starting "
                "with an empty state (what it held is not reported)", path=self.path, why=e,
                aside=aside)
            return self._connect()

    def _connect(self) -> sqlite3.Connection:
        old = os.umask(0o077)
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            try:
                db.execute("PRAGMA journal_mode=WAL").fetchone()
                db.execute("PRAGMA synchronous=NORMAL")
                db.execute("PRAGMA secure_delete=ON")
                if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                    raise sqlite3.DatabaseError("quick_check failed")
                self._schema(db)
            except BaseException:
                db.close()
                raise
        finally:
            os.umask(old)
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(self.path + suffix):
                self._private(self.path + suffix, 0o600)
        return db

    def _schema(self, db: sqlite3.Connection) -> None:
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
                _script(db, SCHEMA_V1)
                version = 1
            while version < SCHEMA_VERSION:
                _script(db, MIGRATIONS[version])
                version += 1
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _move_aside(self, why: str) -> str:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = f"{self.path}.{why}-{stamp}"
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(self.path + suffix):
                os.replace(self.path + suffix, aside + suffix)
        return aside

    def detach(self) -> None:
        """Close the database connection but keep the lock: before twistd forks into the
        background (an SQLite connection must not cross a fork; the lock's descriptor may)."""
        if self.db is not None:
            self.db.close()
            self.db = None

    def attach(self) -> None:
        """Open the connection again after ``detach`` (in the process that runs, whose pid the
        lock file then names)."""
        if self.db is None:
            self._write_pid()
            self.db = self._connect()

    def close(self) -> None:
        """Checkpoint the WAL into the file, close it and release the lock."""
        if self.db is not None:
            try:
                self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass
            self.db.close()
            self.db = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- transactions ---------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN ... COMMIT (ROLLBACK on an exception); ``after_commit`` actions run after."""
        self.db.execute("BEGIN IMMEDIATE")
        self._in_transaction = True
        try:
            yield self.db
            self.db.execute("COMMIT")
        except BaseException:
            self._after_commit.clear()
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
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
        """A write failed: the state stays in memory; the next checkpoint writes all of it."""
        self.need_full = True
        self.stats.state_errors += 1
        if self.failing is None:
            self.log.error(
                "state store {path}: {what} failed ({why}); keeping the state in memory and "
                "retrying at every checkpoint (a crash now loses what was not written)",
                path=self.path, what=what, why=error)
        self.failing = str(error)

    def _recovered(self) -> None:
        if self.failing is not None:
            self.log.info("state store {path} writable again; state written in full",
                          path=self.path)
        self.failing = None

    # -- the model and the position --------------------------------------------------------

    def _meta(self, key: str) -> Any:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def _set_meta(self, key: str, value: Any) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                        (key, json.dumps(value)))

    def position(self) -> Optional[dict]:
        """The saved source position (None if there is none)."""
        return self._meta("position")

    def checkpoint(self, model: IntervalModel, position: Optional[dict],
                   queue: Any = None, items: Optional[List[bytes]] = None) -> bool:
        """One transaction: the model's changes, the position they cover, and ``items`` (encoded
        datasets) into ``queue``. False if it could not be written (the state is kept in memory,
        ``items`` go into the queue's memory part, and the next checkpoint writes everything)."""
        try:
            with self.transaction():
                self._write_model(model)
                self._set_meta("position", position)
                self._set_meta("saved_at", self.now())
                if items or (queue is not None and queue.items):
                    queue.stage(items or [])
        except sqlite3.Error as e:
            self.failed(e, "checkpoint")
            if items:
                queue.push_memory(items)
            return False
        self._recovered()
        return True

    def _write_model(self, model: IntervalModel) -> None:
        """The model's changes since the last write, or all of it after a failed write (and at
        the first checkpoint of a run)."""
        db = self.db
        header = self._meta("model") or {}
        if self.need_full:
            snap = model.snapshot()
            for table in ("clients", "counts", "folded"):
                db.execute(f"DELETE FROM {table}")
            self._ids, self._next_id = {}, 1
            rows, folded, dropped = [], [], []
            for k, streams in snap["open"].items():
                for s, entry in streams.items():
                    rows.extend((int(k), int(s), ip, ua, b) for ip, ua, b in entry["clients"])
                    folded.extend((int(k), int(s), h) for h in entry["folded"])
            header = {key: snap[key] for key in ("format", "first", "reported", "live")}
            self.need_full = False
        else:
            changes = model.take_changes()
            rows, folded, dropped = changes.clients, changes.folded, changes.dropped
            header.update(first=changes.first, reported=changes.reported, live=changes.live)
        if dropped:
            for k in dropped:
                self._ids.pop(k, None)
            ks = [(k,) for k in dropped]
            db.executemany("DELETE FROM counts WHERE id IN (SELECT id FROM clients WHERE k = ?)",
                           ks)
            db.executemany("DELETE FROM clients WHERE k = ?", ks)
            db.executemany("DELETE FROM folded WHERE k = ?", ks)
            self.scrub = True
        self._write_clients(rows)
        db.executemany("INSERT OR IGNORE INTO folded (k, s, h) VALUES (?, ?, ?)", folded)
        self._set_meta("model", header)
        self._set_meta("settings", _settings_record(self.settings))

    def _write_clients(self, rows: List[Tuple[int, int, str, str, int]]) -> None:
        """Upsert (k, s, ip, ua, bytes): a new client's identity once, then only its bytes.
        The ids live in ``_ids`` (rebuilt by every full write, so a failed transaction, which
        sets ``need_full``, cannot leave it wrong)."""
        ids, new, counts, updates = self._ids, [], [], []
        for k, s, ip, ua, sent in rows:
            known = ids.get(k)
            if known is None:
                known = ids[k] = {}
            key = (s, ip, ua)
            cid = known.get(key)
            if cid is None:
                cid = known[key] = self._next_id
                self._next_id += 1
                new.append((cid, k, s, ip, ua))
                counts.append((cid, sent))
            else:
                updates.append((sent, cid))
        db = self.db
        db.executemany("INSERT INTO clients (id, k, s, ip, ua) VALUES (?, ?, ?, ?, ?)", new)
        db.executemany("INSERT INTO counts (id, bytes) VALUES (?, ?)", counts)
        db.executemany("UPDATE counts SET bytes = ? WHERE id = ?", updates)

    def _snapshot(self, record: dict, header: dict) -> dict:
        """The saved model as ``IntervalModel.snapshot`` data."""
        open_: Dict[str, Dict[str, Dict[str, list]]] = {}

        def entry(k: int, s: int) -> Dict[str, list]:
            streams = open_.setdefault(str(k), {})
            return streams.setdefault(str(s), {"clients": [], "folded": []})

        for k, s, ip, ua, b in self.db.execute(
                "SELECT k, s, ip, ua, bytes FROM clients JOIN counts USING (id) "
                "ORDER BY k, s, id"):
            entry(k, s)["clients"].append([ip, ua, b])
        for k, s, h in self.db.execute("SELECT k, s, h FROM folded ORDER BY k, s"):
            entry(k, s)["folded"].append(h)
        return {"format": header.get("format"), "duration": record["duration"],
                "streamers": record["streamers"], "first": header.get("first"),
                "reported": header.get("reported"), "live": header.get("live", True),
                "open": open_}

    def _saved(self) -> Optional[Tuple[dict, dict]]:
        """The saved settings record and the saved model as ``IntervalModel.snapshot`` data
        (None if nothing is saved); raises KeyError, TypeError, ValueError or AttributeError
        for damaged rows (the position included: a state is usable only as a whole)."""
        record = self._meta("settings")
        header = self._meta("model")
        self._meta("position")
        if record is None or header is None:
            return None
        return record, self._snapshot(record, header)

    def _damaged(self, stats: Stats) -> Optional[Tuple[dict, dict]]:
        """``_saved()``, with damaged rows set aside (counted, one error line) as None."""
        try:
            return self._saved()
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            self._set_aside(stats, "its saved rows are damaged", e)
            return None

    def restore(self, stats: Stats, queue: Any = None) -> Optional[IntervalModel]:
        """The saved model, or None (nothing saved, or saved under other settings: then its
        intervals are reported into ``queue`` under the settings they were made with, in one
        transaction with clearing them, and the service starts fresh; damaged: set aside)."""
        saved = self._damaged(stats)
        if saved is None:
            return None
        record, snap = saved
        try:
            self.settings.client_ip.check_saved(record, self)
            return IntervalModel.restore(self.settings, stats, snap)
        except StateMismatch as e:
            mismatch = str(e)
        except (KeyError, TypeError, ValueError) as e:
            mismatch = f"unreadable saved model ({e!r})"
        self._report_saved(record, snap, f"saved under other settings ({mismatch})", stats,
                           queue)
        return None

    def report_saved(self, queue: Any, why: str) -> Tuple[int, int]:
        """Report the saved intervals into ``queue`` under the settings they were counted with
        and clear them (one transaction): for retiring a node. (intervals, datasets)."""
        saved = self._damaged(self.stats)
        if saved is None:
            return 0, 0
        return self._report_saved(*saved, why, self.stats, queue)

    def _report_saved(self, record: dict, snap: dict, why: str, stats: Stats,
                      queue: Any) -> Tuple[int, int]:
        """Report a saved model as it was saved (the running interval cut where it was saved)
        into ``queue``, and clear it; (intervals, datasets)."""
        try:
            saved_at = self._meta("saved_at") or self.now()
            old = _settings_from(record, self.settings)
            model = IntervalModel.restore(old, Stats(), snap)
            intervals = model.close_all(saved_at)
        except Exception as e:
            self._set_aside(stats, f"{why}, and it cannot be reported as saved", e)
            return 0, 0
        items = [d for interval in intervals for d in datasets(interval, old)]
        with self.transaction():
            for table in ("clients", "counts", "folded"):
                self.db.execute(f"DELETE FROM {table}")
            self.db.execute("DELETE FROM meta WHERE key IN ('model', 'settings')")
            if items and queue is not None:
                queue.stage([encode(d) for d in items])
            elif items:
                self.after_commit(lambda: self.pending.extend(items))
        self.scrub = True
        first = start_time(intervals[0].start) if intervals else "-"
        self.log.warn(
            "state in {dir} {why}: reported its {n} saved intervals from {first} as {m} "
            "datasets under the settings they were counted with (into the hub queue); the "
            "model starts fresh", dir=self.directory, why=why, n=len(intervals), first=first,
            m=len(items))
        return len(intervals), len(items)

    def _set_aside(self, stats: Stats, why: str, error: Exception) -> None:
        """A state that cannot be used: moved aside (kept for a person to look at), counted,
        one error line; the store goes on with an empty file."""
        self.db.close()
        aside = self._move_aside("unusable")
        self.db = self._connect()
        stats.state_errors += 1
        self.log.error("state {path}: {why} ({error}); moved it to {aside} and starting fresh",
                       path=self.path, why=why, error=error, aside=aside)

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

    # -- the queue table --------------------------------------------------------------------

    def queue_insert(self, items: List[bytes]) -> List[int]:
        """Append encoded datasets (inside a transaction); their ids, in order."""
        ids = []
        for data in items:
            ids.append(self.db.execute("INSERT INTO queue (data) VALUES (?)",
                                       (sqlite3.Binary(data),)).lastrowid)
        return ids

    def queue_delete(self, ids: List[int]) -> None:
        self.db.executemany("DELETE FROM queue WHERE id = ?", [(i,) for i in ids])
        self.scrub = True

    def queue_update(self, id: int, data: bytes) -> None:
        self.db.execute("UPDATE queue SET data = ? WHERE id = ?", (sqlite3.Binary(data), id))

    def queue_totals(self) -> Tuple[int, int]:
        """(datasets, bytes) in the queue table."""
        n, size = self.db.execute("SELECT count(*), total(length(data)) FROM queue").fetchone()
        return n, int(size)

    def queue_after(self, id: int, limit: int) -> List[Tuple[int, bytes]]:
        """Up to ``limit`` queued datasets after ``id``, oldest first."""
        return [(i, bytes(d)) for i, d in self.db.execute(
            "SELECT id, data FROM queue WHERE id > ? ORDER BY id LIMIT ?", (id, limit))]

    def queue_oldest(self, n: int) -> List[Tuple[int, int]]:
        """(id, size) of the ``n`` oldest queued datasets."""
        return list(self.db.execute(
            "SELECT id, length(data) FROM queue ORDER BY id LIMIT ?", (n,)))
