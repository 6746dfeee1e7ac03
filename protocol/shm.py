"""Shared-memory payload segments: large inputs and outputs as files in /dev/shm.

Above a size threshold a client on the same host writes its input to a segment and sends only
its name and size; the worker reads it directly. For a large output the client lends a segment
(`Execute.output_shm_into`): the worker writes the output over it and the client reads it. The
sockets carry descriptors, never the bytes.

Only clients create segments, under their own pid, and only they remove them: a worker never
creates one, and never takes an owner pid from a request. A client that lent no usable segment
(a remote one, say) gets its output inline.

Names are `wc-<owner pid>-<128 random bits in hex>`: unguessable, so knowing a name is the
capability to use it (a tenant cannot name another tenant's segment), and they carry the pid
whose death makes the segment garbage. The supervisor sweeps segments of dead owners, so a
crashed client leaves nothing behind.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import re
import secrets
import stat
from pathlib import Path

import msgspec

NAME = re.compile(r"^wc-(\d+)-([0-9a-f]{32})$")
# The kernel's ceiling for pid_max on 64-bit: used when /proc does not say.
_PID_MAX_LIMIT = 4 * 1024 * 1024
# Non-segments named like segments are reported once each, not on every sweep.
_REPORTED_MAX = 1024

log = logging.getLogger("wasmcore.shm")


class ShmRef(msgspec.Struct, array_like=True, frozen=True):
    name: str
    size: int


class SegmentError(ValueError):
    """A segment that is missing, malformed, or not what its descriptor says."""


def new_name(owner_pid: int) -> str:
    return f"wc-{owner_pid}-{secrets.token_hex(16)}"


def _path(directory: str | Path, name: str) -> Path:
    if not NAME.match(name):
        raise SegmentError(f"not a segment name: {name!r}")
    return Path(directory) / name


def write(directory: str | Path, owner_pid: int, data: bytes | memoryview) -> ShmRef:
    """A new segment holding `data`, readable and writable by this user only (and by the
    directory's group when it is setgid: `_create`)."""
    name = new_name(owner_pid)
    fd = _create(_path(directory, name))
    try:
        _write_all(fd, data)
    finally:
        os.close(fd)
    return ShmRef(name=name, size=len(data))


def overwrite(directory: str | Path, ref_name: str, data: bytes | memoryview) -> ShmRef:
    """Reuse an existing segment of ours for new data (no new file, pages stay mapped)."""
    fd = os.open(_path(directory, ref_name), os.O_WRONLY | os.O_NOFOLLOW)
    try:
        _write_all(fd, data)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)
    return ShmRef(name=ref_name, size=len(data))


