"""Scheduling: which worker runs a job, what waits in the queue, when a job is late, and what
becomes of a lost worker's jobs.

Pure logic: no sockets, no processes, no clock of its own (every method that needs the time
takes `now`). It knows workers only by id, as lanes of jobs; the pool owns the processes. Its
decisions accumulate in two lists the server takes each loop turn: jobs to send to workers
(`take_assignments`) and jobs that ended with the supervisor's own error (`take_failures`).

Jobs that wait, wait in their tenant's own FIFO; whose turn it is next is weighted fair
queuing by run time (start-time fair queuing, the virtual-time cousin of deficit round robin):
each tenant has a virtual time, the run time it has been given divided by its weight; the
tenant with the least goes next. A job is charged its expected run time when it is sent and
settled to what it really took when it ends, so a tenant whose jobs run long gets fewer of them
and one flooding tenant cannot make another wait behind its queue. A tenant that starts queuing
starts at the current virtual time: idling earns no credit. Within a tenant nothing overtakes.

A worker takes one job at a time, but under load it may hold a short FIFO of jobs (prefetch)
so that one wake-up serves several. Only jobs of binaries known to be quick are ever queued
behind each other: a slow or hostile plugin never has someone else's request parked behind
it. Jobs behind the head have not started, so a worker's loss requeues them (once) instead of
failing them.

What a tenant may hold is bounded (its `max_pending` jobs queued or running, its
`max_queued_bytes`), and so is what all of them hold together (`max_queue` waiting jobs,
`max_queued_bytes`): past a tenant's bound a request is refused at once with QUOTA_EXCEEDED,
past the server's with BUSY, or PAYLOAD_TOO_LARGE when it could never fit.
"""

from __future__ import annotations

import collections
import enum
import heapq
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from wasmcore.protocol.errors import Busy, PayloadTooLarge, QuotaExceeded, WasmCoreError
from wasmcore.supervisor.config import TenantConfig
from wasmcore.supervisor.jobs import PendingJob

# A tenant's settings by name (Config.tenant): its weight and caps.
TenantPolicy = Callable[[str], TenantConfig]

# A busy worker is given more jobs only while the expected run time of those it already
# holds stays under this: one wake-up serves many quick jobs, and nobody's request waits
# long behind a slow or unknown one.
PREFETCH_BUDGET_MS = 2.0

# What a job of a binary with no measured run time is charged to its tenant when it is sent,
# until its real run time is known.
_UNKNOWN_COST_MS = 1.0
# Tenants with nothing pending are remembered (their record reused) while there are at most
# this many tenants in all.
IDLE_TENANTS_KEPT = 1024


class LaneState(enum.Enum):
    """What a worker's lane is doing after a reply."""

    BUSY = "busy"  # more jobs are queued on it
    IDLE = "idle"  # nothing to do; ready for the next job
    RECYCLE = "recycle"  # served its quota of executions: retire it
    DRAINED = "drained"  # it was stopped and its last job just ended: it may exit
    LEASED = "leased"  # its last job left it holding a direct-lane lease: not idle until returned


@dataclass(eq=False, slots=True)
class Lane:
    """A ready worker as the scheduler sees it: the jobs sent to it, in order."""

    worker_id: str
    recycle_after: int
    jobs: collections.deque[PendingJob] = field(default_factory=collections.deque)
    queued_ms: float = 0.0  # expected run time of `jobs`
    held: int = 0  # executions `jobs` stand for (a unit counts its executes)
    executions: int = 0
    accepting: bool = True  # False once the worker is stopped (retiring)
    unit_progress: int = 0  # the worker's count of unit executes started, last heard
    leased: bool = False  # it serves a client's direct lane: no jobs until it is returned


@dataclass(eq=False, slots=True)
class TenantQueue:
    """A tenant as the scheduler sees it (kept while it has jobs, and a while after): its
    FIFO, what it holds, and how much run time it has been given, which decides whose turn
    it is."""

    name: str
    config: TenantConfig
    jobs: collections.deque[PendingJob] = field(default_factory=collections.deque)
    pending: int = 0  # its executions queued or on a worker (a unit counts its executes)
    held_bytes: int = 0  # their size_bytes
    vtime: float = 0.0  # run time given, in ms divided by its weight (its virtual time)
    turn: int = 0  # which of its entries in the turn heap is the live one


def _any_tenant(name: str) -> TenantConfig:
    return TenantConfig()


