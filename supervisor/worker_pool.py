"""The worker processes: spawn into slots, heartbeats and start timeouts, the RSS watchdog,
retire, reap, restart with backoff, and the breaker that stops a pool that cannot start.

The pool owns processes, never jobs: the scheduler holds what each worker is running. When a
worker exits, `reap` says how (an `Exit` with the error its jobs end with) and the server hands
that to the scheduler, the one place a lost worker's jobs are failed or requeued.
"""

from __future__ import annotations

import collections
import logging
import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import zmq

from wasmcore.protocol import messages as p
from wasmcore.protocol.errors import MemoryLimit, WasmCoreError, WorkerLost
from wasmcore.protocol.limits import MiB
from wasmcore.protocol.settings import (
    EXIT_BOOT_ERROR,
    ROLE_COMPILE,
    ROLE_EXECUTE,
    SandboxConfig,
    WorkerSettings,
)
from wasmcore.supervisor.config import Config
from wasmcore.supervisor.confinement import Confinement
from wasmcore.supervisor.host_methods import method_table
from wasmcore.supervisor.restart_policy import RestartPolicy
from wasmcore.supervisor.scratch import scratch_root
from wasmcore.supervisor.worker_process import RestartCause, WorkerHandle, WorkerState, spawn_worker

log = logging.getLogger("wasmcore.supervisor")

EXIT_POOL_FAILED = 2

# Sends a control message to a worker by id; False when it cannot be delivered.
Tell = Callable[[str, bytes], bool]


@dataclass(frozen=True, slots=True)
class Exit:
    """A worker is gone: how, and the error the job it was running ends with."""

    handle: WorkerHandle
    code: int
    error: WasmCoreError


@dataclass(slots=True)
class TickResult:
    to_reap: list[WorkerHandle]  # no pidfd to tell us: polled, and found gone
    to_recycle: list[WorkerHandle]  # over the soft RSS limit: retire after its jobs
    killed: list[WorkerHandle]  # killed now (start timeout, heartbeats, hard RSS limit)


