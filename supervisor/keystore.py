"""The key store: the server's CURVE key pair and each tenant's public key, under
`<data_dir>/keys`, private to the service's user (directories 0700, files 0600).

    keys/server.json                {"public_key", "secret_key"}: the server's pair, made on
                                    first need (server start or `wasm-core tenant add`)
    keys/tenants.json               {"<tenant>": {"public_key", "admin", "created_at"}}: the
                                    keys the server accepts, and which are admins
    keys/credentials/<tenant>.json  the file `wasm-core tenant add` hands out (its secret key
                                    is kept only there: delete it once delivered if you like)
    keys/.lock                      serializes changes (flock)

`wasm-core tenant add|remove` change the store while the server runs: `tenants.json` is
replaced atomically (written, fsynced, renamed over), so every change gives it a new inode.
The server compares (inode, ctime, size) of the file before each handshake and every
`CHECK_S` on its loop, and re-reads it when they differ: a new key works at once, a removed
one stops working without a restart. A `tenants.json` that cannot be read (hand-edited
badly, wrong permissions) fails closed: no key is accepted until it is fixed, and the log
says why.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import zmq

from wasmcore.protocol.credentials import Credentials, is_key, write_credentials

log = logging.getLogger("wasmcore.supervisor.keys")

# How often the loop looks at tenants.json for removed keys (one stat).
CHECK_S = 0.25
TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class KeyStoreError(RuntimeError):
    """The key store cannot be used as it is; the message says what to fix."""


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a key proves: its tenant, and whether it may see every tenant (stats)."""

    tenant: str
    admin: bool


class TenantKey(msgspec.Struct, kw_only=True):
    public_key: str
    admin: bool = False
    created_at: float = 0.0


class ServerKeys(msgspec.Struct, kw_only=True):
    public_key: str
    secret_key: str


_tenants_decoder = msgspec.json.Decoder(dict[str, TenantKey])


