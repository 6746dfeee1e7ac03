"""Signals and shutdown: SIGTERM or a first SIGINT drains (in-flight requests finish within
the grace period, queued ones are answered SHUTTING_DOWN), a second SIGINT stops at once.
"""

from __future__ import annotations

import collections
import logging
import signal
import socket
import time
from typing import TYPE_CHECKING

from wasmcore.protocol.errors import ShuttingDown, WasmCoreError
from wasmcore.supervisor.config import Config
from wasmcore.supervisor.jobs import PendingJob
from wasmcore.supervisor.workers import RestartCause, WorkerHandle, WorkerState

log = logging.getLogger("wasmcore.supervisor")

EXIT_FORCED = 130


class ShutdownMixin:
    config: Config
    by_id: dict[str, WorkerHandle]
    queue: collections.deque[PendingJob]
    spawn_at: dict[int, float]
    draining: bool
    drain_deadline: float
    exit_code: int | None
    _signal_r: socket.socket

    if TYPE_CHECKING:  # provided by the other parts of Supervisor
        def reload_config(self, why: str) -> None: ...
        def _fail(self, job: PendingJob, error: WasmCoreError) -> None: ...
        def _reap(self, handle: WorkerHandle) -> None: ...
        def _retire(self, handle: WorkerHandle, cause: RestartCause,
                    replace: bool = True) -> None: ...

    def _handle_signals(self) -> None:
        try:
            data = self._signal_r.recv(512)
        except BlockingIOError:
            return
        for signum in data:
            if signum in (signal.SIGTERM, signal.SIGINT):
                if self.draining and signum == signal.SIGINT:
                    log.warning("second SIGINT: stopping at once")
                    self._stop_now(EXIT_FORCED, ShuttingDown("the service was stopped"))
                    return
                if not self.draining:
                    self._begin_drain(signal.Signals(signum).name)
            elif signum == signal.SIGHUP:
                self.reload_config("SIGHUP")
            elif signum == signal.SIGCHLD:
                for handle in list(self.by_id.values()):
                    self._reap(handle)

    def _begin_drain(self, why: str) -> None:
        log.info("%s: draining (finishing %d in-flight requests, answering %d queued)",
                 why, sum(len(h.jobs) for h in self.by_id.values()), len(self.queue))
        self.draining = True
        self.drain_deadline = time.monotonic() + self.config.pool.shutdown_grace_ms / 1000
        self.spawn_at.clear()
        while self.queue:
            self._fail(self.queue.popleft(), ShuttingDown(
                "the service is shutting down; this request was not started"))

    def _drain_step(self, now: float) -> None:
        busy = [h for h in self.by_id.values() if h.jobs]
        if busy and now < self.drain_deadline:
            return
        for handle in busy:
            while handle.jobs:
                self._fail(handle.jobs.popleft(),
                           ShuttingDown("the shutdown grace period ended before this finished"))
        for handle in list(self.by_id.values()):
            if handle.state is not WorkerState.RETIRING:
                self._retire(handle, RestartCause.RECYCLE, replace=False)
        if not self.by_id:
            self.exit_code = 0
        elif now > self.drain_deadline + 3:
            for handle in self.by_id.values():
                handle.kill(RestartCause.RECYCLE)
            self.exit_code = 0

    def _stop_now(self, code: int, error: WasmCoreError) -> None:
        self.draining = True
        self.spawn_at.clear()
        while self.queue:
            self._fail(self.queue.popleft(), error)
        for handle in list(self.by_id.values()):
            while handle.jobs:
                self._fail(handle.jobs.popleft(), error)
            handle.kill(RestartCause.RECYCLE)
        self.exit_code = code