class SegmentWriter:
    """An output written while the plugin runs (a sandbox output sink), into the segment its
    reader lent (`into`): its tmpfs pages already exist, so no page is allocated, zeroed or
    freed, and whatever happens the segment stays the reader's to remove.

    The segment is opened only once the output reaches the threshold, and used only if it is
    a regular file with no other name (no symlink, no hard link to anything else). If it is
    not, the output is kept in memory instead and goes back inline (`spilled`).
    """

    def __init__(self, directory: str | Path, into: str, threshold: int) -> None:
        self.directory = directory  # joined only when the segment is opened (hot path)
        self.into = into
        self.threshold = threshold
        self.size = 0
        self._fd = -1
        self._refused = False
        self._spilled: list[bytes] = []

    def _segment(self) -> int:
        """The lent segment's descriptor, or -1 when it is not usable."""
        if self._fd < 0 and not self._refused:
            self._fd = _open_lent(self.directory, self.into)
            self._refused = self._fd < 0
        return self._fd

    def write(self, address: int, length: int) -> None:
        if length:
            fd = self._segment()
            if fd >= 0:
                _write_all(fd, (ctypes.c_char * length).from_address(address))
            else:
                self._spilled.append(ctypes.string_at(address, length))
            self.size += length

    def write_bytes(self, data: bytes) -> None:
        if data:
            fd = self._segment()
            if fd >= 0:
                _write_all(fd, data)
            else:
                self._spilled.append(data)
            self.size += len(data)

    def finish(self) -> ShmRef | None:
        """The lent segment, now holding the output; None if it holds none (nothing was
        written, or the output was kept in memory: see `spilled`)."""
        if self._fd < 0:
            return None
        fd, self._fd = self._fd, -1
        try:
            os.ftruncate(fd, self.size)  # drop what is left of its previous content
        finally:
            os.close(fd)
        return ShmRef(name=self.into, size=self.size)

    def spilled(self) -> bytes:
        """The output written while the lent segment was unusable (to send inline)."""
        return b"".join(self._spilled)

    def abort(self) -> None:
        self._spilled = []
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _open_lent(directory: str | Path, name: str) -> int:
    """A write descriptor on a lent segment, or -1 unless it is a regular file of one name:
    never a symlink (O_NOFOLLOW), a FIFO (O_NONBLOCK, so opening it cannot block) or a hard
    link to a file elsewhere, which the output would overwrite."""
    if not NAME.match(name):
        return -1
    try:
        fd = os.open(os.path.join(directory, name),
                     os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return -1
    try:
        info = os.fstat(fd)
        if stat.S_ISREG(info.st_mode) and info.st_nlink == 1:
            return fd
    except OSError:
        pass
    os.close(fd)
    return -1


class SegmentReader:
    """A segment read with `pread`, into guest memory (a sandbox input source) or into
    bytes: one copy and no mapping, so no page faults on the source side, and a writer that
    shrinks the segment mid-read causes an error instead of a SIGBUS in the reader."""

    def __init__(self, directory: str | Path, ref: ShmRef, max_size: int | None = None) -> None:
        _check_size(ref, max_size)
        self.ref = ref
        self._fd = _open_verified(directory, ref)

    def __len__(self) -> int:
        return self.ref.size

    def __enter__(self) -> SegmentReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def copy_to(self, address: int, length: int) -> None:
        """Fill `length` bytes at host `address` from the start of the segment."""
        view = memoryview((ctypes.c_char * length).from_address(address)).cast("B")
        done = 0
        while done < length:
            try:
                got = os.preadv(self._fd, [view[done:]], done)
            except OSError as exc:  # the caller tells the sender its segment failed
                raise SegmentError(f"cannot read segment {self.ref.name}: {exc}") from exc
            if got <= 0:
                raise SegmentError(f"segment {self.ref.name} shrank while being read")
            done += got

    def read_all(self) -> bytes:
        data = os.pread(self._fd, self.ref.size, 0)  # one copy, straight into the bytes
        while len(data) < self.ref.size:  # regular files read short only past 2 GiB
            more = os.pread(self._fd, self.ref.size - len(data), len(data))
            if not more:
                raise SegmentError(f"segment {self.ref.name} shrank while being read")
            data += more
        return data


def _create(path: str | Path) -> int:
    """A new segment file, for this user only; or for its group too when the directory is
    setgid: a service whose workers run as another user shares its directory with them
    through a group (docs/operations.md, Defence in depth). Exactly that mode: no umask may
    take away the group's read (input) or write (an output written over a lent segment)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        if os.stat(os.path.dirname(path)).st_mode & stat.S_ISGID:
            os.fchmod(fd, 0o660)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_all(fd: int, data: bytes | memoryview | ctypes.Array[ctypes.c_char]) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _open_verified(directory: str | Path, ref: ShmRef, *, missing_is_segment_error: bool = True
                   ) -> int:
    """A read-only descriptor on the segment, refused unless it is a regular file of exactly
    `ref.size` bytes. The caller closes it."""
    try:
        # O_NONBLOCK: a FIFO named like a segment fails the check below instead of blocking.
        fd = os.open(_path(directory, ref.name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if missing_is_segment_error and exc.errno in (errno.ENOENT, errno.ELOOP):
            raise SegmentError(f"no segment {ref.name} in {directory}") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size != ref.size:
            raise SegmentError(f"segment {ref.name} is not {ref.size} bytes")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_size(ref: ShmRef, max_size: int | None) -> None:
    if ref.size < 0 or (max_size is not None and ref.size > max_size):
        raise SegmentError(f"segment size {ref.size} out of range")


def read(directory: str | Path, ref: ShmRef, max_size: int | None = None) -> bytes:
    """The segment's bytes; refuses anything but a regular file of exactly `ref.size`."""
    with SegmentReader(directory, ref, max_size) as reader:
        return reader.read_all()


def map_readonly(directory: str | Path, ref: ShmRef) -> mmap.mmap | None:
    """The segment mapped read-only (None when it is empty): no copy. The mapping stays
    valid even if the name is removed; it lives until it is garbage-collected."""
    fd = _open_verified(directory, ref, missing_is_segment_error=False)
    try:
        return mmap.mmap(fd, ref.size, access=mmap.ACCESS_READ) if ref.size else None
    finally:
        os.close(fd)


def remove(directory: str | Path, name: str) -> None:
    try:
        _path(directory, name).unlink(missing_ok=True)
    except SegmentError:
        pass


def sweep(directory: str | Path) -> int:
    """Remove segments whose owner process is gone; returns how many.

    Each entry is judged on its own: only regular files (lstat) whose names parse, with an
    owner pid that is out of range (garbage) or no longer running. Any error is logged and
    that entry skipped: nothing anyone puts in the directory makes this raise.
    """
    highest_pid = pid_max()
    removed = 0
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                removed += _sweep_one(entry, highest_pid)
    except FileNotFoundError:
        pass
    except Exception as exc:  # noqa: BLE001 - a sweep must never take its caller down
        log.warning("cannot sweep %s: %s", directory, exc)
    return removed


def _sweep_one(entry: os.DirEntry[str], highest_pid: int) -> int:
    match = NAME.match(entry.name)
    if match is None:
        return 0  # not a segment's name: not ours to judge
    try:
        # lstat's answer (from the directory entry's type when the filesystem gives it).
        if not entry.is_file(follow_symlinks=False):
            _report_once(entry.path, "named like a segment but not a regular file; left alone")
            return 0
        pid = int(match.group(1))
        # Out of range: no process can own it (0 or a pid past pid_max).
        if 1 <= pid <= highest_pid and _alive(pid):
            return 0
        os.unlink(entry.path)
        return 1
    except FileNotFoundError:
        return 0  # removed meanwhile
    except Exception as exc:  # noqa: BLE001 - one entry never stops the sweep
        _report_once(entry.path, f"not swept: {exc}")
        return 0


_reported: set[str] = set()


def _report_once(path: str, why: str) -> None:
    if path in _reported:
        return
    if len(_reported) >= _REPORTED_MAX:
        _reported.clear()
    _reported.add(path)
    log.warning("shared-memory sweep: %s: %s", path, why)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def pid_max() -> int:
    """The highest pid this host hands out."""
    try:
        return int(Path("/proc/sys/kernel/pid_max").read_text())
    except (OSError, ValueError):
        return _PID_MAX_LIMIT


def boot_id() -> str:
    """Identifies this host and boot: a client and server that match share /dev/shm."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""