class WorkerPool:
    def __init__(self, config: Config, back_endpoint: str, pub_endpoint: str,
                 shm_dir: str | None, poller: zmq.Poller, tell: Tell,
                 role: str = ROLE_EXECUTE, nice: int = 0,
                 confinement: Confinement | None = None,
                 direct_socket_prefix: str = "") -> None:
        """`role` and `nice` go to every worker it starts; worker ids start with a letter of
        their role (`worker_id_prefix`), so the pools of two roles never share one. The
        confinement decides each worker's OS sandbox (both roles run untrusted modules).
        `direct_socket_prefix`: each worker binds its direct lane at this path plus its id
        (empty: no direct lanes)."""
        self._config = config
        self.direct_socket_prefix = direct_socket_prefix
        self._role = role
        self._nice = nice
        self._confinement = confinement or Confinement(None)
        self._back_endpoint = back_endpoint
        self._pub_endpoint = pub_endpoint
        self._shm_dir = shm_dir
        self._poller = poller
        self._tell = tell
        self.policy = RestartPolicy.from_config(config.pool)
        self._slots: list[WorkerHandle | None] = [None] * config.pool.workers
        self._by_id: dict[str, WorkerHandle] = {}
        self._by_pidfd: dict[int, WorkerHandle] = {}
        self._spawn_at: dict[int, float] = {}  # slot -> when its next start is due
        self._generation = 0
        self._replacing = True  # off while the service shuts down
        self._next_watchdog = 0.0
        self.restarts: collections.Counter[str] = collections.Counter()
        # Set when the breaker trips: the service cannot run and must stop.
        self.stop_reason: str | None = None

    # ------------------------------------------------------------------ views

    @property
    def size(self) -> int:
        return len(self._slots)

    def live(self) -> Iterator[WorkerHandle]:
        return iter(list(self._by_id.values()))

    def get(self, worker_id: str) -> WorkerHandle | None:
        return self._by_id.get(worker_id)

    def by_pidfd(self, fd: int) -> WorkerHandle | None:
        return self._by_pidfd.get(fd)

    @property
    def starting(self) -> bool:
        """A start is pending or under way (the loop polls faster meanwhile)."""
        return bool(self._spawn_at) or any(
            h.state is WorkerState.STARTING for h in self._by_id.values())

    # ------------------------------------------------------------------ lifecycle

    def start(self, now: float) -> None:
        for slot in range(len(self._slots)):
            self._spawn(slot, now)

    def stop_replacing(self) -> None:
        """Shutdown: no successor is started from now on."""
        self._replacing = False
        self._spawn_at.clear()

    def reconfigure(self, config: Config, now: float) -> list[WorkerHandle]:
        """Apply a reloaded config; returns the workers a smaller pool no longer has, to be
        retired by the caller (they finish their jobs first)."""
        self._config = config
        self.policy.configure(config.pool)
        old, size = len(self._slots), config.pool.workers
        removed: list[WorkerHandle] = []
        if size > old:
            self._slots.extend([None] * (size - old))
            for slot in range(old, size):
                self._spawn(slot, now)
        elif size < old:
            for handle in self._slots[size:]:
                if handle is not None and handle.state is not WorkerState.DEAD:
                    handle.replaced = True  # its slot is gone: nobody takes its place
                    removed.append(handle)
            del self._slots[size:]
            for slot in [s for s in self._spawn_at if s >= size]:
                del self._spawn_at[slot]
        return removed

    def ready(self, worker_id: str, fingerprint: str, expected_fingerprint: str,
              now: float, protections: list[str] | None = None) -> WorkerHandle | None:
        """A worker finished booting: the handle, if it was one we were waiting for."""
        handle = self._by_id.get(worker_id)
        if handle is None or handle.state is not WorkerState.STARTING:
            return None
        handle.last_seen = now
        handle.protections = list(protections or [])
        handle.state = WorkerState.READY
        self.policy.record_start_success()
        if fingerprint != expected_fingerprint:
            log.warning("worker %s engine fingerprint %s differs from %s",
                        worker_id, fingerprint, expected_fingerprint)
        return handle

    def heartbeat(self, worker_id: str, compiled: int, deserialized: int, now: float) -> None:
        handle = self._by_id.get(worker_id)
        if handle is not None:
            handle.last_seen = now
            handle.compiled = compiled
            handle.deserialized = deserialized

    def seen(self, worker_id: str, now: float) -> None:
        handle = self._by_id.get(worker_id)
        if handle is not None:
            handle.last_seen = now

    def excuse(self, stall_s: float, now: float) -> None:
        """The supervisor's loop was not running for `stall_s` seconds up to `now`: nothing
        could be heard from anyone meanwhile, so that time counts against no worker's
        heartbeats or start timeout. Never past `now`: an excuse is not a heartbeat."""
        for handle in self._by_id.values():
            handle.last_seen = min(now, handle.last_seen + stall_s)

    def retire(self, handle: WorkerHandle, cause: RestartCause, now: float,
               replace: bool = True) -> None:
        """It takes no more jobs; a successor takes its slot at once. It exits once the
        caller `dismiss`es it (when the scheduler says it holds no jobs)."""
        if handle.state in (WorkerState.DEAD, WorkerState.RETIRING):
            return
        handle.retire_cause = cause
        handle.state = WorkerState.RETIRING
        if (replace and self._replacing and not handle.replaced
                and handle.slot < len(self._slots)):
            handle.replaced = True
            self.restarts[cause] += 1
            log.info("replacing worker %s (pid %d): %s", handle.worker_id, handle.pid, cause)
            self._spawn(handle.slot, now)

    def dismiss(self, handle: WorkerHandle, now: float) -> None:
        """Ask a retiring worker with no jobs left to exit (or kill it if it cannot hear)."""
        if handle.state is WorkerState.DEAD:
            return
        cause = handle.retire_cause or RestartCause.RECYCLE
        if not self._tell(handle.worker_id, p.encode(p.Shutdown(reason=str(cause)))):
            handle.kill(cause)
        handle.last_seen = now  # grace for a clean exit, then the heartbeat check kills it

    def kill(self, handle: WorkerHandle, cause: RestartCause) -> None:
        """SIGKILL; it is reaped (and its jobs ended) when its pidfd reports the exit."""
        handle.kill(cause)
        if handle.state is not WorkerState.DEAD:
            handle.state = WorkerState.RETIRING

    def kill_all(self) -> None:
        for handle in self._by_id.values():
            handle.kill(RestartCause.RECYCLE)

    def reap(self, handle: WorkerHandle, now: float) -> Exit | None:
        """If the process has exited: forget it, schedule its successor, and say how it
        ended. None while it still runs."""
        code = handle.reap()
        if code is None:
            return None
        for fd in [fd for fd, h in self._by_pidfd.items() if h is handle]:
            self._poller.unregister(fd)
            del self._by_pidfd[fd]
        was_starting = handle.state is WorkerState.STARTING
        handle.state = WorkerState.DEAD
        self._by_id.pop(handle.worker_id, None)
        cause = handle.kill_cause or handle.retire_cause or RestartCause.CRASH
        if handle.kill_cause is RestartCause.MEMORY:
            error: WasmCoreError = MemoryLimit(
                f"worker pid {handle.pid} passed the hard RSS limit "
                f"({self._config.pool.rss_hard_limit_mb} MiB) and was killed",
                {"rss_bytes": handle.rss_bytes})
        else:
            error = WorkerLost(
                f"the worker running this request died ({describe_exit(code)}); "
                "the request may be retried",
                {"exit": code, "cause": str(cause), "pid": handle.pid})
        self._after_exit(handle, code, cause, was_starting, now)
        return Exit(handle, code, error)

    def close(self, wait_s: float = 3.0) -> None:
        """Kill every worker and reap it, waiting at most `wait_s` in all."""
        deadline = time.monotonic() + wait_s
        for handle in self._by_id.values():
            handle.kill(RestartCause.RECYCLE)
        for handle in list(self._by_id.values()):
            try:
                handle.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except Exception:
                pass
            handle.reap()
        self._by_id.clear()

    # ------------------------------------------------------------------ timers

    def tick(self, now: float) -> TickResult:
        """Start timeouts, missed heartbeats, due restarts, and (at its own interval) the
        RSS watchdog."""
        pool = self._config.pool
        hb_timeout = pool.heartbeat_timeout_ms / 1000
        start_timeout = pool.start_timeout_ms / 1000
        result = TickResult(to_reap=[], to_recycle=[], killed=[])
        for handle in list(self._by_id.values()):
            if handle.pidfd < 0 and handle.state is not WorkerState.DEAD:
                result.to_reap.append(handle)  # no pidfd: fall back to polling
            elif handle.state is WorkerState.STARTING:
                if now - handle.last_seen > start_timeout:
                    log.error("worker %s not ready after %.1fs; killing it",
                              handle.worker_id, start_timeout)
                    handle.kill(RestartCause.START_FAILURE)
                    result.killed.append(handle)
            elif now - handle.last_seen > hb_timeout and handle.kill_cause is None:
                log.error("worker %s (pid %d) missed heartbeats for %.1fs; killing it",
                          handle.worker_id, handle.pid, now - handle.last_seen)
                self.kill(handle, RestartCause.HEARTBEAT)
                result.killed.append(handle)
        if now >= self._next_watchdog:
            self._next_watchdog = now + pool.watchdog_interval_ms / 1000
            self._watchdog(result)
        for slot, when in list(self._spawn_at.items()):
            if now >= when and self._replacing:
                self._spawn(slot, now)
        return result

    def _watchdog(self, result: TickResult) -> None:
        pool = self._config.pool
        soft, hard = pool.rss_soft_limit_mb * MiB, pool.rss_hard_limit_mb * MiB
        for handle in self._by_id.values():
            if handle.state in (WorkerState.DEAD, WorkerState.STARTING):
                continue
            rss = handle.sample_rss()
            if rss > hard and handle.kill_cause is None:
                log.error("worker %s RSS %d MiB over the hard limit %d MiB; killing it",
                          handle.worker_id, rss // MiB, pool.rss_hard_limit_mb)
                self.kill(handle, RestartCause.MEMORY)
                result.killed.append(handle)
            elif rss > soft and handle.state is WorkerState.READY:
                log.warning("worker %s RSS %d MiB over the soft limit %d MiB; recycling it",
                            handle.worker_id, rss // MiB, pool.rss_soft_limit_mb)
                result.to_recycle.append(handle)

    # ------------------------------------------------------------------ internals

    def _spawn(self, slot: int, now: float) -> None:
        self._spawn_at.pop(slot, None)
        self._generation += 1
        pool = self._config.pool
        limits = self._config.limits
        settings = WorkerSettings(
            worker_id="",
            back_endpoint=self._back_endpoint,
            pub_endpoint=self._pub_endpoint,
            parent_pid=os.getpid(),
            sandbox=SandboxConfig(default_limits=limits.to_limits(),
                                  epoch_tick_ms=pool.epoch_tick_ms,
                                  max_wasm_stack=limits.max_wasm_stack,
                                  max_memory_bytes=self._config.max_memory_bytes()),
            heartbeat_interval_ms=pool.heartbeat_interval_ms,
            rlimit_data_bytes=pool.rlimit_data_mb * MiB,
            shm_dir=self._shm_dir or "",
            shm_threshold_bytes=self._config.server.shm_threshold_bytes,
            os_sandbox=self._confinement.settings(self._config),
            role=self._role,
            nice=self._nice,
            # Compile workers run no plugin: they call no host method.
            host_methods=(method_table(self._config) if self._role == ROLE_EXECUTE
                          else p.HostMethodTable()),
            scratch_dir=scratch_root(self._config) if self._role == ROLE_EXECUTE else "",
            direct_socket_prefix=(self.direct_socket_prefix if self._role == ROLE_EXECUTE
                                  else ""),
        )
        try:
            handle = spawn_worker(slot, self._generation, settings, pool.python or None,
                                  prefix=worker_id_prefix(self._role))
        except OSError as exc:
            log.error("cannot start worker for slot %d: %s", slot, exc)
            self._start_failed(RestartCause.START_FAILURE, f"cannot start a worker: {exc}",
                               slot, now)
            return
        jitter = pool.recycle_jitter
        handle.recycle_after = max(
            1, int(pool.max_executions_per_worker * (1 - jitter * random.random())))
        handle.last_seen = now
        self._slots[slot] = handle
        self._by_id[handle.worker_id] = handle
        if handle.pidfd >= 0:
            self._by_pidfd[handle.pidfd] = handle
            self._poller.register(handle.pidfd, zmq.POLLIN)

    def _after_exit(self, handle: WorkerHandle, code: int, cause: RestartCause,
                    was_starting: bool, now: float) -> None:
        if handle.replaced or not self._replacing or self.stop_reason is not None:
            return
        handle.replaced = True
        # Dying before ready, or killed for not getting ready in time, is a failed start.
        if was_starting and handle.kill_cause in (None, RestartCause.START_FAILURE):
            reason = ("worker exited at start" if code != EXIT_BOOT_ERROR
                      else "worker could not boot (see its stderr above)")
            log.error("%s: %s (%s)", handle.worker_id, reason, describe_exit(code))
            own_slot = handle.slot < len(self._slots) and self._slots[handle.slot] is handle
            self._start_failed(RestartCause.START_FAILURE, f"{reason} ({describe_exit(code)})",
                               handle.slot if own_slot else None, now)
            return
        log.warning("worker %s (pid %d) exited: %s; cause %s",
                    handle.worker_id, handle.pid, describe_exit(code), cause)
        self.restarts[cause] += 1
        if handle.slot < len(self._slots) and self._slots[handle.slot] is handle:
            self._spawn_at[handle.slot] = now + self.policy.delay_s()

    def _start_failed(self, cause: RestartCause, reason: str, slot: int | None,
                      now: float) -> None:
        """Count a failed start; trip the breaker, or retry the slot after the backoff."""
        self.policy.record_start_failure(now)
        self.restarts[cause] += 1
        if self.policy.tripped(now):
            self.stop_reason = (
                f"worker pool stopped: {self.policy.max_failures} workers failed to start "
                f"within {self.policy.window_s:.0f}s; last: {reason}")
            log.critical(self.stop_reason)
            self.stop_replacing()
            return
        if slot is not None:
            self._spawn_at[slot] = now + self.policy.delay_s()


def worker_id_prefix(role: str) -> str:
    return "c" if role == ROLE_COMPILE else "w"


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"