class Scheduler:
    def __init__(self, max_queue: int, prefetch: int, deadline_grace_s: float,
                 max_queued_bytes: int = 1 << 62,
                 tenant_policy: TenantPolicy = _any_tenant) -> None:
        self.max_queue = max_queue
        self.prefetch = prefetch
        self.deadline_grace_s = deadline_grace_s
        self.max_queued_bytes = max_queued_bytes
        self._policy = tenant_policy
        self._lanes: dict[str, Lane] = {}
        # Ready workers with nothing to do, most recently idle last (popped first).
        self._idle: list[str] = []
        self._tenants: dict[str, TenantQueue] = {}
        # Tenants with queued jobs, least virtual time first: (vtime, entry number, tenant).
        # An entry is live while its number is the tenant's `turn`; a tenant whose vtime
        # moved since its entry was made is put back in place when its entry comes up.
        self._turns: list[tuple[float, int, TenantQueue]] = []
        self._entries = itertools.count(1)
        # The virtual time of the job sent last: where a tenant that starts queuing starts.
        self._vclock = 0.0
        self._queued = 0  # executions in all tenants' FIFOs (a unit counts its executes)
        self._held_bytes = 0  # size_bytes of every job queued or on a worker
        self._exec_ms: dict[str, float] = {}  # per binary: moving average of run time
        self._assignments: list[tuple[str, PendingJob]] = []
        self._failures: list[tuple[PendingJob, WasmCoreError]] = []

    def configure(self, max_queue: int, prefetch: int, deadline_grace_s: float,
                  max_queued_bytes: int | None = None,
                  tenant_policy: TenantPolicy | None = None) -> None:
        self.max_queue = max_queue
        self.prefetch = prefetch
        self.deadline_grace_s = deadline_grace_s
        if max_queued_bytes is not None:
            self.max_queued_bytes = max_queued_bytes
        if tenant_policy is not None:
            self._policy = tenant_policy
            for tenant in self._tenants.values():
                tenant.config = tenant_policy(tenant.name)

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
        return not lane.jobs and not lane.leased

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
        lane.held = 0
        tenant = self._tenants[head.tenant]
        self._settle(tenant, head, (now - head.started) * 1000)
        self._end(tenant, head, head_error)
        for job in reversed(waiting):
            tenant = self._tenants[job.tenant]
            self._settle(tenant, job, 0.0)  # never started: its tenant gets its charge back
            if not requeue or job.requeued or not job.retryable:
                self._end(tenant, job, waiting_error)
            else:
                job.requeued = True
                self._enqueue(tenant, job, front=True)
        self._dispatch_queue(now)

    def jobs_on(self, worker_id: str) -> int:
        lane = self._lanes.get(worker_id)
        return len(lane.jobs) if lane is not None else 0

    def executions_on(self, worker_id: str) -> int:
        lane = self._lanes.get(worker_id)
        return lane.executions if lane is not None else 0

    def is_leased(self, worker_id: str) -> bool:
        lane = self._lanes.get(worker_id)
        return lane is not None and lane.leased

    def busy_workers(self) -> list[str]:
        return [lane.worker_id for lane in self._lanes.values() if lane.jobs]

    # ------------------------------------------------------------------ jobs

    def submit(self, job: PendingJob, now: float, bounded: bool = True) -> None:
        """Run `job` on a worker now, or queue it in its tenant's FIFO. Refused (Busy, or
        PayloadTooLarge when it could never fit) past a bound of its tenant or of the server;
        `bounded` off: never refused, for work that must not be lost, such as a hot reload."""
        tenant = self._tenants.get(job.tenant)
        if tenant is None:
            tenant = TenantQueue(job.tenant, self._policy(job.tenant))  # kept by _hold
        if bounded:
            self._admit(tenant, job)
        if not self._queued:  # else it waits its turn: nobody overtakes a queued job
            estimate = self._estimate_ms(job)
            lane = self._pick_lane(estimate)
            if lane is not None:
                self._hold(tenant, job)
                tenant.vtime = max(tenant.vtime, self._vclock)
                self._assign(lane, tenant, job, now, estimate)
                return
        if bounded and self._queued + job.count > self.max_queue:
            raise Busy(
                f"all workers are busy and {self._queued} requests are queued; "
                "retry shortly",
                {"queue_depth": self._queued},
            )
        self._hold(tenant, job)
        if not tenant.jobs:  # its tenant's turn may come before those already queued
            self._enqueue(tenant, job)
            self._dispatch_queue(now)
        else:  # behind its tenant's own: whose turn it is and what can run did not change
            self._enqueue(tenant, job)

    def on_reply(self, worker_id: str, token: int, now: float,
                 leased: bool = False) -> tuple[PendingJob, LaneState] | None:
        """A worker answered job `token`: the job it ends and what its lane does next, or
        None for a reply nobody waits for any more (late, after a timeout or a loss): it
        must never answer anything else. `leased`: the worker kept a direct-lane lease with
        it, which the lane honours (LEASED) only if it would otherwise be idle with nothing
        queued; any other state means the caller revokes the lease."""
        lane = self._lanes.get(worker_id)
        if lane is None or not lane.jobs or lane.jobs[0].token != token:
            return None
        job = lane.jobs.popleft()
        lane.held -= job.count
        if not lane.jobs:
            lane.queued_ms = 0.0
        elif math.isinf(lane.queued_ms):  # inf - inf would be nan: recount
            lane.queued_ms = sum(j.estimate_ms for j in lane.jobs)
        else:
            lane.queued_ms = max(0.0, lane.queued_ms - job.estimate_ms)
        lane.executions += job.count
        elapsed_ms = (now - job.started) * 1000
        each_ms = elapsed_ms / job.count  # a unit's executes ran one after another
        for binary_id in job.binary_ids:
            previous = self._exec_ms.get(binary_id)
            self._exec_ms[binary_id] = (each_ms if previous is None
                                        else 0.8 * previous + 0.2 * each_ms)
        tenant = self._tenants[job.tenant]
        self._settle(tenant, job, elapsed_ms)
        self._release(tenant, job)
        if lane.jobs:
            # The queue is served when a lane runs dry, not at every reply: a dry lane takes
            # up to `prefetch` quick jobs in one pack, where topping up one job per reply sent
            # a pack per reply and cost a sixth of the throughput (measured, 25k -> 30k
            # executions/s). A queued job still waits at most one lane's quick backlog, and
            # new requests queue behind it (see `submit`), so nobody overtakes it.
            self._start_clock(lane.jobs[0], now)
            return job, LaneState.BUSY
        if not lane.accepting:
            return job, LaneState.DRAINED
        if lane.executions >= lane.recycle_after:
            lane.accepting = False
            return job, LaneState.RECYCLE
        if leased and not self._queued:
            lane.leased = True
            return job, LaneState.LEASED
        self._become_idle(lane, now)
        return job, LaneState.BUSY if lane.jobs else LaneState.IDLE

    def lease_returned(self, worker_id: str, tenant_name: str, executions: int,
                       busy_ms: float, now: float) -> LaneState | None:
        """A direct-lane lease on `worker_id` is over, having run `executions` for
        `tenant_name` in `busy_ms`: charged to the tenant's share and the worker's count.
        What the lane does next, or None when it was not held as leased (it had been given
        jobs, which ended the lease, or it is gone)."""
        tenant = self._tenants.get(tenant_name)
        if tenant is not None:
            # Later, never earlier: a queued entry is put back in place when it comes up.
            tenant.vtime += busy_ms / tenant.config.weight
        lane = self._lanes.get(worker_id)
        if lane is None:
            return None
        lane.executions += executions
        if not lane.leased:
            return None
        lane.leased = False
        if not lane.accepting:
            return LaneState.DRAINED
        if lane.executions >= lane.recycle_after:
            lane.accepting = False
            return LaneState.RECYCLE
        self._become_idle(lane, now)
        return LaneState.BUSY if lane.jobs else LaneState.IDLE

    def progress(self, worker_id: str, unit_progress: int, now: float) -> None:
        """A worker's heartbeat says how many executes of units it has started, ever. While
        that grows, the unit running on it is alive: its deadline moves to one execute's
        budget from now (never past the whole unit's), so a unit of long executes is not
        declared lost early, and one that hangs is found one execute's budget (plus the
        grace and a heartbeat) after it stopped moving, not after the whole unit's."""
        lane = self._lanes.get(worker_id)
        if lane is None:
            return
        seen, lane.unit_progress = lane.unit_progress, unit_progress
        if unit_progress == seen or not lane.jobs:
            return
        head = lane.jobs[0]
        if head.steps > 1:
            each_s = head.budget_s / head.steps
            head.deadline = (min(head.started + head.budget_s, now + each_s)
                             + self.deadline_grace_s)

    def expired(self, now: float) -> list[tuple[str, PendingJob]]:
        """Workers whose running job passed its deadline, with that job. The caller kills the
        worker and ends its jobs through `release_worker`."""
        return [(lane.worker_id, lane.jobs[0]) for lane in self._lanes.values()
                if lane.jobs and now > lane.jobs[0].deadline]

    def cancel_queued(self, error: WasmCoreError) -> int:
        """Fail every job that has not reached a worker; how many there were."""
        count = self._queued
        for tenant in list(self._tenants.values()):
            while tenant.jobs:
                self._end(tenant, tenant.jobs.popleft(), error)
        self._queued = 0
        self._turns.clear()
        return count

    def tenant_usage(self, tenant: str) -> tuple[int, int]:
        """(jobs queued or running, bytes they hold) of one tenant."""
        queue = self._tenants.get(tenant)
        return (queue.pending, queue.held_bytes) if queue is not None else (0, 0)

    @property
    def tenants_tracked(self) -> int:
        """Tenants the scheduler keeps a record of (those with jobs, and some idle ones)."""
        return len(self._tenants)

    @property
    def queue_depth(self) -> int:
        return self._queued

    @property
    def idle_workers(self) -> int:
        """Ready workers with nothing to do (an upper bound: a stale entry is skipped when
        popped)."""
        return len(self._idle)

    @property
    def queued_bytes(self) -> int:
        """Bytes held for every job queued or on a worker."""
        return self._held_bytes

    @property
    def in_flight(self) -> int:
        """Executions on workers (a unit counts its executes)."""
        return sum(lane.held for lane in self._lanes.values())

    def unit_size(self, binary_id: str, most: int) -> int:
        """How many executes of `binary_id` may run as one unit (one job, one after another
        on one worker), at most `most`: as many as its measured run time fits in the
        prefetch budget, so a unit holds a worker no longer than the quick jobs prefetched
        behind each other would. 1 (no unit) for a binary not yet measured, or slow: nothing
        waits behind those."""
        each_ms = self._exec_ms.get(binary_id)
        if each_ms is None or most <= 1:
            return 1
        if each_ms <= 0.0:
            return most
        return max(1, min(most, int(PREFETCH_BUDGET_MS / each_ms)))

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
                    and lane.executions + lane.held < lane.recycle_after
                    and (best is None or lane.queued_ms < best.queued_ms)):
                best = lane
        return best

    def _estimate_ms(self, job: PendingJob) -> float:
        """Expected run time from the binaries' moving averages; unknown counts as slow."""
        if job.on_done is not None:
            return math.inf
        return sum(self._exec_ms.get(b, math.inf) for b in job.binary_ids) * job.count

    def _assign(self, lane: Lane, tenant: TenantQueue, job: PendingJob, now: float,
                estimate_ms: float) -> None:
        self._assignments.append((lane.worker_id, job))
        lane.jobs.append(job)
        lane.held += job.count
        job.estimate_ms = estimate_ms
        lane.queued_ms += estimate_ms
        if len(lane.jobs) == 1:
            self._start_clock(job, now)
        # Charged now what it is expected to cost, settled to what it took when it ends: its
        # tenant's next job waits its turn meanwhile. A job of unknown cost is charged little
        # (it goes only to an idle worker, so few are ever in flight): charging all it may
        # take would move the virtual clock, and with it every newcomer, far ahead of what
        # was really run once it settles.
        cost = _UNKNOWN_COST_MS if math.isinf(estimate_ms) else estimate_ms
        job.charged_ms = min(cost, job.budget_s * 1000)
        if tenant.vtime > self._vclock:
            self._vclock = tenant.vtime
        tenant.vtime += job.charged_ms / tenant.config.weight

    def _start_clock(self, job: PendingJob, now: float) -> None:
        job.started = now
        # A unit starts with one execute's budget; its worker's progress moves it (`progress`).
        budget_s = job.budget_s / job.steps
        job.deadline = now + budget_s + self.deadline_grace_s

    def _become_idle(self, lane: Lane, now: float) -> None:
        tenant = self._next_tenant()
        if tenant is not None:
            job = self._take(tenant)
            self._assign(lane, tenant, job, now, self._estimate_ms(job))
            self._dispatch_queue(now)
        else:
            self._idle.append(lane.worker_id)

    def _dispatch_queue(self, now: float) -> None:
        """Send queued jobs, in fair order, while workers can take them. It stops at the
        first job no worker can take (a slow one waits for an idle worker): a stream of
        quick jobs from others cannot keep every worker busy past it."""
        while (tenant := self._next_tenant()) is not None:
            estimate = self._estimate_ms(tenant.jobs[0])
            lane = self._pick_lane(estimate)
            if lane is None:
                return
            self._assign(lane, tenant, self._take(tenant), now, estimate)

    # ------------------------------------------------------------------ tenants

    def _admit(self, tenant: TenantQueue, job: PendingJob) -> None:
        """Raise if `job` would take its tenant or the server past a bound; changes nothing."""
        size = job.size_bytes
        config = tenant.config
        if (tenant.pending + job.count <= config.max_pending
                and tenant.held_bytes + size <= config.max_queued_bytes
                and self._held_bytes + size <= self.max_queued_bytes):
            return
        bounds = ((config.max_queued_bytes, "this tenant's [tenants] max_queued_bytes"),
                  (self.max_queued_bytes, "server.max_queued_bytes"))
        for limit, setting in bounds:
            if size > limit:
                raise PayloadTooLarge(
                    f"this request holds {size} bytes while it waits; {setting} allows "
                    f"{limit}: send less per request", {"size": size, "limit": limit})
        if tenant.pending + job.count > config.max_pending:
            raise QuotaExceeded(
                f"this tenant already has {tenant.pending} requests queued or running, its "
                f"quota (max_pending); wait for replies before sending more",
                {"quota": "max_pending", "limit": config.max_pending, "used": tenant.pending})
        if tenant.held_bytes + size > config.max_queued_bytes:
            raise QuotaExceeded(
                f"this tenant's requests waiting for a worker hold {tenant.held_bytes} bytes "
                f"and this one {size} more, past its quota (max_queued_bytes, "
                f"{config.max_queued_bytes}); wait for replies before sending more",
                {"quota": "max_queued_bytes", "limit": config.max_queued_bytes,
                 "used": tenant.held_bytes, "size": size})
        raise Busy(
            f"requests waiting for a worker hold {self._held_bytes} bytes and this one {size} "
            f"more, past server.max_queued_bytes ({self.max_queued_bytes}); retry shortly",
            {"queued_bytes": self._held_bytes, "size": size, "limit": self.max_queued_bytes})

    def _hold(self, tenant: TenantQueue, job: PendingJob) -> None:
        """`job` now counts against its tenant and the server until `_release`."""
        if tenant.pending == 0 and not tenant.jobs:
            self._tenants[tenant.name] = tenant
        tenant.pending += job.count
        tenant.held_bytes += job.size_bytes
        self._held_bytes += job.size_bytes

    def _release(self, tenant: TenantQueue, job: PendingJob) -> None:
        tenant.pending -= job.count
        tenant.held_bytes -= job.size_bytes
        self._held_bytes -= job.size_bytes
        # An idle tenant is kept for its next request (most send again soon), up to a
        # bound: names are the clients' to choose.
        if (tenant.pending == 0 and not tenant.jobs
                and len(self._tenants) > IDLE_TENANTS_KEPT):
            del self._tenants[tenant.name]

    def _end(self, tenant: TenantQueue, job: PendingJob, error: WasmCoreError) -> None:
        self._failures.append((job, error))
        self._release(tenant, job)

    def _settle(self, tenant: TenantQueue, job: PendingJob, elapsed_ms: float) -> None:
        """Correct what `job`'s tenant was charged to what it really took."""
        delta = (elapsed_ms - job.charged_ms) / tenant.config.weight
        job.charged_ms = 0.0
        tenant.vtime += delta
        if delta < 0 and tenant.jobs:
            self._push_turn(tenant)  # earlier than its entry says: a new one, the old is dead

    def _enqueue(self, tenant: TenantQueue, job: PendingJob, front: bool = False) -> None:
        if not tenant.jobs:
            tenant.vtime = max(tenant.vtime, self._vclock)  # no credit for having been idle
            self._push_turn(tenant)
        if front:
            tenant.jobs.appendleft(job)
        else:
            tenant.jobs.append(job)
        self._queued += job.count

    def _take(self, tenant: TenantQueue) -> PendingJob:
        """Its next job leaves the queue (its entry is corrected when it next comes up)."""
        job = tenant.jobs.popleft()
        self._queued -= job.count
        return job

    def _push_turn(self, tenant: TenantQueue) -> None:
        tenant.turn = next(self._entries)
        heapq.heappush(self._turns, (tenant.vtime, tenant.turn, tenant))

    def _next_tenant(self) -> TenantQueue | None:
        """The tenant with queued jobs and the least virtual time, or None."""
        turns = self._turns
        while turns:
            key, entry, tenant = turns[0]
            if entry != tenant.turn or not tenant.jobs:
                heapq.heappop(turns)  # dead: replaced, or its tenant has nothing queued
            elif key != tenant.vtime:  # charged or settled since: back in its real place
                tenant.turn = next(self._entries)
                heapq.heapreplace(turns, (tenant.vtime, tenant.turn, tenant))
            else:
                return tenant
        return None
