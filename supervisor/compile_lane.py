"""The compile lane: where untrusted modules become artifacts, apart from the executing pool.

A load or a hot reload needs a compile, seconds for a big module. Compiles run on worker
processes of their own (the worker program started with role "compile": lower CPU priority,
its own memory cap, no instance pool), scheduled by a Scheduler of their own, so an execution
never queues behind a compile and the executing workers never hold a compiler's peak memory.
The executing workers map the artifacts the lane writes.

Each tenant has at most `compile.per_tenant` compiles in the lane at a time; its other loads
wait here, in order (`TenantGate`), so one tenant's burst of loads never takes every compile
worker. A compile past `compile.timeout_ms` is answered TIMEOUT and its worker is killed and
replaced; a compile worker past `compile.memory_mb` is killed (MEMORY_LIMIT), and one left
over the pool's soft RSS limit after a big compile is replaced once it is done.

Like the executing pool, the lane's WorkerPool owns the processes and its Scheduler the jobs;
the server routes a compile worker's messages here (`owns`) and sends what it decides.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Iterator

import msgspec
import zmq

from wasmcore.protocol import messages as p
from wasmcore.protocol.errors import Busy, MemoryLimit, Timeout, WasmCoreError, WorkerLost
from wasmcore.protocol.settings import ROLE_COMPILE
from wasmcore.supervisor.config import Config
from wasmcore.supervisor.confinement import Confinement
from wasmcore.supervisor.jobs import PendingJob
from wasmcore.supervisor.scheduler import LaneState, Scheduler
from wasmcore.supervisor.worker_info import describe_workers
from wasmcore.supervisor.worker_pool import (
    Exit,
    Tell,
    WorkerPool,
    describe_exit,
    worker_id_prefix,
)
from wasmcore.supervisor.worker_process import RestartCause, WorkerHandle, WorkerState

log = logging.getLogger("wasmcore.supervisor")

# Compile workers run at this niceness: an execution always gets the CPU first.
COMPILE_NICE = 10
_PREFIX = worker_id_prefix(ROLE_COMPILE)


def lane_pool_config(config: Config) -> Config:
    """The pool settings compile workers run under: their own count and memory cap;
    heartbeats, backoff, breaker and the soft RSS limit (replace after the compile) as the
    executing pool's. The cap is the RSS watchdog's kill, answered MEMORY_LIMIT; RLIMIT_DATA
    is only its backstop, at twice the cap: the compiler aborts the process when an
    allocation fails, and that death could not say why."""
    lane = config.compile
    pool = msgspec.structs.replace(
        config.pool,
        workers=lane.workers,
        rss_soft_limit_mb=min(config.pool.rss_soft_limit_mb, lane.memory_mb),
        rss_hard_limit_mb=lane.memory_mb,
        rlimit_data_mb=2 * lane.memory_mb,
    )
    return msgspec.structs.replace(config, pool=pool)


def _concurrency(config: Config) -> Callable[[str], int]:
    """A tenant's own compile_concurrency (0: compile.per_tenant applies)."""
    return lambda tenant: config.tenant(tenant).compile_concurrency


class TenantGate:
    """Pure: which of a tenant's compiles are in the lane (at most `per_tenant`, or the
    tenant's own `compile_concurrency` from `override`) and which wait, in order."""

    def __init__(self, per_tenant: int,
                 override: Callable[[str], int] = lambda tenant: 0) -> None:
        self.per_tenant = per_tenant
        self._override = override
        self._running: dict[str, set[int]] = {}  # tenant -> tokens of its jobs in the lane
        self._waiting: dict[str, collections.deque[PendingJob]] = {}

    def admit(self, tenant: str, job: PendingJob) -> bool:
        """True: `job` enters the lane now; False: it waits behind the tenant's others."""
        running = self._running.setdefault(tenant, set())
        if len(running) < self._limit(tenant) and not self._waiting.get(tenant):
            running.add(job.token)
            return True
        self._waiting.setdefault(tenant, collections.deque()).append(job)
        return False

    def would_wait(self, tenant: str) -> bool:
        return (len(self._running.get(tenant, ())) >= self._limit(tenant)
                or bool(self._waiting.get(tenant)))

    def done(self, tenant: str, job: PendingJob) -> PendingJob | None:
        """`job` ended (answered, failed or cancelled): the tenant's next job to enter the
        lane, if one waits and there is room."""
        running = self._running.get(tenant)
        if running is None or job.token not in running:
            return None  # it never entered: cancelled while waiting
        running.discard(job.token)
        return self._next(tenant)

    def configure(self, per_tenant: int,
                  override: Callable[[str], int] | None = None) -> list[PendingJob]:
        """A new limit; the jobs a larger one lets in now."""
        self.per_tenant = per_tenant
        if override is not None:
            self._override = override
        admitted: list[PendingJob] = []
        for tenant in list(self._waiting):
            while (job := self._next(tenant)) is not None:
                admitted.append(job)
        return admitted

    def cancel_waiting(self) -> list[PendingJob]:
        jobs = [job for queue in self._waiting.values() for job in queue]
        self._waiting.clear()
        return jobs

    @property
    def waiting(self) -> int:
        return sum(len(queue) for queue in self._waiting.values())

    def _limit(self, tenant: str) -> int:
        return self._override(tenant) or self.per_tenant

    def _next(self, tenant: str) -> PendingJob | None:
        queue = self._waiting.get(tenant)
        running = self._running.get(tenant, set())
        job = None
        if queue and len(running) < self._limit(tenant):
            job = queue.popleft()
            running.add(job.token)
            self._running[tenant] = running
        if not queue:
            self._waiting.pop(tenant, None)
        if not running:
            self._running.pop(tenant, None)
        return job


