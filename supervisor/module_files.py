"""Module files the supervisor reads itself: which paths it may open, and reading one without
ever blocking, following a link or taking more than the payload limit.

A client normally reads its module file itself and sends the bytes, with the path as the
binary's identity. The server opens a path only for a load that sends no bytes and for hot
reloads, and only when `PathPolicy` allows it: the path lies under a load root the operator
configured, or every peer is known to be the service's own user (an ipc socket in a directory
only that user can enter). A path outside is refused before anything is opened, with the same
answer whether it exists or not.

`read_module` blocks on the disk: it runs in an I/O thread (offloop.py), never on the loop.
Content the server read was not sent by the tenant, so errors about it never quote it
(`without_content`).
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Sequence

from wasmcore.protocol.errors import (
    BadRequest,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    WasmCoreError,
    error_from_code,
)

_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
_CHUNK = 1 << 20


class PathPolicy:
    """Which module files the server may open (and so watch)."""

    def __init__(self, roots: Sequence[str], any_path: bool) -> None:
        # Each root as configured and as resolved, so a client that resolved its symlinks
        # (the Python client does) and one that did not both match. Never a file's path:
        # only the operator's directories are resolved.
        forms: set[str] = set()
        for root in roots:
            forms.add(os.path.abspath(root))
            forms.add(os.path.realpath(root))
        self.roots = sorted(forms)
        self.any_path = any_path

    def with_roots(self, roots: Sequence[str]) -> PathPolicy:
        """This policy with more roots (a tenant's own load_roots)."""
        return PathPolicy([*self.roots, *roots], self.any_path) if roots else self

    def root_of(self, path: str) -> str | None:
        """The root `path` lies under, judged on the text alone (nothing is opened)."""
        for root in self.roots:
            prefix = root.rstrip("/") + "/"
            if path.startswith(prefix) and len(path) > len(prefix):
                return root
        return None

    def may_read(self, path: str) -> bool:
        return self.any_path or self.root_of(path) is not None

    def refusal(self, path: str) -> Forbidden:
        # One answer for every path outside: whether it exists is not told.
        where = (f"only files under server.load_roots ({', '.join(self.roots)})" if self.roots
                 else "no files for clients (server.load_roots is empty)")
        return Forbidden(
            f"the server does not open {path}: it reads {where}. Send the module's bytes with "
            "the path as its name instead (wasm-client load --path and Client.load do)",
            {"path": path})

    def describe(self) -> str:
        if self.any_path:
            return "any path a client names (every peer is this service's user)"
        if self.roots:
            return "files under " + ", ".join(self.roots)
        return "no path (clients send bytes)"


def read_module(path: str, policy: PathPolicy, limit: int) -> bytes:
    """The bytes of the module file at `path` (absolute), if `policy` allows opening it.
    Refuses at once what is not a regular file (FIFO, device, directory, symlink) and what
    is larger than `limit`, before reading anything. Raises WasmCoreError."""
    root = policy.root_of(path)
    if root is not None:
        handle = _open_beneath(path, root)
    elif policy.any_path:
        handle = _open_path(path, path)
    else:
        raise policy.refusal(path)
    try:
        info = os.fstat(handle)
        _check_regular(path, info)
        if info.st_size > limit:
            raise _too_large(path, info.st_size, limit)
        # O_PATH opened nothing (a device's open can have side effects); now that it is known
        # to be a regular file, open that very inode for reading.
        try:
            reader = os.open(f"/proc/self/fd/{handle}", _READ_FLAGS)
        except OSError as exc:
            raise _os_error(path, exc) from None
    finally:
        os.close(handle)
    try:
        return _read_at_most(path, reader, limit)
    finally:
        os.close(reader)


def without_content(error: WasmCoreError, path: str) -> WasmCoreError:
    """`error` (from compiling a file the server read) with nothing of the file's content:
    the compiler quotes the offending line. Only where it is stays."""
    text = error.message + " " + str(error.details.get("reason", ""))
    where = ""
    if match := re.search(r"<anon>:(\d+):(\d+)", text):
        where = f" at line {match.group(1)}, column {match.group(2)}"
    elif match := re.search(r"at offset (0x[0-9a-fA-F]+)", text):
        where = f" at byte offset {match.group(1)}"
    return error_from_code(
        error.code,
        f"{path} was refused ({error.code}{where}); the server does not quote files it reads. "
        "To see the compiler's message, send the file's bytes (wasm-client load --path does)",
        {"path": path})


def _open_path(path: str, shown: str, dir_fd: int | None = None) -> int:
    try:
        return os.open(path, _PATH_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        raise _os_error(shown, exc) from None


def _open_beneath(path: str, root: str) -> int:
    """Open `path` one component at a time from `root`, following no symlink on the way:
    what is opened is under the root, whatever was renamed meanwhile."""
    parts = path[len(root.rstrip("/")) + 1:].split("/")
    parent = _open_path(root, path)
    try:
        for part in parts[:-1]:
            child = _open_path(part, path, dir_fd=parent)
            info = os.fstat(child)
            if not stat.S_ISDIR(info.st_mode):
                os.close(child)
                if stat.S_ISLNK(info.st_mode):
                    raise BadRequest(f"{path} goes through a symbolic link ({part}); load roots "
                                     "are read without following links: name the real path",
                                     {"path": path})
                raise NotFound(f"no such file: {path}", {"path": path})
            os.close(parent)
            parent = child
        return _open_path(parts[-1], path, dir_fd=parent)
    finally:
        os.close(parent)


def _check_regular(path: str, info: os.stat_result) -> None:
    mode = info.st_mode
    if stat.S_ISREG(mode):
        return
    kinds = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"),
             (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    kind = next((name for test, name in kinds if test(mode)), "not a regular file")
    raise BadRequest(f"{path} is {kind}: the server loads only regular .wasm or .wat files "
                     "(symbolic links are not followed; name the file itself)",
                     {"path": path})


def _read_at_most(path: str, fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while True:
        try:
            chunk = os.read(fd, min(_CHUNK, limit + 1 - total))
        except OSError as exc:
            raise _os_error(path, exc) from None
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:  # it grew since fstat
            raise _too_large(path, total, limit)


def _too_large(path: str, size: int, limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"{path} is {size} bytes or more; the limit is {limit} bytes "
                           "(server.max_payload_bytes)", {"size": size, "limit": limit})


def _os_error(path: str, exc: OSError) -> WasmCoreError:
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return NotFound(f"no such file: {path}", {"path": path})
    if exc.errno == errno.ELOOP:
        return BadRequest(f"{path} is a symbolic link: name the file itself", {"path": path})
    return BadRequest(f"the server cannot read {path} ({exc.strerror}); send the module's "
                      "bytes instead", {"path": path})
