"""``--client-ip``: what a record's client address becomes before anything keeps or sends it.

``full`` keeps the address; ``truncate`` keeps its network (IPv4 /24, IPv6 /48); ``keyed:FILE``
replaces it by a keyed hash (HMAC-SHA256, 16 hex digits) under the key in FILE, so that
distinct clients stay distinct while no address leaves the edge. IPv4-mapped IPv6 addresses
count as IPv4. Applied once, in the pipeline, where both sources' records meet; every address
is worked out once and then looked up. FILE is looked at again whenever the records cross an
interval boundary: a new key applies from the interval of the record that found it, records
of earlier intervals keep the key they were counted with.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import os
import socket
from typing import Any, Callable, Dict, Optional, Tuple

from twisted.logger import Logger

MIN_KEY_BYTES = 16
CACHE_LIMIT = 1 << 16
"""Addresses remembered per key; a full memo is cleared (a miss costs a few microseconds)."""
NOT_AN_ADDRESS = "-"
"""What ``truncate`` makes of a client field that is no IP address (nginx writes ``unix:`` for
a unix-socket listener; a log format may put anything there): it cannot be truncated, so it is
not passed on either."""
ERRORS = "client-ip"
"""The ``Stats.errors`` entry counting key files that could not be read while running."""


class Key:
    """One key read from the key file: its bytes and a fingerprint that tells keys apart
    without revealing them (for the saved settings)."""

    __slots__ = ("secret", "fingerprint", "_mac")

    def __init__(self, secret: bytes) -> None:
        self.secret = secret
        self.fingerprint = hashlib.sha256(b"sfive-ngxlua key fingerprint\0" + secret
                                          ).hexdigest()[:16]
        self._mac = hmac.new(secret, digestmod="sha256")

    def hash(self, address: str) -> str:
        """HMAC-SHA256 of the address as bytes (so that every spelling of one address,
        IPv4-mapped included, is one client; anything else by its text), 16 hex digits."""
        raw = packed(address)
        mac = self._mac.copy()  # the key's schedule once, not per address
        mac.update(b"t" + address.encode("utf-8", "surrogatepass") if raw is None
                   else b"a" + raw)
        return mac.digest()[:8].hex()


def read_key(path: str) -> Key:
    """The key in ``path`` (its bytes, surrounding white space stripped); ValueError saying
    what is wrong with it."""
    try:
        with open(path, "rb") as f:
            secret = f.read(4096).strip()
    except OSError as e:
        raise ValueError(f"key file {path!r} cannot be read: {e.strerror or e}") from None
    if len(secret) < MIN_KEY_BYTES:
        raise ValueError(
            f"key file {path!r} holds {len(secret)} bytes, fewer than {MIN_KEY_BYTES}: make "
            f"one with e.g. 'head -c 32 /dev/urandom > {path}'")
    return Key(secret)


def _signature(path: str) -> Tuple[int, ...]:
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class ClientIP:
    """The ``--client-ip`` mode, validated: ``full``, ``truncate`` or ``keyed`` with its key
    file (read once here, so an unreadable or short one fails the start; read again later by
    ``refresh``). Part of ``Settings``; compares by mode and path."""

    log = Logger()

    def __init__(self, mode: str, path: Optional[str] = None) -> None:
        if mode not in ("full", "truncate", "keyed") or (mode == "keyed") != (path is not None):
            raise ValueError(f"client IP mode {mode!r}")
        self.mode = mode
        self.path = path
        self.key: Optional[Key] = None
        self._signature: Optional[Tuple[int, ...]] = None
        self._failing = False
        if path is not None:
            try:
                self._signature = _signature(path)
            except OSError:
                pass  # read_key says what is wrong
            self.key = read_key(path)
            if os.stat(path).st_mode & 0o004:
                self.log.warn("--client-ip key file {path} may be read by anyone: whoever has "
                              "the key can test guessed addresses against the hashes (chmod "
                              "o-r)", path=path)

    @classmethod
    def parse(cls, text: str) -> ClientIP:
        """``full``, ``truncate`` or ``keyed:FILE``; ValueError saying what is wrong."""
        if text == "full":
            return FULL
        if text == "truncate":
            return cls(text)
        if text.startswith("keyed:"):
            path = text[len("keyed:"):]
            if not path.strip():
                raise ValueError("keyed: needs the key file, e.g. keyed:/etc/sfive-ngxlua/key")
            return cls("keyed", os.path.abspath(path))
        raise ValueError(f"{text!r} is not a mode: full, truncate or keyed:FILE")

    def __repr__(self) -> str:
        return f"ClientIP({self.mode if self.path is None else 'keyed:' + self.path!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ClientIP):
            return NotImplemented
        return (self.mode, self.path) == (other.mode, other.path)

    def __hash__(self) -> int:
        return hash((self.mode, self.path))

    @property
    def saved(self) -> str:
        """The mode as the saved settings record it: the key by its fingerprint, not its path."""
        return f"keyed:{self.key.fingerprint}" if self.key is not None else self.mode

    def refresh(self, stats: Any = None) -> Optional[Key]:
        """The key in the file now: read again if the file changed (another inode, size or
        time). A file that cannot be read, or holds too short a key, keeps the last good key:
        one error line until it is good again, each failure counted in
        ``stats.errors["client-ip"]``."""
        try:
            signature = _signature(self.path)
            if signature == self._signature and not self._failing:
                return self.key
            key = read_key(self.path)
        except (OSError, ValueError) as e:
            if stats is not None:
                stats.errors[ERRORS] = stats.errors.get(ERRORS, 0) + 1
            if not self._failing:
                self._failing = True
                why = e.strerror if isinstance(e, OSError) else e
                self.log.error("--client-ip key file {path}: {why}; keeping the last good key "
                               "(fingerprint {fingerprint}) until it is good again",
                               path=self.path, why=why, fingerprint=self.key.fingerprint)
            return self.key
        self._signature = signature
        if self._failing:
            self._failing = False
            self.log.info("--client-ip key file {path} is good again", path=self.path)
        if key.secret != self.key.secret:
            self.log.info("--client-ip key file {path}: a new key (fingerprint {fingerprint}) "
                          "from the interval the records are entering on", path=self.path,
                          fingerprint=key.fingerprint)
            self.key = key
        return self.key

    def check_saved(self, record: dict, store: Any, queued: int = 0) -> None:
        """Raise ``StateMismatch`` if the saved settings ``record`` were made under another
        mode or key (a record without one is from ``full``); say so if datasets with full
        addresses wait in the store's queue (``queued`` of them)."""
        saved = record.get("client_ip", "full")
        if saved == self.saved:
            return
        from .model import StateMismatch

        if saved == "full":
            self.log.warn(
                "state in {dir} was counted under --client-ip full: its saved intervals{queue} "
                "hold full client addresses and are reported as they are (to drop them "
                "instead, stop the service and delete {path})", dir=store.directory,
                queue=f" and its hub queue ({queued} datasets)" if queued else "",
                queued=queued, path=store.path)
        raise StateMismatch(f"the saved state has --client-ip {_shown(saved)}, the settings "
                            f"{_shown(self.saved)}")

    def addresses(self, duration: int, stats: Any = None) -> Optional[Addresses]:
        """The pipeline's hook for this mode (None for ``full``: nothing to do)."""
        return None if self.mode == "full" else Addresses(self, duration, stats)


