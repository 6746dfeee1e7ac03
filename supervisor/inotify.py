"""inotify(7) through inotify_simple: the entries of a few directories, read from one fd that a
thread can block on (poll) without waking while nothing happens."""

from __future__ import annotations

import os

from inotify_simple import INotify
from inotify_simple import flags as f

# A file's content or metadata changed, or a file arrived (created, or renamed over the old
# one, as editors save); a deletion is no change to load.
CHANGED = f.MODIFY | f.ATTRIB | f.CLOSE_WRITE | f.MOVED_TO | f.CREATE
# The watched directory itself went away: its watch is over.
GONE = f.DELETE_SELF | f.MOVE_SELF | f.IGNORED


class Inotify:
    """One inotify instance watching directories' entries (not recursively)."""

    def __init__(self) -> None:
        self._inotify = INotify(nonblocking=True)
        self._dirs: dict[int, str] = {}

    def fileno(self) -> int:
        return self._inotify.fileno()

    def add_dir(self, path: str) -> None:
        """Raises OSError when it cannot be watched (gone, not a directory, no watch left)."""
        wd = self._inotify.add_watch(path, CHANGED | f.DELETE_SELF | f.MOVE_SELF | f.ONLYDIR)
        self._dirs[wd] = path

    def read(self) -> tuple[set[str], bool, bool]:
        """What arrived since the last read, without blocking: the paths that changed, whether
        events were lost (the queue overflowed) and whether a watched directory went away."""
        changed: set[str] = set()
        overflowed = gone = False
        while events := self._inotify.read(timeout=0):
            for event in events:
                if event.mask & f.Q_OVERFLOW:
                    overflowed = True
                elif event.mask & GONE:
                    gone = True
                elif event.name and event.mask & CHANGED and event.wd in self._dirs:
                    changed.add(os.path.join(self._dirs[event.wd], event.name))
        return changed, overflowed, gone

    def close(self) -> None:
        if not self._inotify.closed:
            self._inotify.close()

    def __enter__(self) -> Inotify:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