class KeyStore:
    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(data_dir) / "keys"
        self.tenants_file = self.dir / "tenants.json"
        self.server_file = self.dir / "server.json"
        self.credentials_dir = self.dir / "credentials"
        self._lock = threading.Lock()
        self._seen: tuple[int, int, int] | None = None  # (inode, mtime_ns, size) last read
        self._by_key: dict[str, Identity] = {}
        self._loaded = False

    # ------------------------------------------------------------------ the server's pair

    def server_keys(self, create: bool = True) -> ServerKeys:
        """The server's key pair, made (once, race-free) when missing and `create`."""
        self._ensure_dir(self.dir)
        try:
            fd = os.open(self.server_file, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            if not create:
                raise KeyStoreError(f"no server key pair in {self.server_file}") from None
            public, secret = zmq.curve_keypair()
            keys = ServerKeys(public_key=public.decode(), secret_key=secret.decode())
            try:
                fd = os.open(self.server_file,
                             os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:  # made meanwhile by another process: use that one
                return self.server_keys(create=False)
            with os.fdopen(fd, "wb") as handle:
                handle.write(msgspec.json.encode(keys) + b"\n")
                handle.flush()
                os.fsync(handle.fileno())
            log.info("made the server's CURVE key pair in %s", self.server_file)
            return keys
        with os.fdopen(fd, "rb") as handle:
            _check_private(self.server_file, os.fstat(handle.fileno()))
            data = handle.read()
        try:
            keys = msgspec.json.decode(data, type=ServerKeys)
        except msgspec.DecodeError as exc:
            raise KeyStoreError(f"{self.server_file} is not a server key pair: {exc}") from None
        if not (is_key(keys.public_key) and is_key(keys.secret_key)) or zmq.curve_public(
                keys.secret_key.encode()).decode() != keys.public_key:
            raise KeyStoreError(f"{self.server_file} does not hold a matching CURVE key pair")
        return keys

    # ------------------------------------------------------------------ changes (the CLI)

    def add(self, tenant: str, admin: bool = False, rotate: bool = False,
            endpoint: str = "") -> tuple[Credentials, Path]:
        """Make a key pair for `tenant`, accept its public key, and write its credentials
        file. An existing tenant keeps its key unless `rotate`: then the new pair replaces
        the old one, which stops working at once."""
        if not TENANT_NAME.match(tenant):
            raise KeyStoreError(f"tenant name {tenant!r}: use 1-64 letters, digits, '_', '.' "
                                "or '-', starting with a letter or digit")
        server = self.server_keys()
        with self._changing() as tenants:
            if tenant in tenants and not rotate:
                raise KeyStoreError(f"tenant {tenant!r} already has a key; pass --rotate to "
                                    "replace it (its current credentials stop working)")
            public, secret = zmq.curve_keypair()
            tenants[tenant] = TenantKey(public_key=public.decode(), admin=admin,
                                        created_at=time.time())
            credentials = Credentials(tenant=tenant, public_key=public.decode(),
                                      secret_key=secret.decode(),
                                      server_public_key=server.public_key, endpoint=endpoint,
                                      admin=admin)
            self._ensure_dir(self.credentials_dir)
            path = self.credentials_dir / f"{tenant}.json"
            write_credentials(path, credentials)
        return credentials, path

    def remove(self, tenant: str) -> bool:
        """Stop accepting `tenant`'s key (and delete its credentials file); False if it had
        none."""
        with self._changing() as tenants:
            if tenants.pop(tenant, None) is None:
                return False
        (self.credentials_dir / f"{tenant}.json").unlink(missing_ok=True)
        return True

    def tenants(self) -> dict[str, TenantKey]:
        """Every tenant with a key, as the file says now."""
        if not self.tenants_file.exists():
            return {}
        return self._read_tenants()

    # ------------------------------------------------------------------ lookups (the server)

    def identity(self, public_key: str) -> Identity | None:
        """Who `public_key` (Z85) proves, or None if the store does not accept it. Looks at
        the file first only if it was never read; `refresh` keeps it current."""
        if not self._loaded:
            self.refresh()
        return self._by_key.get(public_key)

    def refresh(self) -> bool:
        """Re-read tenants.json if it changed since it was last read (one stat otherwise).
        True if it was re-read. Safe from any thread."""
        with self._lock:
            # ctime, not mtime: a chmod that fixes the file's permissions counts as a change.
            problem = ""
            try:
                info = os.stat(self.tenants_file)
                seen: tuple[int, int, int] | None = (info.st_ino, info.st_ctime_ns,
                                                     info.st_size)
            except FileNotFoundError:
                seen = None
            except OSError as exc:
                seen, problem = (-1, -1, -1), f"cannot stat {self.tenants_file}: {exc}"
            if self._loaded and seen == self._seen:
                return False
            self._seen = seen
            self._loaded = True
            if problem:
                self._fail_closed(problem)
                return True
            if seen is None:
                self._by_key = {}
                return True
            try:
                tenants = self._read_tenants()
            except KeyStoreError as exc:
                self._fail_closed(str(exc))
                return True
            self._by_key = {record.public_key: Identity(name, record.admin)
                            for name, record in tenants.items()}
            log.info("tenant keys: %d accepted (%s)", len(self._by_key),
                     ", ".join(sorted(tenants)) or "none")
            return True

    @property
    def count(self) -> int:
        return len(self._by_key)

    # ------------------------------------------------------------------ internals

    def _fail_closed(self, why: str) -> None:
        self._by_key = {}
        log.error("tenant keys: %s; no key is accepted until this is fixed", why)

    def _read_tenants(self) -> dict[str, TenantKey]:
        try:
            fd = os.open(self.tenants_file, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as exc:
            raise KeyStoreError(f"cannot read {self.tenants_file}: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as handle:
            _check_private(self.tenants_file, os.fstat(handle.fileno()))
            data = handle.read()
        try:
            tenants = _tenants_decoder.decode(data)
        except msgspec.DecodeError as exc:
            raise KeyStoreError(f"{self.tenants_file} is not valid: {exc}") from None
        seen: set[str] = set()
        for name, record in tenants.items():
            if not TENANT_NAME.match(name) or not is_key(record.public_key):
                raise KeyStoreError(f"{self.tenants_file}: tenant {name!r} has a bad name or "
                                    "public key")
            if record.public_key in seen:
                raise KeyStoreError(f"{self.tenants_file}: a public key is listed twice")
            seen.add(record.public_key)
        return tenants

    @contextlib.contextmanager
    def _changing(self) -> Iterator[dict[str, TenantKey]]:
        """tenants.json, read under the store's lock, written back atomically afterwards."""
        self._ensure_dir(self.dir)
        lock_fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            tenants = self.tenants()
            yield tenants
            data = msgspec.json.format(msgspec.json.encode(tenants)) + b"\n"
            temp = self.dir / f".tenants.{os.getpid()}.tmp"
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, self.tenants_file)
            dir_fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        finally:
            os.close(lock_fd)

    @staticmethod
    def _ensure_dir(directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        _check_private(directory, directory.lstat())


def _check_private(path: Path, info: os.stat_result) -> None:
    """Keys are the service user's alone: owned by it, no permission bits for anyone else."""
    mode = stat.S_IMODE(info.st_mode)
    if info.st_uid != os.geteuid() or mode & 0o077 or stat.S_ISLNK(info.st_mode):
        raise KeyStoreError(
            f"{path} must belong to this user (uid {os.geteuid()}) with no access for group "
            f"or others; it has uid {info.st_uid}, mode {mode:04o}: fix it with "
            f"`chown` and `chmod {'700' if stat.S_ISDIR(info.st_mode) else '600'}`")
