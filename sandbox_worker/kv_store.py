"""Per-tenant key-value state behind the built-in host methods kv.get, kv.set, kv.incr,
kv.delete and kv.list: one SQLite database in WAL mode under the data directory, opened by
every worker.

Why SQLite in each worker rather than a route through the supervisor: a call stays inside the
worker (no round trip, nothing on the supervisor's loop thread, which must never wait on a
write), and WAL lets readers in all workers go on while one writes. Every statement names the
tenant: a plugin only ever reaches its own tenant's keys. Each write is one transaction
(BEGIN IMMEDIATE: the quota check and the write see the same usage), so workers never lose an
update to each other; `synchronous = NORMAL` keeps every committed write across a crash or a
restart of the service (the last writes before a power loss may be rolled back).
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass

# How long a write waits for another worker's write to finish before giving up.
BUSY_TIMEOUT_MS = 2000
MAX_KEY_BYTES = 1024
MAX_LIST = 1000
_INTEGER = re.compile(rb"-?[0-9]{1,18}")

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS kv (tenant TEXT NOT NULL, key TEXT NOT NULL, "
    "value BLOB NOT NULL, PRIMARY KEY (tenant, key)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS usage (tenant TEXT PRIMARY KEY, keys INTEGER NOT NULL, "
    "bytes INTEGER NOT NULL)",
)


@dataclass(frozen=True, slots=True)
class QuotaExceeded(Exception):
    quota: str  # kv_max_keys or kv_max_bytes
    limit: int
    used: int  # what the tenant would use after the write


class KvStore:
    """One connection, opened on first use (the worker may have switched users by then: the
    directory is the sandbox group's, see supervisor/confinement.py)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000,
                                 isolation_level=None, check_same_thread=False)
            try:
                db.execute("PRAGMA journal_mode = WAL")
                db.execute("PRAGMA synchronous = NORMAL")
                for statement in _SCHEMA:
                    db.execute(statement)
            except sqlite3.Error:
                db.close()
                raise
            self._db = db
        return self._db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def get(self, tenant: str, key: str) -> bytes | None:
        row = self._connect().execute(
            "SELECT value FROM kv WHERE tenant = ? AND key = ?", (tenant, key)).fetchone()
        return None if row is None else bytes(row[0])

    def set(self, tenant: str, key: str, value: bytes, max_keys: int, max_bytes: int) -> None:
        """Store `value` (JSON text) under `key`; QuotaExceeded leaves everything as it was."""
        db = self._connect()
        db.execute("BEGIN IMMEDIATE")
        try:
            old = db.execute("SELECT length(value) FROM kv WHERE tenant = ? AND key = ?",
                             (tenant, key)).fetchone()
            _write(db, tenant, key, value, None if old is None else old[0], max_keys,
                   max_bytes)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def incr(self, tenant: str, key: str, by: int, max_keys: int, max_bytes: int) -> int:
        """Add `by` to the integer under `key` (absent: 0) in one transaction, so increments
        from any number of workers are never lost; returns the new value. ValueError if the
        key holds something else than an integer."""
        db = self._connect()
        db.execute("BEGIN IMMEDIATE")
        try:
            old = db.execute("SELECT value FROM kv WHERE tenant = ? AND key = ?",
                             (tenant, key)).fetchone()
            current = 0
            if old is not None:
                text = bytes(old[0])
                if not _INTEGER.fullmatch(text):
                    raise ValueError(f"key {key!r} does not hold an integer")
                current = int(text)
            value = current + by
            _write(db, tenant, key, str(value).encode(), None if old is None else len(old[0]),
                   max_keys, max_bytes)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return value

    def delete(self, tenant: str, key: str) -> bool:
        db = self._connect()
        db.execute("BEGIN IMMEDIATE")
        try:
            old = db.execute("SELECT length(value) FROM kv WHERE tenant = ? AND key = ?",
                             (tenant, key)).fetchone()
            if old is not None:
                db.execute("DELETE FROM kv WHERE tenant = ? AND key = ?", (tenant, key))
                keys, used = _usage(db, tenant)
                _set_usage(db, tenant, keys - 1, used - len(key.encode()) - old[0])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return old is not None

    def list(self, tenant: str, prefix: str, after: str, limit: int) -> tuple[list[str], bool]:
        """Up to `limit` of the tenant's keys starting with `prefix`, in order, after `after`
        (a cursor: the last key of the previous page); and whether there are more."""
        start = max(prefix, after)
        query = "SELECT key FROM kv WHERE tenant = ? AND key >= ?"
        params: list[object] = [tenant, start]
        if after and after >= prefix:
            query += " AND key > ?"
            params.append(after)
        end = _prefix_end(prefix)
        if end is not None:
            query += " AND key < ?"
            params.append(end)
        query += " ORDER BY key LIMIT ?"
        params.append(limit + 1)
        keys = [row[0] for row in self._connect().execute(query, params)]
        return keys[:limit], len(keys) > limit

    def usage(self, tenant: str) -> tuple[int, int]:
        return _usage(self._connect(), tenant)


def _write(db: sqlite3.Connection, tenant: str, key: str, value: bytes, old_len: int | None,
           max_keys: int, max_bytes: int) -> None:
    """Write one key inside the caller's transaction, within the tenant's quota (0:
    unlimited); `old_len` is the length of the value it replaces (None: a new key)."""
    keys, used = _usage(db, tenant)
    if old_len is None:
        keys += 1
        used += len(key.encode()) + len(value)
        if max_keys and keys > max_keys:
            raise QuotaExceeded("kv_max_keys", max_keys, keys)
    else:
        used += len(value) - old_len
    if max_bytes and used > max_bytes and (old_len is None or len(value) > old_len):
        raise QuotaExceeded("kv_max_bytes", max_bytes, used)
    db.execute("INSERT INTO kv (tenant, key, value) VALUES (?, ?, ?) "
               "ON CONFLICT (tenant, key) DO UPDATE SET value = excluded.value",
               (tenant, key, value))
    _set_usage(db, tenant, keys, used)


def _usage(db: sqlite3.Connection, tenant: str) -> tuple[int, int]:
    row = db.execute("SELECT keys, bytes FROM usage WHERE tenant = ?", (tenant,)).fetchone()
    return (0, 0) if row is None else (int(row[0]), int(row[1]))


def _set_usage(db: sqlite3.Connection, tenant: str, keys: int, used: int) -> None:
    db.execute("INSERT INTO usage (tenant, keys, bytes) VALUES (?, ?, ?) ON CONFLICT (tenant) "
               "DO UPDATE SET keys = excluded.keys, bytes = excluded.bytes",
               (tenant, keys, used))


def _prefix_end(prefix: str) -> str | None:
    """The first string after every string that starts with `prefix` (SQLite compares text
    as UTF-8 bytes, which orders like code points), or None when there is none."""
    while prefix:
        last = ord(prefix[-1])
        if last < 0x10FFFF and not 0xD7FF <= last < 0xE000:
            return prefix[:-1] + chr(last + 1)
        prefix = prefix[:-1]
    return None