def _shown(saved: str) -> str:
    if saved.startswith("keyed:"):
        return f"keyed (key fingerprint {saved[len('keyed:'):]})"
    return saved


FULL = ClientIP("full")


_MAPPED = b"\0" * 10 + b"\xff\xff"


def packed(address: str) -> Optional[bytes]:
    """The address as 4 bytes (IPv4, IPv4-mapped IPv6 too) or 16 (IPv6); None if it is none.
    ``inet_pton`` first (fast and strict); ``ipaddress`` for IPv6 with a zone (``%eth0``)."""
    try:
        return socket.inet_pton(socket.AF_INET, address)
    except (OSError, ValueError):
        pass
    try:
        raw = socket.inet_pton(socket.AF_INET6, address)
    except (OSError, ValueError):
        if "%" not in address:
            return None
        try:
            raw = ipaddress.IPv6Address(address.partition("%")[0]).packed
        except ValueError:
            return None
    return raw[12:] if raw[:12] == _MAPPED else raw


def truncate(address: str) -> str:
    """An address's network: IPv4 /24, IPv6 /48 (IPv4-mapped IPv6 as IPv4), e.g.
    ``203.0.113.0``, ``2001:db8:1::``; ``NOT_AN_ADDRESS`` for anything else."""
    raw = packed(address)
    if raw is None:
        return NOT_AN_ADDRESS
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[:3] + b"\0")
    return socket.inet_ntop(socket.AF_INET6, raw[:6] + b"\0" * 10)


