"""The durable registry of binaries: metadata in SQLite (WAL), module bytes in a blob store.

A blob is written under its content hash (temp file, fsync, rename, fsync of the directory)
before the row that points at it is committed, so a crash at any point leaves the old state
or the new one, never a row naming a missing blob.

A blob goes when nobody holds it any more: the registry holds the blob of every version it
lists, a load holds its blob while it is staged, and `Binaries` holds a superseded version's
blob while a job may still name it. A registry that cannot be read in full never makes the
service forget binaries: readable rows are served, the rest is reported (`problems`), and the
blobs are kept.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec

from wasmcore.protocol.messages import BinaryInfo

log = logging.getLogger("wasmcore.supervisor")

REGISTRY_FILE = "registry.sqlite3"
_BROKEN = ".broken-"

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
_COLUMNS = ("binary_id, tenant, name, path, version, sha256, size, kind, exports, created_at,"
            " updated_at, last_error")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class BlobStore:
    """Content-addressed files: <root>/<sha[:2]>/<sha>, mode 0600 in directories 0700. Used
    from the loop and the I/O threads: a count of holders per hash decides, at the moment of
    deleting, whether a blob may go, so a deletion decided a moment ago never removes a blob
    taken since.

    With a `group` (the sandbox group: workers of a root service run as another user and
    compile from blobs, supervisor/confinement.py), blobs are 0640 in directories 02750 of
    that group instead: its members read them, nobody else does, and nobody but the owner
    writes. The store gives everything already on disk its modes at start (`sweep`), so a
    service that stops sharing takes the group's access back."""

    def __init__(self, root: Path, group: int = -1) -> None:
        self.root = root
        self.group = group
        self._dir_mode, self._file_mode = (0o2750, 0o640) if group >= 0 else (0o700, 0o600)
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.Lock()
        self._holds: collections.Counter[str] = collections.Counter()

    def path_for(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def hold(self, sha256: str) -> None:
        with self._lock:
            self._holds[sha256] += 1

    def release(self, sha256: str) -> None:
        with self._lock:
            self._holds[sha256] -= 1
            if self._holds[sha256] <= 0:
                del self._holds[sha256]

    def put(self, data: bytes) -> tuple[str, Path]:
        """Store `data` (durable when this returns) and hold it for the caller. A failure
        leaves no temp file and no hold."""
        sha256 = hashlib.sha256(data).hexdigest()
        self.hold(sha256)  # before looking: a deletion from now on spares it
        target = self.path_for(sha256)
        try:
            if target.exists():
                return sha256, target
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            if self.group >= 0:
                self._set_mode(target.parent, self._dir_mode)
            # Unique per thread: two loads of the same bytes may write at once.
            tmp = target.with_name(f".{sha256}.{os.getpid()}.{threading.get_ident()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
            try:
                if self.group >= 0:
                    # Exactly this mode and group, whatever the umask: workers must read it.
                    os.fchown(fd, -1, self.group)
                    os.fchmod(fd, self._file_mode)
                with open(fd, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp, target)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            _fsync_dir(target.parent)
        except BaseException:
            self.release(sha256)
            raise
        return sha256, target

    def discard(self, sha256: str, also: Sequence[Path] = ()) -> bool:
        """Delete the blob (and `also`, its artifacts) if nobody holds it."""
        with self._lock:
            if self._holds[sha256] > 0:
                return False
            del self._holds[sha256]
            for path in (*also, self.path_for(sha256)):
                path.unlink(missing_ok=True)
        return True

    def hold_everything_present(self) -> int:
        """Keep every blob on disk for this run (the registry could not say which are in
        use). Returns how many there are."""
        present = [sha for sha, _ in self._on_disk()]
        for sha in present:
            self.hold(sha)
        return len(present)

    def sweep(self, also: Callable[[str], Sequence[Path]]) -> int:
        """At start: delete every blob nobody holds (and `also(sha)`), and temp files left by
        a crash; give the rest, and the directories, the store's modes (owner-only, or the
        group's read). Returns how many blobs went."""
        removed = 0
        if self.root.is_dir():
            for directory in [self.root, *(d for d in self.root.iterdir()
                                           if d.is_dir() and not d.is_symlink())]:
                self._set_mode(directory, self._dir_mode)
        for sha, path in self._on_disk():
            if self.discard(sha, also(sha)):
                removed += 1
            else:
                self._set_mode(path, self._file_mode)
        for tmp in self.root.glob("*/.*.tmp"):
            tmp.unlink(missing_ok=True)
        return removed

    def _set_mode(self, path: Path, mode: int) -> None:
        if path.is_symlink():
            return  # chmod and chown would act on its target
        if self.group >= 0:
            os.chown(path, -1, self.group, follow_symlinks=False)
        path.chmod(mode)

    def count(self) -> int:
        return sum(1 for _ in self._on_disk())

    def _on_disk(self) -> list[tuple[str, Path]]:
        if not self.root.is_dir():
            return []
        return [(path.name, path) for path in self.root.glob("*/*")
                if _SHA256.match(path.name) and path.is_file()]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Registry:
    """All binaries, in memory for routing and in SQLite for restarts. Rows are the wire's
    BinaryInfo as they are (its `executions` count lives in memory only)."""

    def __init__(self, data_dir: Path, blob_group: int = -1) -> None:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.blobs = BlobStore(data_dir / "blobs", blob_group)
        # What could not be read at start, for the log and stats; never silently dropped.
        self.problems: list[str] = []
        self._by_id: dict[str, BinaryInfo] = {}
        path = data_dir / REGISTRY_FILE
        rows, trouble, corrupt = _read_rows(path, self.blobs)
        moved = None
        if corrupt:
            moved = _move_aside(path)
            trouble += (f"; the file was moved to {moved.name} and a new registry started with "
                        f"the {len(rows)} rows read" if moved else "")
        for rowid, row in rows:
            try:
                binary = _binary_from_row(row)
            except ValueError as exc:
                self.problems.append(_row_problem(rowid, row, str(exc)))
                sha = row[5].decode(errors="replace") if isinstance(row[5], bytes) else ""
                if _SHA256.match(sha):
                    self.blobs.hold(sha)
                else:
                    self.blobs.hold_everything_present()
                continue
            self._by_id[binary.binary_id] = binary
            self.blobs.hold(binary.sha256)
        if trouble is not None:
            self.problems.append(trouble)
        kept = sorted(p for p in data_dir.glob(REGISTRY_FILE + _BROKEN + "*")
                      if not p.name.endswith(("-wal", "-shm")) and p != moved)
        if kept:
            self.problems.append(
                f"{', '.join(p.name for p in kept)} in {data_dir}: a registry that could not be "
                "read is kept there; every module blob is kept while it is. Recover what you "
                "need from it, then delete it")
        if trouble is not None or kept:
            self.blobs.hold_everything_present()
        self._db: sqlite3.Connection | None = None
        try:
            if trouble is not None and moved is None:
                # Not ours to overwrite (busy, unreadable now, or it could not be moved).
                raise sqlite3.OperationalError("it could not be read")
            self._db = _connect(path)
            if moved is not None:
                for binary in self._by_id.values():  # what was salvaged, kept durable
                    self._write(binary)
        except (sqlite3.Error, OSError) as exc:
            self._db = None
            self.problems.append(f"{path} cannot be opened for writing ({exc}): loads, updates "
                                 "and unloads are refused until the data dir is fixed")

    def close(self) -> None:
        if self._db is not None:
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
        """Insert a binary or make `sha256` its next version; durable when this returns.
        Raises sqlite3.Error or OSError when storage fails; nothing changed then."""
        now = time.time()
        current = self._by_id.get(binary_id)
        binary = BinaryInfo(
            binary_id=binary_id,
            tenant=tenant,
            name=name,
            path=path,
            version=current.version + 1 if current else 1,
            sha256=sha256,
            size=size,
            kind=kind,
            exports=exports,
            created_at=current.created_at if current else now,
            updated_at=now,
            executions=current.executions if current else 0,
        )
        self._write(binary)
        self.blobs.hold(sha256)
        if current is not None:
            self.blobs.release(current.sha256)
        self._by_id[binary_id] = binary
        return binary

    def record_error(self, binary_id: str, message: str | None) -> None:
        binary = self._by_id.get(binary_id)
        if binary is None:
            return
        binary.last_error = message
        try:
            self._database().execute(
                "UPDATE binaries SET last_error=? WHERE binary_id=?", (message, binary_id)
            )
        except (sqlite3.Error, OSError) as exc:  # shown in list all the same, until restart
            log.warning("cannot record the last error of %s: %s", binary_id, exc)

    def remove(self, binary_id: str) -> BinaryInfo | None:
        """Raises sqlite3.Error or OSError when storage fails; nothing changed then."""
        binary = self._by_id.get(binary_id)
        if binary is not None:
            self._database().execute("DELETE FROM binaries WHERE binary_id=?", (binary_id,))
            del self._by_id[binary_id]
            self.blobs.release(binary.sha256)
        return binary

    def blob_in_use(self, sha256: str) -> bool:
        return any(b.sha256 == sha256 for b in self._by_id.values())

    def _database(self) -> sqlite3.Connection:
        if self._db is None:
            raise sqlite3.OperationalError("the registry could not be opened at start "
                                           "(see registry_problems in stats)")
        return self._db

    def _write(self, binary: BinaryInfo) -> None:
        self._database().execute(
            f"INSERT INTO binaries ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT(binary_id) DO UPDATE SET version=excluded.version,"
            " sha256=excluded.sha256, size=excluded.size, kind=excluded.kind,"
            " exports=excluded.exports, updated_at=excluded.updated_at,"
            " last_error=excluded.last_error, path=excluded.path",
            (
                binary.binary_id,
                binary.tenant,
                binary.name,
                binary.path,
                binary.version,
                binary.sha256,
                binary.size,
                binary.kind,
                msgspec.json.encode(binary.exports).decode(),
                binary.created_at,
                binary.updated_at,
                binary.last_error,
            ),
        )


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(_SCHEMA)
    except BaseException:
        db.close()
        raise
    return db


def _read_rows(path: Path, blobs: BlobStore) -> tuple[list[tuple[int, tuple[Any, ...]]],
                                                      str | None, bool]:
    """The registry's rows as stored (text as bytes: a bad one must not stop the others),
    what is wrong with the file as a whole if anything, and whether it is corrupt (to be
    moved aside) rather than unreadable for now (locked, I/O error: left alone)."""
    if not path.exists():
        present = blobs.count()
        if not present:
            return [], None, False  # a first start
        return [], (f"{path} is missing while {present} module blobs exist in {blobs.root}: "
                    "the binaries they belonged to could not be restored and their blobs are "
                    "kept"), True
    rows: list[tuple[int, tuple[Any, ...]]] = []
    db = None
    try:
        db = sqlite3.connect(path, isolation_level=None)
        db.text_factory = bytes
        tables = {name for (name,) in db.execute(
            "SELECT name FROM sqlite_master WHERE type='table'")}
        if b"binaries" not in tables:
            present = blobs.count()
            if not present:
                return [], None, False  # a new (or never used) registry
            return [], (f"{path} holds no binaries table (it is empty, or not a wasm-core "
                        f"registry) while {present} module blobs exist in {blobs.root}: the "
                        "binaries they belonged to could not be restored and their blobs are "
                        "kept"), True
        for row in db.execute(f"SELECT rowid, {_COLUMNS} FROM binaries"):
            rows.append((row[0], tuple(row[1:])))
        return rows, None, False
    except sqlite3.DatabaseError as exc:
        # The base class is SQLite's word for a damaged file ("not a database", "malformed");
        # its subclasses (locked, disk I/O error, cannot open) may pass: keep the file.
        corrupt = type(exc) is sqlite3.DatabaseError
        return rows, (f"{path} cannot be read ({exc}): the {len(rows)} binaries read before "
                      "the failure are served, the rest are not, and every module blob is "
                      "kept"), corrupt
    finally:
        if db is not None:
            db.close()


def _move_aside(path: Path) -> Path | None:
    """Keep an unreadable registry for recovery, out of the way of a new one (a missing one
    leaves a note in its place): while it is there, blobs are kept."""
    target = path.with_name(f"{path.name}{_BROKEN}{time.strftime('%Y%m%dT%H%M%S')}")
    try:
        if not path.exists():
            target.write_text(f"{path.name} was missing at {time.ctime()} while module blobs "
                              "existed; they are kept while this file is here.\n")
        for suffix in ("", "-wal", "-shm"):
            source = Path(f"{path}{suffix}")
            if source.exists():
                source.rename(f"{target}{suffix}")
    except OSError as exc:
        log.error("cannot move the unreadable registry %s aside: %s", path, exc)
        return None
    return target


def _binary_from_row(row: tuple[Any, ...]) -> BinaryInfo:
    """A stored row as a BinaryInfo; ValueError saying what is wrong with it."""
    (binary_id, tenant, name, path, version, sha256, size, kind, exports, created_at,
     updated_at, last_error) = row
    sha = _text(sha256, "sha256")
    if not _SHA256.match(sha):
        raise ValueError(f"sha256 {sha[:80]!r} is not a lower-case hex SHA-256")
    if _text(kind, "kind") not in ("core", "wasi", "extism", "component"):
        raise ValueError(f"kind {kind!r} is none of core, wasi, extism, component")
    for value, column, low in ((version, "version", 1), (size, "size", 0)):
        if type(value) is not int or value < low:
            raise ValueError(f"{column} {value!r} is not an integer >= {low}")
    for value, column in ((created_at, "created_at"), (updated_at, "updated_at")):
        if type(value) not in (int, float):
            raise ValueError(f"{column} {value!r} is not a number")
    try:
        names = msgspec.json.decode(_text(exports, "exports"), type=list[str])
    except msgspec.DecodeError as exc:
        raise ValueError(f"exports is not a JSON list of names ({exc})") from None
    return BinaryInfo(
        binary_id=_text(binary_id, "binary_id"),
        tenant=_text(tenant, "tenant"),
        name=_text(name, "name"),
        path=None if path is None else _text(path, "path"),
        version=version,
        sha256=sha,
        size=size,
        kind=_text(kind, "kind"),
        exports=names,
        created_at=float(created_at),
        updated_at=float(updated_at),
        last_error=None if last_error is None else _text(last_error, "last_error"),
    )


def _text(value: Any, column: str) -> str:
    if not isinstance(value, bytes):
        raise ValueError(f"{column} {value!r} is not text")
    try:
        return value.decode()
    except UnicodeDecodeError:
        raise ValueError(f"{column} is not UTF-8") from None


def _row_problem(rowid: int, row: tuple[Any, ...], why: str) -> str:
    binary_id = row[0].decode(errors="replace") if isinstance(row[0], bytes) else repr(row[0])
    return (f"registry row {rowid} (binary {binary_id}) skipped: {why}. It stays in the file "
            "and its blob is kept; fix or delete the row, then restart")
