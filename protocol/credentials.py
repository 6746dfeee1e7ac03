"""Credentials: everything a client needs to prove its tenant to a wasm-core server, in one
file. `wasm-core tenant add NAME` writes it; clients read it (`wasm-client --credentials
FILE`, `$WASM_CORE_CREDENTIALS`, `Client(credentials=...)`).

The file is a JSON object; keys are CURVE keys in Z85 (40 characters):

    {"tenant": "alice", "public_key": "...", "secret_key": "...",
     "server_public_key": "...", "endpoint": "tcp://host:5555", "admin": false}

`endpoint` may be empty (the client then uses its usual endpoint); `admin` only says what the
server was told when the key was made. The file holds a secret key: it must be readable by its
owner only (mode 0600), and a client refuses one that others may read, as ssh does.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import msgspec
import zmq
from zmq.utils import z85

CREDENTIALS_ENV = "WASM_CORE_CREDENTIALS"
KEY_CHARS = 40  # a 32-byte CURVE key in Z85


class CredentialsError(ValueError):
    """A credentials file that cannot be used; the message says which file and what to do."""


class Credentials(msgspec.Struct, kw_only=True):
    tenant: str
    public_key: str
    secret_key: str
    server_public_key: str
    endpoint: str = ""
    admin: bool = False


def is_key(text: Any) -> bool:
    """A CURVE key in Z85: 40 characters that decode to 32 bytes."""
    if not isinstance(text, str) or len(text) != KEY_CHARS:
        return False
    try:
        return len(z85.decode(text.encode("ascii"))) == 32
    except (ValueError, UnicodeEncodeError, KeyError):
        return False


def check(credentials: Credentials, source: str = "credentials") -> Credentials:
    """Raise CredentialsError unless every key is well-formed and the key pair matches."""
    for field in ("public_key", "secret_key", "server_public_key"):
        if not is_key(getattr(credentials, field)):
            raise CredentialsError(f"{source}: `{field}` is not a CURVE key (40 Z85 characters)")
    derived = zmq.curve_public(credentials.secret_key.encode("ascii")).decode("ascii")
    if derived != credentials.public_key:
        raise CredentialsError(f"{source}: `secret_key` does not belong to `public_key`")
    if not credentials.tenant:
        raise CredentialsError(f"{source}: `tenant` is empty")
    return credentials


def read_credentials(path: str | os.PathLike[str]) -> Credentials:
    """The credentials in `path`, checked; refused if other users may read the file."""
    source = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise CredentialsError(f"cannot read credentials {source}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        mode = stat.S_IMODE(os.fstat(handle.fileno()).st_mode)
        if mode & 0o077:
            raise CredentialsError(
                f"credentials {source} may be read by other users (mode {mode:04o}); it holds "
                f"a secret key: `chmod 600 {source}`")
        data = handle.read(64 * 1024)
    try:
        credentials = msgspec.json.decode(data, type=Credentials)
    except msgspec.DecodeError as exc:
        raise CredentialsError(f"credentials {source} are not valid: {exc}") from None
    return check(credentials, source)


def write_credentials(path: Path, credentials: Credentials) -> None:
    """Write `credentials` to `path` (mode 0600, replacing a previous file atomically)."""
    data = msgspec.json.format(msgspec.json.encode(credentials)) + b"\n"
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def resolve_credentials(value: Credentials | str | os.PathLike[str] | None) -> Credentials | None:
    """Credentials given as an object or a file path, else from $WASM_CORE_CREDENTIALS, else
    None (no authentication: an ipc socket private to this user, or plain tcp)."""
    if isinstance(value, Credentials):
        return check(value)
    if value is None or value == "":
        value = os.environ.get(CREDENTIALS_ENV) or None
        if value is None:
            return None
    return read_credentials(value)


def apply_to_client(socket: zmq.Socket[Any], credentials: Credentials) -> None:
    """Make `socket` (before it connects) a CURVE client with these keys."""
    socket.curve_publickey = credentials.public_key.encode("ascii")
    socket.curve_secretkey = credentials.secret_key.encode("ascii")
    socket.curve_serverkey = credentials.server_public_key.encode("ascii")
