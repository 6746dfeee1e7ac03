"""Watch loaded binaries' files and the config file; tell the supervisor's loop what changed.

One thread blocks on inotify (supervisor/inotify.py) over the *directories* of the watched
files, so editors that write a temp file and rename it over the original are seen like an
in-place write. The thread sleeps until something happens in those directories, or until
`set_files`/`stop` wake it through a pipe: an idle service's watcher costs no wake-ups.
Changed paths go to the loop over an inproc PAIR socket: the loop stays the only place that
touches the registry and the pool.
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import threading
import time

import zmq

from wasmcore.supervisor.inotify import Inotify

log = logging.getLogger("wasmcore.supervisor.watcher")

# inotify delivers within a millisecond or two; a short debounce still merges the burst of
# events one save makes (truncate + write + close, or write temp + rename): the burst ends at
# the first quiet gap of _QUIET_MS, or at the latest _DEBOUNCE_MS after its first event.
_DEBOUNCE_MS = 30
_QUIET_MS = 10
# How often to look again for a watched file's directory that does not exist (yet).
_MISSING_DIR_RETRY_S = 1.0
_PR_SET_NAME = 15


class FileWatcher:
    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], address: str) -> None:
        self._ctx = ctx
        self._address = address
        self._files: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._restart = threading.Event()
        self._wake_r, self._wake_w = os.pipe()  # set_files and stop interrupt the wait
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
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
            self._wake()
        if self._thread is None and not self._stop.is_set():
            self._thread = threading.Thread(target=self._run, name="wasm-core-watch", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout=6)
            if self._thread.is_alive():
                return  # leave its pipe open rather than close an fd still in use
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # full (a wake is pending anyway) or already closed by stop

    def _woken(self) -> bool:
        """Drain the wake pipe; True when the thread must stop or re-read its directories."""
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass
        return self._stop.is_set() or self._restart.is_set()

    def _run(self) -> None:
        _name_os_thread(b"wasm-core-watch")  # so per-thread tools (top -H, /proc) can tell it
        out = self._ctx.socket(zmq.PAIR)
        out.connect(self._address)
        try:
            while not self._stop.is_set():
                self._restart.clear()
                with self._lock:
                    wanted = {os.path.dirname(f) for f in self._files}
                dirs = sorted(d for d in wanted if os.path.isdir(d))
                if not dirs:
                    # Nothing to watch: sleep until told otherwise, or look for a missing
                    # directory again now and then.
                    self._wait(_MISSING_DIR_RETRY_S if wanted else None)
                    continue
                self._watch(dirs, missing=len(dirs) < len(wanted), out=out)
        finally:
            out.close(linger=0)

    def _wait(self, timeout_s: float | None) -> None:
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        poller.poll(None if timeout_s is None else int(timeout_s * 1000))
        self._woken()

    def _watch(self, dirs: list[str], missing: bool, out: zmq.Socket[bytes]) -> None:
        """Until stopped, restarted or a watched directory goes away: send every changed
        watched file once per burst of events."""
        try:
            with Inotify() as inotify:
                for d in dirs:
                    inotify.add_dir(d)
                poller = select.poll()
                poller.register(inotify.fileno(), select.POLLIN)
                poller.register(self._wake_r, select.POLLIN)
                # inotify is set up now. A file written between its load and this moment
                # raised no event: offer every file once; the loop compares content hashes,
                # so unchanged files cost a read.
                with self._lock:
                    self._send(self._files, self._files, out)
                retry_ms = int(_MISSING_DIR_RETRY_S * 1000) if missing else None
                while True:
                    ready = poller.poll(retry_ms)
                    if not ready:
                        return  # a missing directory may exist now: look again
                    if any(fd == self._wake_r for fd, _ in ready) and self._woken():
                        return
                    if not any(fd == inotify.fileno() for fd, _ in ready):
                        continue
                    changed, overflowed, gone = self._burst(inotify)
                    with self._lock:
                        wanted = self._files
                    self._send(wanted if overflowed else changed, wanted, out)
                    if gone:
                        return
        except OSError as exc:
            # A watched directory vanished or inotify ran out of watches: retry shortly.
            log.warning("file watcher: %s; retrying", exc)
            self._stop.wait(1.0)

    def _burst(self, inotify: Inotify) -> tuple[set[str], bool, bool]:
        """One save's events: read until a quiet gap, or the debounce's end."""
        changed, overflowed, gone = inotify.read()
        end = time.monotonic() + _DEBOUNCE_MS / 1000
        quiet = select.poll()
        quiet.register(inotify.fileno(), select.POLLIN)
        while not gone:
            left_ms = (end - time.monotonic()) * 1000
            if left_ms <= 0 or not quiet.poll(min(_QUIET_MS, max(1, int(left_ms)))):
                break
            more, lost, gone = inotify.read()
            changed |= more
            overflowed |= lost
        return changed, overflowed, gone

    @staticmethod
    def _send(changed: set[str], wanted: set[str], out: zmq.Socket[bytes]) -> None:
        for path in sorted(changed & wanted):
            out.send_string(path)


def _name_os_thread(name: bytes) -> None:
    try:
        ctypes.CDLL(None).prctl(_PR_SET_NAME, ctypes.c_char_p(name[:15]), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # a name for diagnostics only
