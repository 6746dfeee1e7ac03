"""Blocking work kept off the loop thread: reading module files, writing and deleting blobs.

`run(work, then)` runs `work` on a small thread pool; its result (or exception) is handed back
to the loop, which calls `then` from `drain()`, so continuations touch the components' state
on the loop thread only, like everything else. A thread wakes the loop through a socketpair
the loop polls (`fileno()`), one byte per burst of results.
"""

from __future__ import annotations

import logging
import queue
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

log = logging.getLogger("wasmcore.supervisor")

T = TypeVar("T")
Then = Callable[[Any, BaseException | None], None]

# Two: a large read or blob write does not hold up a small one behind it.
_THREADS = 2


class OffLoop:
    def __init__(self, threads: int = _THREADS) -> None:
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="wasm-core-io")
        self._done: queue.SimpleQueue[tuple[Then, Any, BaseException | None]] = (
            queue.SimpleQueue())
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    def fileno(self) -> int:
        return self._wake_r.fileno()

    def run(self, work: Callable[[], T], then: Callable[[T | None, BaseException | None], None]
            ) -> None:
        """Run `work` off the loop; `then(result, None)` or `then(None, error)` is called on
        the loop thread (from `drain`) when it ends."""

        def task() -> None:
            try:
                outcome: tuple[Then, Any, BaseException | None] = (then, work(), None)
            except BaseException as exc:  # handed to `then`, which decides what it means
                outcome = (then, None, exc)
            self._done.put(outcome)
            try:
                self._wake_w.send(b"\0")
            except (BlockingIOError, OSError):
                pass  # a wake-up is already pending (or the loop is gone)

        self._pool.submit(task)

    def drain(self) -> None:
        """Call the continuations of the work that ended (on the loop thread)."""
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                then, result, error = self._done.get_nowait()
            except queue.Empty:
                return
            try:
                then(result, error)
            except Exception:
                log.exception("internal error continuing work done off the loop")

    def close(self) -> None:
        """Wait for the work already running (reads and writes are bounded), drop the work
        not started, and call the continuations of what ended (on the loop thread)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.drain()
        self._wake_r.close()
        self._wake_w.close()
