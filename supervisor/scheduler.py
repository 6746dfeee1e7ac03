"""Scheduling: which worker runs a job, what waits in the queue, when a job is late, and what
becomes of a lost worker's jobs.

Pure logic: no sockets, no processes, no clock of its own (every method that needs the time
takes `now`). It knows workers only by id, as lanes of jobs; the pool owns the processes. Its
decisions accumulate in two lists the server takes each loop turn: jobs to send to workers
(`take_assignments`) and jobs that ended with the supervisor's own error (`take_failures`).

A worker takes one job at a time, but under load it may hold a short FIFO of jobs (prefetch)
so that one wake-up serves several. Only jobs of binaries known to be quick are ever queued
behind each other: a slow or hostile plugin never has someone else's request parked behind
it. Jobs behind the head have not started, so a worker's loss requeues them (once) instead of
failing them.
"""

from __future__ import annotations

import collections
import enum
import math
from dataclasses import dataclass, field

from wasmcore.protocol.errors import Busy, WasmCoreError
from wasmcore.supervisor.jobs import PendingJob

# A busy worker is given more jobs only while the expected run time of those it already
# holds stays under this: one wake-up serves many quick jobs, and nobody's request waits
# long behind a slow or unknown one.
PREFETCH_BUDGET_MS = 2.0


class LaneState(enum.Enum):
    """What a worker's lane is doing after a reply."""

    BUSY = "busy"  # more jobs are queued on it
    IDLE = "idle"  # nothing to do; ready for the next job
    RECYCLE = "recycle"  # served its quota of executions: retire it
    DRAINED = "drained"  # it was stopped and its last job just ended: it may exit


@dataclass(eq=False, slots=True)
class Lane:
    """A ready worker as the scheduler sees it: the jobs sent to it, in order."""

    worker_id: str
    recycle_after: int
    jobs: collections.deque[PendingJob] = field(default_factory=collections.deque)
    queued_ms: float = 0.0  # expected run time of `jobs`
    executions: int = 0
    accepting: bool = True  # False once the worker is stopped (retiring)


