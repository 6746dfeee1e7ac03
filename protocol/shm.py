"""Shared-memory payload segments: large inputs and outputs as files in /dev/shm.

Above a size threshold a client on the same host writes its input to a segment and sends only
its name and size; the worker reads it directly, and writes a large output to a new segment
that the client reads and removes. The sockets carry descriptors, never the bytes.

Names are `wc-<owner pid>-<128 random bits in hex>`: unguessable, so knowing a name is the
capability to use it (a tenant cannot name another tenant's segment), and they carry the pid
whose death makes the segment garbage. The supervisor sweeps segments of dead owners, so a
crashed client leaves nothing behind; a killed worker never owns a segment.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import re
import secrets
import stat
from pathlib import Path

import msgspec

NAME = re.compile(r"^wc-(\d+)-([0-9a-f]{32})$")


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
    """A new segment holding `data`, readable and writable by this user only."""
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
    """An output segment written while the plugin runs (a sandbox output sink).

    A new segment is written under the *writer's* pid and renamed to the reader's only when
    complete: if the worker dies half way, the segment names a dead process and is swept.
    When the reader lends one of its own segments (`reuse`), the output overwrites it in
    place instead: its tmpfs pages already exist, so no page is allocated, zeroed or freed,
    and whatever happens the segment stays the reader's to remove.
    """

    def __init__(self, directory: str | Path, reader_pid: int, threshold: int,
                 reuse: str = "") -> None:
        self.directory = directory  # joined only when a segment is opened (hot path)
        self.reader_pid = reader_pid
        self.threshold = threshold
        self.size = 0
        self._fd = -1
        self._name = ""
        match = NAME.match(reuse) if reuse else None
        # Only a segment named for the reader: the name is the capability, the pid a check.
        self._reuse = reuse if match is not None and int(match.group(1)) == reader_pid else ""
        self._reused = False

    def _ensure_open(self) -> int:
        if self._fd >= 0:
            return self._fd
        if self._reuse:
            try:
                fd = os.open(os.path.join(self.directory, self._reuse),
                             os.O_WRONLY | os.O_NOFOLLOW)
            except OSError:
                fd = -1  # removed meanwhile: fall back to a new segment
            if fd >= 0:
                if stat.S_ISREG(os.fstat(fd).st_mode):
                    self._fd, self._name, self._reused = fd, self._reuse, True
                    return fd
                os.close(fd)
        self._name = new_name(os.getpid())
        self._fd = _create(os.path.join(self.directory, self._name))
        return self._fd

    def write(self, address: int, length: int) -> None:
        if length:
            _write_all(self._ensure_open(), (ctypes.c_char * length).from_address(address))
            self.size += length

    def write_bytes(self, data: bytes) -> None:
        if data:
            _write_all(self._ensure_open(), data)
            self.size += len(data)

    def finish(self) -> ShmRef | None:
        """Hand the segment to its reader; None if nothing was written."""
        if self._fd < 0:
            return None
        fd, self._fd = self._fd, -1
        try:
            if self._reused:
                os.ftruncate(fd, self.size)  # drop what is left of its previous content
                return ShmRef(name=self._name, size=self.size)
        finally:
            os.close(fd)
        final = new_name(self.reader_pid)
        os.rename(os.path.join(self.directory, self._name),
                  os.path.join(self.directory, final))
        return ShmRef(name=final, size=self.size)

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            if not self._reused:
                remove(self.directory, self._name)


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
        fd = os.open(_path(directory, ref.name), os.O_RDONLY | os.O_NOFOLLOW)
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
    """Remove segments whose owner process is gone; returns how many."""
    removed = 0
    try:
        entries = os.scandir(directory)
    except FileNotFoundError:
        return 0
    with entries:
        for entry in entries:
            match = NAME.match(entry.name)
            if match is None or _alive(int(match.group(1))):
                continue
            try:
                os.unlink(entry.path)
                removed += 1
            except FileNotFoundError:
                pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def boot_id() -> str:
    """Identifies this host and boot: a client and server that match share /dev/shm."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""
