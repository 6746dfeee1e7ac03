"""The durable registry of binaries: metadata in SQLite (WAL), module bytes in a blob store.

A blob is written under its content hash (temp file, fsync, rename, fsync of the directory)
before the row that points at it is committed, so a crash at any point leaves the old state
or the new one, never a row naming a missing blob.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
import uuid
from pathlib import Path

import msgspec

from wasmcore.protocol.messages import BinaryInfo

_SCHEMA = """
CREATE TABLE IF NOT EXISTS binaries (
    binary_id   TEXT PRIMARY KEY,
    tenant      TEXT NOT NULL,
    name        TEXT NOT NULL,
    path        TEXT,
    version     INTEGER NOT NULL,
    sha256      TEXT NOT NULL,
    size        INTEGER NOT NULL,
    kind        TEXT NOT NULL,
    exports     TEXT NOT NULL,
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL,
    last_error  TEXT
);
CREATE INDEX IF NOT EXISTS binaries_by_name ON binaries (tenant, name);
CREATE INDEX IF NOT EXISTS binaries_by_path ON binaries (tenant, path);
"""


class BlobStore:
    """Content-addressed files: <root>/<sha[:2]>/<sha>."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path_for(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def put(self, data: bytes) -> tuple[str, Path]:
        sha256 = hashlib.sha256(data).hexdigest()
        target = self.path_for(sha256)
        if target.exists():
            return sha256, target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{sha256}.{os.getpid()}.tmp")
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        return sha256, target


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Registry:
    """All binaries, in memory for routing and in SQLite for restarts. Rows are the wire's
    BinaryInfo as they are (its `executions` count lives in memory only)."""

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.blobs = BlobStore(data_dir / "blobs")
        self._db = sqlite3.connect(data_dir / "registry.sqlite3", isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._by_id: dict[str, BinaryInfo] = {}
        for row in self._db.execute(
            "SELECT binary_id, tenant, name, path, version, sha256, size, kind, exports,"
            " created_at, updated_at, last_error FROM binaries"
        ):
            binary = BinaryInfo(
                binary_id=row[0],
                tenant=row[1],
                name=row[2],
                path=row[3],
                version=row[4],
                sha256=row[5],
                size=row[6],
                kind=row[7],
                exports=msgspec.json.decode(row[8]),
                created_at=row[9],
                updated_at=row[10],
                last_error=row[11],
            )
            self._by_id[binary.binary_id] = binary

    def close(self) -> None:
        self._db.close()

    def __len__(self) -> int:
        return len(self._by_id)

    def get(self, binary_id: str) -> BinaryInfo | None:
        return self._by_id.get(binary_id)

    def all(self) -> list[BinaryInfo]:
        return list(self._by_id.values())

    def for_tenant(self, tenant: str) -> list[BinaryInfo]:
        return [b for b in self._by_id.values() if b.tenant == tenant]

    def find(self, tenant: str, name: str, path: str | None) -> BinaryInfo | None:
        """A path-loaded binary is known by its path; a bytes-loaded one by its name."""
        for binary in self._by_id.values():
            if binary.tenant != tenant:
                continue
            if path is not None and binary.path == path:
                return binary
            if path is None and binary.path is None and binary.name == name:
                return binary
        return None

    def new_id(self) -> str:
        return str(uuid.uuid4())

    def commit(
        self,
        *,
        binary_id: str,
        tenant: str,
        name: str,
        path: str | None,
        sha256: str,
        size: int,
        kind: str,
        exports: list[str],
    ) -> BinaryInfo:
        """Insert a binary or make `sha256` its next version; durable when this returns."""
        now = time.time()
        current = self._by_id.get(binary_id)
        version = current.version + 1 if current else 1
        created = current.created_at if current else now
        self._db.execute(
            "INSERT INTO binaries (binary_id, tenant, name, path, version, sha256, size, kind,"
            " exports, created_at, updated_at, last_error)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL)"
            " ON CONFLICT(binary_id) DO UPDATE SET version=excluded.version,"
            " sha256=excluded.sha256, size=excluded.size, kind=excluded.kind,"
            " exports=excluded.exports, updated_at=excluded.updated_at, last_error=NULL,"
            " path=excluded.path",
            (
                binary_id,
                tenant,
                name,
                path,
                version,
                sha256,
                size,
                kind,
                msgspec.json.encode(exports).decode(),
                created,
                now,
            ),
        )
        binary = BinaryInfo(
            binary_id=binary_id,
            tenant=tenant,
            name=name,
            path=path,
            version=version,
            sha256=sha256,
            size=size,
            kind=kind,
            exports=exports,
            created_at=created,
            updated_at=now,
            executions=current.executions if current else 0,
        )
        self._by_id[binary_id] = binary
        return binary

    def record_error(self, binary_id: str, message: str | None) -> None:
        binary = self._by_id.get(binary_id)
        if binary is None:
            return
        binary.last_error = message
        self._db.execute(
            "UPDATE binaries SET last_error=? WHERE binary_id=?", (message, binary_id)
        )

    def remove(self, binary_id: str) -> BinaryInfo | None:
        binary = self._by_id.pop(binary_id, None)
        if binary is not None:
            self._db.execute("DELETE FROM binaries WHERE binary_id=?", (binary_id,))
        return binary

    def blob_in_use(self, sha256: str) -> bool:
        return any(b.sha256 == sha256 for b in self._by_id.values())