def keyed(secret: bytes, address: str) -> str:
    """``address`` as ``--client-ip keyed`` sends it under the key ``secret``."""
    return Key(secret).hash(address)


class Addresses:
    """One pipeline's address work: ``wrap(model.add)`` gives an ``add`` that counts each
    record under its client's truncated or keyed address (memoised per address and key)."""

    def __init__(self, client_ip: ClientIP, duration: int, stats: Any = None) -> None:
        self.client_ip = client_ip
        self.duration = duration
        self.stats = stats
        self.key = client_ip.key
        self.memo: Dict[str, str] = {}
        self.old_key = self.key
        self.old_memo: Dict[str, str] = self.memo
        self.since: float = -math.inf
        """The records from this time on are under ``key``; earlier ones under ``old_key``."""
        self.next_look: float = -math.inf
        """The interval boundary past which a record makes the key file be looked at."""

    def __call__(self, address: str, time: Optional[int] = None) -> str:
        """One address as the model gets it (``time``: the record's, for the keyed mode)."""
        if self.key is None:
            return self._truncated(address)
        if time is not None and time >= self.next_look:
            self._boundary(time)
        if time is None or time >= self.since:
            return self._keyed(address)
        return self._old_keyed(address)

    def wrap(self, add: Callable[[Any], bool]) -> Callable[[Any], bool]:
        """``add`` with each record's client replaced. It gets a plain tuple of a Record's
        fields, which the model unpacks as it does a Record: building a NamedTuple again
        would cost some 1,400 instructions per record, more than the rest of the wrapper."""
        if self.key is None:
            get, miss = self.memo.get, self._truncated

            def add_truncated(record: Any) -> bool:
                t, s, client, ua, sent = record
                p = get(client)
                if p is None:
                    p = miss(client)
                return add((t, s, p, ua, sent))

            return add_truncated
        me = self
        get, since, next_look = self.memo.get, self.since, self.next_look

        def add_keyed(record: Any) -> bool:
            nonlocal get, since, next_look
            t, s, client, ua, sent = record
            if t >= next_look:
                me._boundary(t)
                get, since, next_look = me.memo.get, me.since, me.next_look
            if t >= since:
                p = get(client)
                if p is None:
                    p = me._keyed(client)
            else:
                p = me._old_keyed(client)
            return add((t, s, p, ua, sent))

        return add_keyed

    def _truncated(self, address: str) -> str:
        memo = self.memo
        if len(memo) >= CACHE_LIMIT:
            memo.clear()
        p = memo[address] = truncate(address)
        return p

    def _keyed(self, address: str) -> str:
        memo = self.memo
        p = memo.get(address)
        if p is None:
            if len(memo) >= CACHE_LIMIT:
                memo.clear()
            p = memo[address] = self.key.hash(address)
        return p

    def _old_keyed(self, address: str) -> str:
        memo = self.old_memo
        p = memo.get(address)
        if p is None:
            if len(memo) >= CACHE_LIMIT:
                memo.clear()
            p = memo[address] = self.old_key.hash(address)
        return p

    def _boundary(self, t: int) -> None:
        """A record reached a new interval: look at the key file; a new key applies from this
        record's interval on."""
        start = t // self.duration * self.duration
        self.next_look = start + self.duration
        key = self.client_ip.refresh(self.stats)
        if key is not None and key is not self.key:
            self.old_key, self.old_memo = self.key, self.memo
            self.key, self.memo, self.since = key, {}, start
