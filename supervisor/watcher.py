"""Watch loaded binaries' files and the config file; tell the supervisor's loop what changed.

watchfiles (inotify underneath) runs in one thread over the *directories* of the watched files,
so editors that write a temp file and rename it over the original are seen like an in-place
write. Changed paths go to the loop over an inproc PAIR socket: the loop stays the only place
that touches the registry and the pool.
"""

from __future__ import annotations

import logging
import os
import threading

import watchfiles
import zmq

log = logging.getLogger("wasmcore.supervisor.watcher")
logging.getLogger("watchfiles").setLevel(logging.WARNING)  # it logs every batch at INFO

# inotify delivers within a millisecond or two; a short debounce still merges the burst of
# events one save makes (truncate + write + close, or write temp + rename).
_DEBOUNCE_MS = 30
_STEP_MS = 10


class FileWatcher:
    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], address: str) -> None:
        self._ctx = ctx
        self._address = address
        self._files: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._restart = threading.Event()
        self._thread: threading.Thread | None = None

    def set_files(self, files: set[str]) -> None:
        """Watch exactly these files (absolute paths) from now on."""
        files = {os.path.abspath(f) for f in files}
        with self._lock:
            if files == self._files:
                return
            old_dirs = {os.path.dirname(f) for f in self._files}
            self._files = files
        if {os.path.dirname(f) for f in files} != old_dirs:
            self._restart.set()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="wasm-core-watch", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._restart.set()
        if self._thread is not None:
            self._thread.join(timeout=6)

    def _run(self) -> None:
        out = self._ctx.socket(zmq.PAIR)
        out.connect(self._address)
        try:
            while not self._stop.is_set():
                self._restart.clear()
                with self._lock:
                    dirs = sorted({os.path.dirname(f) for f in self._files
                                   if os.path.isdir(os.path.dirname(f))})
                if not dirs:
                    self._restart.wait(1.0)
                    continue
                self._watch(dirs, out)
        finally:
            out.close(linger=0)

    def _watch(self, dirs: list[str], out: zmq.Socket[bytes]) -> None:
        stop = _EitherEvent(self._stop, self._restart)
        rescanned = False
        try:
            for changes in watchfiles.watch(*dirs, watch_filter=None, debounce=_DEBOUNCE_MS,
                                            step=_STEP_MS, stop_event=stop, recursive=False,
                                            raise_interrupt=False, rust_timeout=200,
                                            yield_on_timeout=True):
                with self._lock:
                    wanted = self._files
                if not rescanned:
                    # The first yield means inotify is set up. A file written between its
                    # load and this moment raised no event: offer every file once; the loop
                    # compares content hashes, so unchanged files cost a read.
                    rescanned = True
                    changes = {(watchfiles.Change.modified, f) for f in wanted} | changes
                hits = sorted({path for change, path in changes
                               if path in wanted and change != watchfiles.Change.deleted})
                for path in hits:
                    out.send_string(path)
        except (OSError, RuntimeError) as exc:
            # A watched directory vanished or inotify ran out of watches: retry shortly.
            log.warning("file watcher: %s; retrying", exc)
            self._stop.wait(1.0)


class _EitherEvent:
    """What watchfiles' stop_event needs (`is_set`), true when either event is."""

    def __init__(self, a: threading.Event, b: threading.Event) -> None:
        self._a, self._b = a, b

    def is_set(self) -> bool:
        return self._a.is_set() or self._b.is_set()