class CompileLane:
    def __init__(self, config: Config, back_endpoint: str, pub_endpoint: str,
                 poller: zmq.Poller, tell: Tell,
                 clock: Callable[[], float] = time.monotonic,
                 confinement: Confinement | None = None) -> None:
        self._config = config
        self._clock = clock
        # Compilers parse untrusted modules: compile workers get the executing ones' OS sandbox.
        self._pool = WorkerPool(lane_pool_config(config), back_endpoint, pub_endpoint, None,
                                poller, tell, role=ROLE_COMPILE, nice=COMPILE_NICE,
                                confinement=confinement)
        # No prefetch (a compile is never quick) and no grace: compile.timeout_ms is the limit.
        self._scheduler = Scheduler(config.server.max_queue, 1, 0.0)
        self._gate = TenantGate(config.compile.per_tenant, _concurrency(config))
        self._failures: list[tuple[PendingJob, WasmCoreError]] = []

    # ------------------------------------------------------------------ views

    @staticmethod
    def owns(worker_id: str) -> bool:
        """Whether a message comes from a compile worker (alive or not)."""
        return worker_id.startswith(_PREFIX)

    def by_pidfd(self, fd: int) -> WorkerHandle | None:
        return self._pool.by_pidfd(fd)

    def live(self) -> Iterator[WorkerHandle]:
        return self._pool.live()

    def busy_workers(self) -> list[str]:
        return self._scheduler.busy_workers()

    @property
    def active(self) -> bool:
        """Something runs or starts (the loop polls faster meanwhile)."""
        return self._pool.starting or bool(self._scheduler.in_flight)

    @property
    def queue_depth(self) -> int:
        """Compiles waiting for a compile worker, or for their tenant's turn."""
        return self._scheduler.queue_depth + self._gate.waiting

    @property
    def restarts(self) -> collections.Counter[str]:
        return self._pool.restarts

    @property
    def stop_reason(self) -> str | None:
        return self._pool.stop_reason

    def stats(self) -> list[p.WorkerInfo]:
        return describe_workers(self._pool.live(), self._scheduler, show_pids=True)

    # ------------------------------------------------------------------ jobs

    def submit(self, tenant: str, job: PendingJob, bounded: bool) -> None:
        """Compile `job` for `tenant` now, or after the tenant's earlier compiles; Busy when
        it would wait and the lane's queue is full (`bounded` off: never refused, for a hot
        reload)."""
        job.budget_s = self._config.compile.timeout_ms / 1000
        completion = job.on_done
        assert completion is not None
        submitted = self._clock()

        def finished(code: str, event: object, frames: list[zmq.Frame]) -> None:
            now = self._clock()
            after = self._gate.done(tenant, job)  # first: the completion may raise
            if after is not None:
                self._scheduler.submit(after, now, bounded=False)
            started = job.started or now  # 0: it never reached a compile worker
            log.info("compile for tenant %r: %s in %.1f ms on a compile worker, after %.1f ms "
                     "waiting", tenant, code or "compiled", (now - started) * 1000,
                     (started - submitted) * 1000)
            completion(code, event, frames)

        job.on_done = finished
        if self._gate.would_wait(tenant):
            if bounded:
                self._check_room()
            self._gate.admit(tenant, job)  # queued behind the tenant's others
            return
        self._gate.admit(tenant, job)
        try:
            self._scheduler.submit(job, self._clock(), bounded)
        except Busy:
            self._gate.done(tenant, job)
            self._check_room()
            raise

    def _check_room(self) -> None:
        depth = self.queue_depth
        if depth >= self._config.server.max_queue:
            raise Busy(f"{depth} loads are waiting to be compiled; retry shortly",
                       {"compile_queue_depth": depth})

    def take_assignments(self) -> list[tuple[str, PendingJob]]:
        return self._scheduler.take_assignments()

    def take_failures(self) -> list[tuple[PendingJob, WasmCoreError]]:
        failures = self._scheduler.take_failures()
        if self._failures:  # rare (cancelled waiting loads): no new list every loop turn
            failures, self._failures = self._failures + failures, []
        return failures

    def on_reply(self, worker_id: str, token: int, now: float) -> PendingJob | None:
        """A compile worker answered job `token`: the job it ends, or None for a late reply."""
        self._pool.seen(worker_id, now)
        outcome = self._scheduler.on_reply(worker_id, token, now)
        if outcome is None:
            return None
        job, lane = outcome
        if lane is LaneState.RECYCLE or lane is LaneState.DRAINED:
            handle = self._pool.get(worker_id)
            if handle is not None:
                self._pool.retire(handle, RestartCause.RECYCLE, now)
                self._pool.dismiss(handle, now)
        return job

    # ------------------------------------------------------------------ workers

    def start(self, now: float) -> None:
        self._pool.start(now)

    def ready(self, worker_id: str, fingerprint: str, expected: str, now: float,
              accept: bool, protections: list[str] | None = None) -> None:
        handle = self._pool.ready(worker_id, fingerprint, expected, now, protections)
        if handle is None:
            return
        if accept:
            self._scheduler.add_worker(handle.worker_id, handle.recycle_after, now)
        else:
            self._retire(handle, RestartCause.RECYCLE, now, replace=False)

    def heartbeat(self, worker_id: str, compiled: int, deserialized: int, now: float) -> None:
        self._pool.heartbeat(worker_id, compiled, deserialized, now)

    def reap(self, handle: WorkerHandle, now: float) -> Exit | None:
        return self._pool.reap(handle, now)

    def release(self, gone: Exit, now: float, requeue: bool) -> None:
        """A compile worker is gone (after `reap`): its compile ends with an error that says
        what a compile worker's death most likely means."""
        cap = self._config.compile.memory_mb
        details = dict(gone.error.details)
        error: WasmCoreError
        if gone.error.code == MemoryLimit.code:
            error = MemoryLimit(f"compiling this module used more than compile.memory_mb "
                                f"({cap} MiB); its compile worker was killed and replaced",
                                details)
        else:
            error = WorkerLost(f"the compile worker died while compiling this module "
                               f"({describe_exit(gone.code)}); it may need more memory than "
                               f"compile.memory_mb ({cap} MiB) allows; the load may be retried",
                               details)
        self._scheduler.release_worker(gone.handle.worker_id, error, error, now, requeue)

    def tick(self, now: float) -> list[WorkerHandle]:
        """Compile deadlines and the pool's timers; the handles the caller must reap (gone,
        with no pidfd to tell)."""
        timeout_ms = self._config.compile.timeout_ms
        for worker_id, _job in self._scheduler.expired(now):
            handle = self._pool.get(worker_id)
            self._scheduler.release_worker(
                worker_id,
                Timeout(f"compiling this module took longer than compile.timeout_ms "
                        f"({timeout_ms} ms); its compile worker was killed and replaced. "
                        "Load a smaller module, or ask the operator to raise the timeout",
                        {"timeout_ms": timeout_ms}),
                WorkerLost("its compile worker was killed for another compile's deadline"),
                now)
            if handle is not None:
                self._pool.kill(handle, RestartCause.TIMEOUT)
        ticked = self._pool.tick(now)
        for handle in ticked.killed:
            self._scheduler.stop_worker(handle.worker_id)
        for handle in ticked.to_recycle:
            self._retire(handle, RestartCause.MEMORY, now)
        return ticked.to_reap

    def reconfigure(self, config: Config, now: float) -> None:
        self._config = config
        self._scheduler.configure(config.server.max_queue, 1, 0.0)
        for job in self._gate.configure(config.compile.per_tenant, _concurrency(config)):
            self._scheduler.submit(job, now, bounded=False)
        for handle in self._pool.reconfigure(lane_pool_config(config), now):
            self._retire(handle, RestartCause.RECYCLE, now, replace=False)

    # ------------------------------------------------------------------ shutdown

    def begin_drain(self, error: WasmCoreError) -> None:
        """No successor is started; compiles that have not started end with `error`."""
        self._pool.stop_replacing()
        self.cancel_queued(error)

    def cancel_queued(self, error: WasmCoreError) -> None:
        self._failures.extend((job, error) for job in self._gate.cancel_waiting())
        self._scheduler.cancel_queued(error)

    def stop(self, error: WasmCoreError, now: float) -> None:
        """End the running compiles with `error`; every compile worker exits (or is killed
        with `kill`)."""
        for worker_id in self._scheduler.busy_workers():
            self._scheduler.release_worker(worker_id, error, error, now, requeue=False)
        for handle in self._pool.live():
            if handle.state is not WorkerState.RETIRING:
                self._retire(handle, RestartCause.RECYCLE, now, replace=False)

    def stop_now(self, error: WasmCoreError, now: float) -> None:
        """Every compile, running or waiting, ends with `error`; every compile worker is
        killed."""
        self._pool.stop_replacing()
        self.cancel_queued(error)
        for handle in self._pool.live():
            self._scheduler.release_worker(handle.worker_id, error, error, now, requeue=False)
            self._pool.kill(handle, RestartCause.RECYCLE)

    def kill_all(self) -> None:
        self._pool.kill_all()

    def close(self) -> None:
        self._pool.close()

    def _retire(self, handle: WorkerHandle, cause: RestartCause, now: float,
                replace: bool = True) -> None:
        self._pool.retire(handle, cause, now, replace)
        if self._scheduler.stop_worker(handle.worker_id):
            self._pool.dismiss(handle, now)