class Scheduler:
    def __init__(self, max_queue: int, prefetch: int, deadline_grace_s: float) -> None:
        self.max_queue = max_queue
        self.prefetch = prefetch
        self.deadline_grace_s = deadline_grace_s
        self._lanes: dict[str, Lane] = {}
        # Ready workers with nothing to do, most recently idle last (popped first).
        self._idle: list[str] = []
        self._queue: collections.deque[PendingJob] = collections.deque()
        self._exec_ms: dict[str, float] = {}  # per binary: moving average of run time
        self._assignments: list[tuple[str, PendingJob]] = []
        self._failures: list[tuple[PendingJob, WasmCoreError]] = []

    def configure(self, max_queue: int, prefetch: int, deadline_grace_s: float) -> None:
        self.max_queue = max_queue
        self.prefetch = prefetch
        self.deadline_grace_s = deadline_grace_s

    # ------------------------------------------------------------------ decisions

    def take_assignments(self) -> list[tuple[str, PendingJob]]:
        """(worker id, job) to send, in the order they were decided."""
        out, self._assignments = self._assignments, []
        return out

    def take_failures(self) -> list[tuple[PendingJob, WasmCoreError]]:
        out, self._failures = self._failures, []
        return out

    # ------------------------------------------------------------------ workers

    def add_worker(self, worker_id: str, recycle_after: int, now: float) -> None:
        """A worker said it is ready: it takes queued work at once, else waits idle."""
        self._lanes[worker_id] = Lane(worker_id, max(1, recycle_after))
        self._become_idle(self._lanes[worker_id], now)

    def stop_worker(self, worker_id: str) -> bool:
        """Give it no more jobs. True when it holds none and may exit now; otherwise its
        last reply reports DRAINED."""
        lane = self._lanes.get(worker_id)
        if lane is None:
            return True
        lane.accepting = False
        return not lane.jobs

    def release_worker(self, worker_id: str, head_error: WasmCoreError,
                       waiting_error: WasmCoreError, now: float, requeue: bool = True) -> None:
        """The worker is gone (every exit ends here, with or without jobs), and this is the
        one place a lost worker's jobs end: the head (it was running) fails with
        `head_error`; those waiting behind it usually never started and run elsewhere,
        unless `requeue` is off (shutdown), they were requeued once already (they may be
        what kills workers), or running them may have destroyed their input. Usually: a
        worker sends the replies of a burst of quick jobs together, so some may have run
        (harmless to run again, a fresh store each time)."""
        lane = self._lanes.pop(worker_id, None)
        if worker_id in self._idle:
            self._idle.remove(worker_id)
        if lane is None or not lane.jobs:
            return
        head, *waiting = lane.jobs
        lane.jobs.clear()
        self._failures.append((head, head_error))
        for job in reversed(waiting):
            if not requeue or job.requeued or not job.retryable:
                self._failures.append((job, waiting_error))
            else:
                job.requeued = True
                self._queue.appendleft(job)
        self._dispatch_queue(now)

    def jobs_on(self, worker_id: str) -> int:
        lane = self._lanes.get(worker_id)
        return len(lane.jobs) if lane is not None else 0

    def executions_on(self, worker_id: str) -> int:
        lane = self._lanes.get(worker_id)
        return lane.executions if lane is not None else 0

    def busy_workers(self) -> list[str]:
        return [lane.worker_id for lane in self._lanes.values() if lane.jobs]

    # ------------------------------------------------------------------ jobs

    def submit(self, job: PendingJob, now: float, bounded: bool = True) -> None:
        """Run `job` on a worker now, or queue it; Busy when the queue is full (`bounded`
        off: never refused, for work that must not be lost, such as a hot reload)."""
        if not self._queue:  # else it waits its turn: nobody overtakes a queued job
            estimate = self._estimate_ms(job)
            lane = self._pick_lane(estimate)
            if lane is not None:
                self._assign(lane, job, now, estimate)
                return
        if bounded and len(self._queue) >= self.max_queue:
            raise Busy(
                f"all workers are busy and {len(self._queue)} requests are queued; "
                "retry shortly",
                {"queue_depth": len(self._queue)},
            )
        self._queue.append(job)

    def on_reply(self, worker_id: str, token: int,
                 now: float) -> tuple[PendingJob, LaneState] | None:
        """A worker answered job `token`: the job it ends and what its lane does next, or
        None for a reply nobody waits for any more (late, after a timeout or a loss): it
        must never answer anything else."""
        lane = self._lanes.get(worker_id)
        if lane is None or not lane.jobs or lane.jobs[0].token != token:
            return None
        job = lane.jobs.popleft()
        if not lane.jobs:
            lane.queued_ms = 0.0
        elif math.isinf(lane.queued_ms):  # inf - inf would be nan: recount
            lane.queued_ms = sum(j.estimate_ms for j in lane.jobs)
        else:
            lane.queued_ms = max(0.0, lane.queued_ms - job.estimate_ms)
        lane.executions += 1
        elapsed_ms = (now - job.started) * 1000
        for binary_id in job.binary_ids:
            previous = self._exec_ms.get(binary_id)
            self._exec_ms[binary_id] = (elapsed_ms if previous is None
                                        else 0.8 * previous + 0.2 * elapsed_ms)
        if lane.jobs:
            self._start_clock(lane.jobs[0], now)
            self._dispatch_queue(now)  # the room this reply freed goes to the queue first
            return job, LaneState.BUSY
        if not lane.accepting:
            return job, LaneState.DRAINED
        if lane.executions >= lane.recycle_after:
            lane.accepting = False
            return job, LaneState.RECYCLE
        self._become_idle(lane, now)
        return job, LaneState.BUSY if lane.jobs else LaneState.IDLE

    def expired(self, now: float) -> list[tuple[str, PendingJob]]:
        """Workers whose running job passed its deadline, with that job. The caller kills the
        worker and ends its jobs through `release_worker`."""
        return [(lane.worker_id, lane.jobs[0]) for lane in self._lanes.values()
                if lane.jobs and now > lane.jobs[0].deadline]

    def cancel_queued(self, error: WasmCoreError) -> int:
        """Fail every job that has not reached a worker; how many there were."""
        count = len(self._queue)
        while self._queue:
            self._failures.append((self._queue.popleft(), error))
        return count

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        return sum(len(lane.jobs) for lane in self._lanes.values())

    # ------------------------------------------------------------------ internals

    def _pick_lane(self, estimate_ms: float) -> Lane | None:
        """An idle worker, else (for a job known to be quick) a busy one with room."""
        lanes = self._lanes
        while self._idle:
            # The most recently idle worker (LIFO): its caches are still warm. At low load one
            # worker serves every request; round-robin made each wait cold (measured: median
            # round trip 352-382 us round-robin, 295-326 us LIFO, 2 workers, one at a time).
            lane = lanes.get(self._idle.pop())
            if lane is not None and lane.accepting and not lane.jobs:
                return lane
        if estimate_ms >= PREFETCH_BUDGET_MS:  # unknown or slow: only an idle worker
            return None
        depth = self.prefetch
        best: Lane | None = None
        for lane in lanes.values():
            if (lane.accepting and lane.jobs and len(lane.jobs) < depth
                    and lane.queued_ms < PREFETCH_BUDGET_MS
                    and lane.executions + len(lane.jobs) < lane.recycle_after
                    and (best is None or lane.queued_ms < best.queued_ms)):
                best = lane
        return best

    def _estimate_ms(self, job: PendingJob) -> float:
        """Expected run time from the binaries' moving averages; unknown counts as slow."""
        if job.on_done is not None:
            return math.inf
        return sum(self._exec_ms.get(b, math.inf) for b in job.binary_ids)

    def _assign(self, lane: Lane, job: PendingJob, now: float, estimate_ms: float) -> None:
        self._assignments.append((lane.worker_id, job))
        lane.jobs.append(job)
        job.estimate_ms = estimate_ms
        lane.queued_ms += estimate_ms
        if len(lane.jobs) == 1:
            self._start_clock(job, now)

    def _start_clock(self, job: PendingJob, now: float) -> None:
        job.started = now
        job.deadline = now + job.budget_s + self.deadline_grace_s

    def _become_idle(self, lane: Lane, now: float) -> None:
        if self._queue:
            job = self._queue.popleft()
            self._assign(lane, job, now, self._estimate_ms(job))
            self._dispatch_queue(now)
        else:
            self._idle.append(lane.worker_id)

    def _dispatch_queue(self, now: float) -> None:
        while self._queue:
            estimate = self._estimate_ms(self._queue[0])
            lane = self._pick_lane(estimate)
            if lane is None:
                return
            self._assign(lane, self._queue.popleft(), now, estimate)
