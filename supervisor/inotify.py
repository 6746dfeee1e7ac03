"""inotify(7) over ctypes: the entries of a few directories, read from one fd that a thread can
block on (poll) without waking while nothing happens."""

from __future__ import annotations

import ctypes
import os
import struct

IN_MODIFY = 0x002
IN_ATTRIB = 0x004
IN_CLOSE_WRITE = 0x008
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC

# A file's content or metadata changed, or a file arrived (created, or renamed over the old
# one, as editors save); a deletion is no change to load.
CHANGED = IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE
# The watched directory itself went away: its watch is over.
GONE = IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED

_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of NUL-padded name
_libc: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


class Inotify:
    """One inotify instance watching directories' entries (not recursively)."""

    def __init__(self) -> None:
        fd = _lib().inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self._fd = fd
        self._dirs: dict[int, str] = {}

    def fileno(self) -> int:
        return self._fd

    def add_dir(self, path: str) -> None:
        wd = _lib().inotify_add_watch(self._fd, os.fsencode(path),
                                      CHANGED | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR)
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_add_watch {path}: {os.strerror(err)}")
        self._dirs[wd] = path

    def read(self) -> tuple[set[str], bool, bool]:
        """What arrived since the last read, without blocking: the paths that changed, whether
        events were lost (the queue overflowed) and whether a watched directory went away."""
        changed: set[str] = set()
        overflowed = gone = False
        while True:
            try:
                data = os.read(self._fd, 64 * 1024)
            except BlockingIOError:
                return changed, overflowed, gone
            offset = 0
            while offset + _EVENT.size <= len(data):
                wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
                offset += _EVENT.size
                name = data[offset:offset + length].rstrip(b"\0")
                offset += length
                if mask & IN_Q_OVERFLOW:
                    overflowed = True
                elif mask & GONE:
                    gone = True
                elif name and mask & CHANGED and wd in self._dirs:
                    changed.add(os.path.join(self._dirs[wd], os.fsdecode(name)))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Inotify:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
