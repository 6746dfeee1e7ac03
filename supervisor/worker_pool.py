"""The worker processes' lifecycle: spawn, retire, reap, restart with backoff and the breaker
that stops a pool that cannot start; and the timers (deadlines, heartbeats, start timeouts,
the RSS watchdog, respawns) that decide when a worker goes.
"""

from __future__ import annotations

import collections
import logging
import os
import random
import signal
import time
from typing import TYPE_CHECKING

import zmq

from wasmcore.protocol import messages as p
from wasmcore.protocol import shm
from wasmcore.protocol.errors import MemoryLimit, ShuttingDown, Timeout, WasmCoreError, WorkerLost
from wasmcore.protocol.settings import EXIT_BOOT_ERROR, SandboxConfig, WorkerSettings
from wasmcore.supervisor.config import Config, MiB
from wasmcore.supervisor.jobs import PendingJob
from wasmcore.supervisor.restart_policy import RestartPolicy
from wasmcore.supervisor.workers import RestartCause, WorkerHandle, WorkerState, spawn_worker

log = logging.getLogger("wasmcore.supervisor")

EXIT_POOL_FAILED = 2
# Payload segments of processes that exited are removed this often.
_SWEEP_S = 1.0


class WorkerPoolMixin:
    config: Config
    back: zmq.Socket
    back_endpoint: str
    pub_endpoint: str
    poller: zmq.Poller
    shm_dir: str | None
    policy: RestartPolicy
    slots: list[WorkerHandle | None]
    by_id: dict[str, WorkerHandle]
    by_pidfd: dict[int, WorkerHandle]
    spawn_at: dict[int, float]
    generation: int
    restarts: collections.Counter[str]
    draining: bool
    exit_code: int | None
    stop_reason: str
    _next_watchdog: float
    _next_sweep: float

    if TYPE_CHECKING:  # provided by the other parts of Supervisor
        def _drain_back(self) -> None: ...
        def _fail(self, job: PendingJob, error: WasmCoreError) -> None: ...
        def _requeue(self, jobs: list[PendingJob], error: WasmCoreError) -> None: ...
        def _drain_step(self, now: float) -> None: ...
        def _stop_now(self, code: int, error: WasmCoreError) -> None: ...

    def _spawn(self, slot: int) -> None:
        self.spawn_at.pop(slot, None)
        self.generation += 1
        pool = self.config.pool
        limits = self.config.limits
        settings = WorkerSettings(
            worker_id="",
            back_endpoint=self.back_endpoint,
            pub_endpoint=self.pub_endpoint,
            parent_pid=os.getpid(),
            sandbox=SandboxConfig(default_limits=limits.to_limits(),
                                  epoch_tick_ms=pool.epoch_tick_ms,
                                  max_wasm_stack=limits.max_wasm_stack),
            heartbeat_interval_ms=pool.heartbeat_interval_ms,
            rlimit_data_bytes=pool.rlimit_data_mb * MiB,
            shm_dir=self.shm_dir or "",
            shm_threshold_bytes=self.config.server.shm_threshold_bytes,
        )
        try:
            handle = spawn_worker(slot, self.generation, settings, pool.python or None)
        except OSError as exc:
            log.error("cannot start worker for slot %d: %s", slot, exc)
            self.policy.record_start_failure()
            self.restarts[RestartCause.START_FAILURE] += 1
            self._check_breaker(f"cannot start a worker: {exc}")
            self.spawn_at[slot] = time.monotonic() + self.policy.delay_s()
            return
        jitter = pool.recycle_jitter
        handle.recycle_after = max(
            1, int(pool.max_executions_per_worker * (1 - jitter * random.random()))
        )
        self.slots[slot] = handle
        self.by_id[handle.worker_id] = handle
        if handle.pidfd >= 0:
            self.by_pidfd[handle.pidfd] = handle
            self.poller.register(handle.pidfd, zmq.POLLIN)

    def _retire(self, handle: WorkerHandle, cause: RestartCause, replace: bool = True) -> None:
        """Take no more jobs; exit once idle; a successor takes the slot at once."""
        if handle.state is WorkerState.DEAD:
            return
        handle.retire_cause = cause
        handle.state = WorkerState.RETIRING
        if handle.jobs:
            return  # asked again when its last job finishes
        try:
            self.back.send_multipart([handle.worker_id.encode(),
                                      p.encode(p.Shutdown(reason=str(cause)))], zmq.NOBLOCK)
        except zmq.ZMQError:
            handle.kill(cause)
        handle.last_seen = time.monotonic()  # grace for a clean exit, then heartbeat kills it
        if (replace and not handle.replaced and not self.draining
                and handle.slot < len(self.slots)):
            handle.replaced = True
            self.restarts[cause] += 1
            log.info("replacing worker %s (pid %d): %s", handle.worker_id, handle.pid, cause)
            self._spawn(handle.slot)

    def _reap(self, handle: WorkerHandle) -> None:
        code = handle.reap()
        if code is None:
            return
        self._drain_back()  # replies it sent before dying still count
        if handle.pidfd < 0:
            for fd, h in list(self.by_pidfd.items()):
                if h is handle:
                    self.poller.unregister(fd)
                    del self.by_pidfd[fd]
        self._on_exit(handle, code)

    def _on_exit(self, handle: WorkerHandle, code: int) -> None:
        was_starting = handle.state is WorkerState.STARTING
        handle.state = WorkerState.DEAD
        self.by_id.pop(handle.worker_id, None)
        cause = handle.kill_cause or handle.retire_cause or RestartCause.CRASH
        if handle.jobs:
            head, *waiting = handle.jobs
            handle.jobs.clear()
            lost: WasmCoreError
            if handle.kill_cause is RestartCause.MEMORY:
                lost = MemoryLimit(
                    f"worker pid {handle.pid} passed the hard RSS limit "
                    f"({self.config.pool.rss_hard_limit_mb} MiB) and was killed",
                    {"rss_bytes": handle.rss_bytes})
            else:
                lost = WorkerLost(
                    f"the worker running this request died ({_describe_exit(code)}); "
                    "the request may be retried",
                    {"exit": code, "cause": str(cause), "pid": handle.pid})
            self._fail(head, lost)
            if self.draining:
                for job in waiting:
                    self._fail(job, lost)
            else:
                self._requeue(waiting, lost)
        if handle.replaced or self.draining or self.exit_code is not None:
            return
        handle.replaced = True
        if was_starting and handle.kill_cause is None:
            cause = RestartCause.START_FAILURE
            self.policy.record_start_failure()
            reason = ("worker exited at start" if code != EXIT_BOOT_ERROR
                      else "worker could not boot (see its stderr above)")
            log.error("%s: %s (%s)", handle.worker_id, reason, _describe_exit(code))
            if self._check_breaker(f"{reason} ({_describe_exit(code)})"):
                return
        else:
            log.warning("worker %s (pid %d) exited: %s; cause %s",
                        handle.worker_id, handle.pid, _describe_exit(code), cause)
        self.restarts[cause] += 1
        if handle.slot < len(self.slots) and self.slots[handle.slot] is handle:
            self.spawn_at[handle.slot] = time.monotonic() + self.policy.delay_s()

    def _check_breaker(self, reason: str) -> bool:
        if not self.policy.tripped():
            return False
        self.stop_reason = (
            f"worker pool stopped: {self.policy.max_failures} workers failed to start within "
            f"{self.policy.window_s:.0f}s; last: {reason}"
        )
        log.critical(self.stop_reason)
        self._stop_now(EXIT_POOL_FAILED, ShuttingDown(self.stop_reason))
        return True

    def _tick(self, now: float) -> None:
        pool = self.config.pool
        hb_timeout = pool.heartbeat_timeout_ms / 1000
        start_timeout = pool.start_timeout_ms / 1000
        for handle in list(self.by_id.values()):
            if handle.pidfd < 0 and handle.state is not WorkerState.DEAD:
                self._reap(handle)  # no pidfd: fall back to polling
                continue
            job = handle.jobs[0] if handle.jobs else None
            if job is not None and now > job.deadline:
                handle.jobs.popleft()
                waiting = list(handle.jobs)
                handle.jobs.clear()
                self._fail(job, Timeout(
                    f"no reply within the {job.budget_s * 1000:.0f} ms timeout plus "
                    f"{pool.deadline_grace_ms} ms grace (a blocked host call or a native hang); "
                    "its worker was killed and replaced",
                    {"timeout_ms": int(job.budget_s * 1000), "pid": handle.pid}))
                handle.kill(RestartCause.TIMEOUT)
                handle.state = WorkerState.RETIRING
                self._requeue(waiting, WorkerLost("its worker was killed for another request's "
                                                  "deadline", {"pid": handle.pid}))
            elif handle.state is WorkerState.STARTING:
                if now - handle.last_seen > start_timeout:
                    log.error("worker %s not ready after %.1fs; killing it",
                              handle.worker_id, start_timeout)
                    handle.kill(RestartCause.START_FAILURE)
            elif now - handle.last_seen > hb_timeout and handle.kill_cause is None:
                log.error("worker %s (pid %d) missed heartbeats for %.1fs; killing it",
                          handle.worker_id, handle.pid, now - handle.last_seen)
                handle.kill(RestartCause.HEARTBEAT)
                handle.state = WorkerState.RETIRING
        if now >= self._next_watchdog:
            self._next_watchdog = now + pool.watchdog_interval_ms / 1000
            self._watchdog()
        for slot, when in list(self.spawn_at.items()):
            if now >= when and not self.draining:
                self._spawn(slot)
        if self.draining and self.exit_code is None:
            self._drain_step(now)

    def _watchdog(self) -> None:
        now = time.monotonic()
        if self.shm_dir and now >= self._next_sweep:
            self._next_sweep = now + _SWEEP_S
            removed = shm.sweep(self.shm_dir)
            if removed:
                log.info("removed %d payload segments of exited processes", removed)
        pool = self.config.pool
        soft, hard = pool.rss_soft_limit_mb * MiB, pool.rss_hard_limit_mb * MiB
        for handle in list(self.by_id.values()):
            if handle.state in (WorkerState.DEAD, WorkerState.STARTING):
                continue
            rss = handle.sample_rss()
            if rss > hard and handle.kill_cause is None:
                log.error("worker %s RSS %d MiB over the hard limit %d MiB; killing it",
                          handle.worker_id, rss // MiB, pool.rss_hard_limit_mb)
                handle.kill(RestartCause.MEMORY)
            elif rss > soft and handle.state in (WorkerState.IDLE, WorkerState.BUSY):
                log.warning("worker %s RSS %d MiB over the soft limit %d MiB; recycling it",
                            handle.worker_id, rss // MiB, pool.rss_soft_limit_mb)
                self._retire(handle, RestartCause.MEMORY)


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"
