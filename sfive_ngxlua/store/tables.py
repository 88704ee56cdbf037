"""The model's tables: its changes written incrementally (or in full after a failed write),
the source's position and the settings they were counted under, and the saved state read back
as ``IntervalModel.snapshot`` data."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from ..model import IntervalModel
from ..settings import Settings
from .transactions import Transactions


def settings_record(settings: Settings) -> dict:
    """What the saved state's meaning depends on (and what its datasets are reported under)."""
    return {"duration": settings.duration, "streamers": [list(s) for s in settings.streamers],
            "hostname": settings.hostname, "tags": list(settings.tags),
            "max_clients": settings.max_clients, "max_ua_length": settings.max_ua_length,
            "client_ip": settings.client_ip.saved}


@dataclass(frozen=True)
class Saved:
    """A saved state: the settings record it was counted under, the model as snapshot data,
    and when it was saved (as stored: reading it may still fail)."""

    record: dict
    snapshot: dict
    saved_at: Any


class ModelTables:
    """The model and the position in the state database (writes inside a transaction)."""

    def __init__(self, transactions: Transactions, settings: Settings) -> None:
        self.transactions = transactions
        self.settings = settings
        self.need_full = True
        """Write the whole model next time (the first write of a run, and after a failure)."""
        self._ids: Dict[int, Dict[Tuple[int, str, str], int]] = {}
        self._next_id = 1
        transactions.on_failure(self._write_all_next)

    def _write_all_next(self) -> None:
        self.need_full = True

    def meta(self, key: str) -> Any:
        row = self.transactions.db.execute(
            "SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def set_meta(self, key: str, value: Any) -> None:
        self.transactions.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                                     (key, json.dumps(value)))

    def write(self, model: IntervalModel, position: Optional[dict], now: float) -> None:
        """The model's changes since the last write (all of it with ``need_full``) and the
        position they cover."""
        db = self.transactions.db
        header = self.meta("model") or {}
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
            header = {key: snap[key] for key in ("format", "first", "reported", "live",
                                                 "coverage")}
            self.need_full = False
        else:
            changes = model.take_changes()
            rows, folded, dropped = changes.clients, changes.folded, changes.dropped
            header.update(first=changes.first, reported=changes.reported, live=changes.live,
                          coverage=changes.coverage)
        if dropped:
            for k in dropped:
                self._ids.pop(k, None)
            ks = [(k,) for k in dropped]
            db.executemany("DELETE FROM counts WHERE id IN (SELECT id FROM clients WHERE k = ?)",
                           ks)
            db.executemany("DELETE FROM clients WHERE k = ?", ks)
            db.executemany("DELETE FROM folded WHERE k = ?", ks)
            self.transactions.scrub = True
        self._write_clients(rows)
        db.executemany("INSERT OR IGNORE INTO folded (k, s, h) VALUES (?, ?, ?)", folded)
        self.set_meta("model", header)
        self.set_meta("settings", settings_record(self.settings))
        self.set_meta("position", position)
        self.set_meta("saved_at", now)

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
        db = self.transactions.db
        db.executemany("INSERT INTO clients (id, k, s, ip, ua) VALUES (?, ?, ?, ?, ?)", new)
        db.executemany("INSERT INTO counts (id, bytes) VALUES (?, ?)", counts)
        db.executemany("UPDATE counts SET bytes = ? WHERE id = ?", updates)

    def clear(self) -> None:
        """Delete the saved model (inside a transaction); the position stays."""
        db = self.transactions.db
        for table in ("clients", "counts", "folded"):
            db.execute(f"DELETE FROM {table}")
        db.execute("DELETE FROM meta WHERE key IN ('model', 'settings')")
        self.transactions.scrub = True

    def position(self) -> Optional[dict]:
        """The saved source position (None if there is none)."""
        return self.meta("position")

    def load(self) -> Optional[Saved]:
        """The saved state (None if nothing is saved); raises KeyError, TypeError, ValueError
        or AttributeError for damaged rows (the position included: a state is usable only as
        a whole)."""
        record = self.meta("settings")
        header = self.meta("model")
        self.meta("position")
        if record is None or header is None:
            return None
        [tuple(s) for s in record["streamers"]]  # a list of lists, or the rows are damaged
        return Saved(record, self._snapshot(record, header), self.meta("saved_at"))

    def _snapshot(self, record: dict, header: dict) -> dict:
        open_: Dict[str, Dict[str, Dict[str, list]]] = {}

        def entry(k: int, s: int) -> Dict[str, list]:
            streams = open_.setdefault(str(k), {})
            return streams.setdefault(str(s), {"clients": [], "folded": []})

        db = self.transactions.db
        for k, s, ip, ua, b in db.execute(
                "SELECT k, s, ip, ua, bytes FROM clients JOIN counts USING (id) "
                "ORDER BY k, s, id"):
            entry(k, s)["clients"].append([ip, ua, b])
        for k, s, h in db.execute("SELECT k, s, h FROM folded ORDER BY k, s"):
            entry(k, s)["folded"].append(h)
        return {"format": header.get("format"), "duration": record["duration"],
                "streamers": record["streamers"], "first": header.get("first"),
                "reported": header.get("reported"), "live": header.get("live", True),
                "open": open_, "coverage": header.get("coverage")}
