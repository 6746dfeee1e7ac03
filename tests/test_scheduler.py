"""Scheduler unit tests: fake jobs, a fake clock (plain floats), no processes, no sockets.

The scheduler is pure logic: every method takes `now`, and its decisions accumulate in
`take_assignments()` / `take_failures()`, which is what these tests read.
"""

from __future__ import annotations

import itertools

import pytest

from wasmcore.protocol.errors import (
    Busy,
    PayloadTooLarge,
    QuotaExceeded,
    ShuttingDown,
    Timeout,
    WasmCoreError,
    WorkerLost,
)
from wasmcore.supervisor.config import TenantConfig
from wasmcore.supervisor.jobs import PendingJob
from wasmcore.supervisor.scheduler import (
    IDLE_TENANTS_KEPT,
    PREFETCH_BUDGET_MS,
    LaneState,
    Scheduler,
)

QUICK = "quick-binary"  # taught to run in QUICK_MS before the jobs under test
QUICK_MS = 0.01
UNKNOWN = "never-run-binary"  # no run time known: counts as slow
GRACE_S = 0.5
BUDGET_S = 1.0

HEAD_ERROR = WorkerLost("head job lost")
WAITING_ERROR = WorkerLost("waiting job lost")

_tokens = itertools.count(1)


def make_job(binary: str = QUICK, budget_s: float = BUDGET_S, retryable: bool = True,
             tenant: str = "default", size_bytes: int = 0) -> PendingJob:
    """A run job of one binary, with a fresh token."""
    token = next(_tokens)
    return PendingJob(token=token, envelope=None, request_id=token, header=b"", payload=None,
                      budget_s=budget_s, binary_ids=[binary], retryable=retryable,
                      tenant=tenant, size_bytes=size_bytes)


def make_scheduler(max_queue: int = 100, prefetch: int = 8, max_queued_bytes: int = 1 << 40,
                   tenants: dict[str, TenantConfig] | None = None) -> Scheduler:
    """A scheduler whose tenants get `tenants[name]`, else `tenants["default"]`, else the
    built-in TenantConfig()."""
    table = tenants or {}

    def policy(name: str) -> TenantConfig:
        return table.get(name) or table.get("default") or TenantConfig()

    return Scheduler(max_queue=max_queue, prefetch=prefetch, deadline_grace_s=GRACE_S,
                     max_queued_bytes=max_queued_bytes, tenant_policy=policy)


def teach(sched: Scheduler, worker_id: str, binary: str, run_ms: float, now: float) -> float:
    """Run one job of `binary` on the idle `worker_id`, answered `run_ms` later, so the
    scheduler has a run-time estimate for it. Returns the time after the reply."""
    job = make_job(binary)
    sched.submit(job, now)
    assert sched.take_assignments() == [(worker_id, job)], "teach needs an idle worker"
    done = now + run_ms / 1000
    outcome = sched.on_reply(worker_id, job.token, done)
    assert outcome is not None and outcome[0] is job
    return done


def assigned(sched: Scheduler) -> dict[int, str]:
    """Take the assignments decided so far: job token -> worker id."""
    return {job.token: worker_id for worker_id, job in sched.take_assignments()}


def failures(sched: Scheduler) -> list[tuple[int, WasmCoreError]]:
    """Take the failures decided so far: (job token, error), in order."""
    return [(job.token, error) for job, error in sched.take_failures()]


def quick_pool(workers: list[str], prefetch: int = 8, now: float = 0.0) -> Scheduler:
    """A scheduler with `workers` ready (added in this order) that knows QUICK is quick."""
    sched = make_scheduler(prefetch=prefetch)
    for worker_id in workers:
        sched.add_worker(worker_id, recycle_after=1_000, now=now)
    # The last added is the most recently idle one: teach on it, it goes back on top.
    teach(sched, workers[-1], QUICK, QUICK_MS, now)
    assert sched.take_failures() == []
    return sched


# --------------------------------------------------------------------------- lost workers


def test_waiting_job_is_requeued_at_most_once() -> None:
    """A job parked behind a lost head runs elsewhere once; if that worker is lost too, it
    fails with the waiting error instead of going round again (it may be what kills them)."""
    sched = quick_pool(["w1", "w2"])
    head_a, head_b, waiting = make_job(), make_job(), make_job()
    for job in (head_a, head_b, waiting):
        sched.submit(job, 1.0)
    where = assigned(sched)
    first = where[waiting.token]
    other = "w2" if first == "w1" else "w1"
    assert sched.jobs_on(first) == 2 and sched.jobs_on(other) == 1
    first_head = head_a if where[head_a.token] == first else head_b
    other_head = head_b if first_head is head_a else head_a

    sched.release_worker(first, HEAD_ERROR, WAITING_ERROR, 2.0)

    assert failures(sched) == [(first_head.token, HEAD_ERROR)]
    assert waiting.requeued
    # Requeued, and at once prefetched behind the other worker's (quick) head.
    assert assigned(sched) == {waiting.token: other}
    assert sched.jobs_on(other) == 2

    sched.release_worker(other, HEAD_ERROR, WAITING_ERROR, 3.0)

    assert failures(sched) == [(other_head.token, HEAD_ERROR), (waiting.token, WAITING_ERROR)]
    assert sched.queue_depth == 0 and sched.in_flight == 0
    assert sched.take_assignments() == []


def test_requeued_jobs_keep_their_order_ahead_of_the_queue() -> None:
    """Jobs that were already on a worker go back to the front of the queue, in order."""
    sched = quick_pool(["w1"], prefetch=3)
    head, second, third, queued = make_job(), make_job(), make_job(), make_job()
    for job in (head, second, third, queued):
        sched.submit(job, 1.0)
    assert sched.jobs_on("w1") == 3 and sched.queue_depth == 1

    sched.release_worker("w1", HEAD_ERROR, WAITING_ERROR, 2.0)
    assert failures(sched) == [(head.token, HEAD_ERROR)]
    assert sched.queue_depth == 3
    sched.take_assignments()

    sched.add_worker("w2", recycle_after=1_000, now=3.0)
    order = [job.token for _, job in sched.take_assignments()]
    assert order == [second.token, third.token, queued.token]


def test_job_that_is_not_retryable_is_never_requeued() -> None:
    """A job whose run may have destroyed its input fails with the waiting error instead of
    being run a second time."""
    sched = quick_pool(["w1"])
    head, fragile, retryable = make_job(), make_job(retryable=False), make_job()
    for job in (head, fragile, retryable):
        sched.submit(job, 1.0)
    assert sched.jobs_on("w1") == 3

    sched.release_worker("w1", HEAD_ERROR, WAITING_ERROR, 2.0)

    assert failures(sched) == [(head.token, HEAD_ERROR), (fragile.token, WAITING_ERROR)]
    assert not fragile.requeued
    assert retryable.requeued
    assert sched.queue_depth == 1


def test_nothing_is_requeued_at_shutdown() -> None:
    """With requeue=False every job on the lost worker ends, head and waiting alike."""
    sched = quick_pool(["w1"])
    head, waiting_1, waiting_2 = make_job(), make_job(), make_job()
    for job in (head, waiting_1, waiting_2):
        sched.submit(job, 1.0)
    assert sched.jobs_on("w1") == 3
    sched.take_assignments()

    sched.release_worker("w1", HEAD_ERROR, WAITING_ERROR, 2.0, requeue=False)

    ended = failures(sched)
    assert ended[0] == (head.token, HEAD_ERROR)
    # (The waiting ones end in reverse order: release_worker walks them backwards.)
    assert sorted(ended[1:]) == [(waiting_1.token, WAITING_ERROR),
                                 (waiting_2.token, WAITING_ERROR)]
    assert sched.queue_depth == 0 and sched.in_flight == 0
    assert sched.take_assignments() == []


def test_released_idle_worker_gets_no_more_jobs() -> None:
    """A worker that exits while idle is forgotten: nothing fails, new jobs wait in the
    queue, and its counters are gone."""
    sched = make_scheduler()
    sched.add_worker("w1", recycle_after=1_000, now=0.0)
    teach(sched, "w1", QUICK, QUICK_MS, 0.0)
    assert sched.executions_on("w1") == 1
    sched.release_worker("w1", HEAD_ERROR, WAITING_ERROR, 1.0)
    assert failures(sched) == []
    assert sched.executions_on("w1") == 0
    sched.submit(make_job(), 2.0)
    assert sched.take_assignments() == []
    assert sched.queue_depth == 1


# --------------------------------------------------------------------------- stale replies


def test_stale_reply_after_timeout_never_answers_a_later_request() -> None:
    """Job A times out and its worker is released; job B runs on another worker. A's late
    reply, from its old worker or (by token) from the new one, answers nothing: B stays in
    flight until its own token arrives."""
    sched = make_scheduler()
    sched.add_worker("new", recycle_after=1_000, now=0.0)
    sched.add_worker("old", recycle_after=1_000, now=0.0)  # most recently idle: taken first
    job_a = make_job(UNKNOWN)
    sched.submit(job_a, 10.0)
    assert assigned(sched) == {job_a.token: "old"}

    assert sched.expired(10.0 + BUDGET_S) == []
    late = 10.0 + BUDGET_S + GRACE_S + 0.01
    assert sched.expired(late) == [("old", job_a)]
    timeout = Timeout("too slow")
    sched.release_worker("old", timeout, WAITING_ERROR, late)  # what the server does
    assert failures(sched) == [(job_a.token, timeout)]

    job_b = make_job(UNKNOWN)
    sched.submit(job_b, late)
    assert assigned(sched) == {job_b.token: "new"}

    assert sched.on_reply("old", job_a.token, late + 0.1) is None
    assert sched.on_reply("new", job_a.token, late + 0.1) is None
    assert sched.in_flight == 1 and sched.jobs_on("new") == 1
    assert sched.expired(late + 0.2) == []

    outcome = sched.on_reply("new", job_b.token, late + 0.3)
    assert outcome == (job_b, LaneState.IDLE)
    assert sched.in_flight == 0


def test_reply_with_wrong_token_leaves_head_job_in_place() -> None:
    """A reply naming a token that is not the lane's head changes nothing; the right token
    still ends the job afterwards."""
    sched = make_scheduler()
    sched.add_worker("w1", recycle_after=1_000, now=0.0)
    job = make_job(UNKNOWN)
    sched.submit(job, 1.0)
    sched.take_assignments()

    assert sched.on_reply("w1", job.token + 12_345, 1.1) is None
    assert sched.jobs_on("w1") == 1 and sched.executions_on("w1") == 0
    assert sched.expired(1.0 + BUDGET_S + GRACE_S + 0.01) == [("w1", job)]

    assert sched.on_reply("w1", job.token, 1.2) == (job, LaneState.IDLE)
    assert sched.executions_on("w1") == 1


def test_reply_from_unknown_worker_is_ignored() -> None:
    """A reply from a worker the scheduler never had (or already released) is dropped."""
    sched = make_scheduler()
    assert sched.on_reply("ghost", 1, 0.0) is None


# --------------------------------------------------------------------------- prefetch


def test_prefetch_never_exceeds_its_depth() -> None:
    """With prefetch=N and quick jobs, a busy worker holds at most N jobs at any moment while
    a backlog drains; the rest wait in the queue."""
    depth = 3
    sched = quick_pool(["w1"], prefetch=depth)
    jobs = [make_job() for _ in range(10)]
    now = 1.0
    for job in jobs:
        sched.submit(job, now)
    assert sched.jobs_on("w1") == depth
    assert sched.queue_depth == len(jobs) - depth

    answered: list[int] = []
    sent = [job.token for _, job in sched.take_assignments()]
    for _ in range(len(jobs)):
        now += QUICK_MS / 1000
        head = sent[len(answered)]
        outcome = sched.on_reply("w1", head, now)
        assert outcome is not None and outcome[0].token == head
        answered.append(head)
        sent += [job.token for _, job in sched.take_assignments()]
        assert sched.jobs_on("w1") <= depth
    assert answered == [job.token for job in jobs]
    assert sched.in_flight == 0 and sched.queue_depth == 0


def test_prefetch_respects_the_run_time_budget() -> None:
    """More jobs go to a busy worker only while the expected run time of those it already
    holds is under PREFETCH_BUDGET_MS."""
    job_ms = 0.4 * PREFETCH_BUDGET_MS
    sched = make_scheduler(prefetch=64)
    sched.add_worker("w1", recycle_after=1_000, now=0.0)
    teach(sched, "w1", "medium", job_ms, 0.0)
    jobs = [make_job("medium") for _ in range(6)]
    for job in jobs:
        sched.submit(job, 1.0)
    # Held before each assignment, in budgets: 0, 0.4, 0.8 (all under 1: sent), then 1.2.
    held = 3
    assert sched.jobs_on("w1") == held
    assert sched.queue_depth == len(jobs) - held
    assert [job.token for _, job in sched.take_assignments()] == [j.token for j in jobs[:held]]

    # A reply frees its share of the budget: holding 0.8 budgets again, the lane takes the
    # next job (queue emptied first, so only the budget decides).
    assert sched.cancel_queued(WAITING_ERROR) == len(jobs) - held
    outcome = sched.on_reply("w1", jobs[0].token, 1.0 + job_ms / 1000)
    assert outcome == (jobs[0], LaneState.BUSY)
    late = make_job("medium")
    sched.submit(late, 1.1)
    assert sched.take_assignments() == [("w1", late)]
    assert sched.jobs_on("w1") == held


def test_nothing_is_queued_behind_a_job_of_an_unknown_binary() -> None:
    """A never-run binary counts as slow: while it runs, other jobs wait in the queue (or go
    to an idle worker) rather than behind it."""
    sched = quick_pool(["w1"])
    unknown = make_job(UNKNOWN)
    sched.submit(unknown, 1.0)
    quick = [make_job(), make_job()]
    for job in quick:
        sched.submit(job, 1.0)
    assert sched.jobs_on("w1") == 1
    assert sched.queue_depth == 2

    sched.add_worker("w2", recycle_after=1_000, now=1.5)
    assert assigned(sched) == {unknown.token: "w1", quick[0].token: "w2", quick[1].token: "w2"}


def test_compile_jobs_count_as_slow() -> None:
    """A job with its own completion (a compile) is never prefetched behind, even when its
    binaries are known to be quick."""
    sched = quick_pool(["w1"])
    compile_job = make_job()
    compile_job.on_done = lambda code, done, frames: None
    sched.submit(compile_job, 1.0)
    sched.submit(make_job(), 1.0)
    assert sched.jobs_on("w1") == 1
    assert sched.queue_depth == 1


def test_job_of_unknown_binary_is_not_parked_behind_a_quick_job() -> None:
    """A job of a never-run binary waits in the queue rather than behind a busy worker's
    quick head."""
    sched = quick_pool(["w1"])
    sched.submit(make_job(), 1.0)
    unknown = make_job(UNKNOWN)
    sched.submit(unknown, 1.0)
    assert sched.jobs_on("w1") == 1
    assert sched.queue_depth == 1


def test_queued_job_is_not_overtaken_by_newer_jobs() -> None:
    """Under steady load (each reply followed by a new request) a job already waiting in the
    queue is sent to a worker before the requests that arrive after it."""
    sched = quick_pool(["w1"], prefetch=2)
    for _ in range(2):
        sched.submit(make_job(), 1.0)
    waiting = make_job()
    sched.submit(waiting, 1.0)
    assert sched.queue_depth == 1
    on_lane = [job for _, job in sched.take_assignments()]  # sent to w1, not answered yet
    now = 1.0
    for _ in range(20):
        now += 0.001
        head = on_lane.pop(0)
        assert sched.on_reply("w1", head.token, now) is not None
        sched.submit(make_job(), now)
        on_lane += [job for _, job in sched.take_assignments()]
        if waiting in on_lane:
            break
    assert waiting in on_lane, "the queued job was overtaken by every newer one"


# --------------------------------------------------------------------------- idle choice, queue


def test_most_recently_idle_worker_gets_the_next_job() -> None:
    """LIFO: the worker that went idle last (warm caches) takes the next job."""
    sched = make_scheduler()
    sched.add_worker("w1", recycle_after=1_000, now=0.0)
    sched.add_worker("w2", recycle_after=1_000, now=0.0)
    first, second = make_job(UNKNOWN), make_job(UNKNOWN)
    sched.submit(first, 1.0)
    sched.submit(second, 1.0)
    assert assigned(sched) == {first.token: "w2", second.token: "w1"}

    assert sched.on_reply("w2", first.token, 1.1) == (first, LaneState.IDLE)
    assert sched.on_reply("w1", second.token, 1.2) == (second, LaneState.IDLE)
    third = make_job(UNKNOWN)
    sched.submit(third, 2.0)
    assert assigned(sched) == {third.token: "w1"}


def test_queue_bound_raises_busy() -> None:
    """With every worker busy, `max_queue` jobs wait; the next bounded submit is refused."""
    sched = make_scheduler(max_queue=2)
    sched.add_worker("w1", recycle_after=1_000, now=0.0)
    for _ in range(3):  # one runs, two wait
        sched.submit(make_job(UNKNOWN), 1.0)
    assert sched.queue_depth == 2
    with pytest.raises(Busy) as refused:
        sched.submit(make_job(UNKNOWN), 1.0)
    assert refused.value.details == {"queue_depth": 2}
    assert sched.queue_depth == 2


def test_unbounded_submit_is_never_refused() -> None:
    """bounded=False (work that must not be lost) queues past max_queue."""
    sched = make_scheduler(max_queue=1)
    sched.add_worker("w1", recycle_after=1_000, now=0.0)
    sched.submit(make_job(UNKNOWN), 1.0)
    sched.submit(make_job(UNKNOWN), 1.0)
    sched.submit(make_job(UNKNOWN), 1.0, bounded=False)
    sched.submit(make_job(UNKNOWN), 1.0, bounded=False)
    assert sched.queue_depth == 3


def test_cancel_queued_fails_only_jobs_not_on_a_worker() -> None:
    """cancel_queued ends every queued job with the error, in order, and leaves running
    jobs alone."""
    sched = make_scheduler()
    sched.add_worker("w1", recycle_after=1_000, now=0.0)
    running = make_job(UNKNOWN)
    sched.submit(running, 1.0)
    queued = [make_job(UNKNOWN) for _ in range(3)]
    for job in queued:
        sched.submit(job, 1.0)
    error = ShuttingDown("bye")

    assert sched.cancel_queued(error) == 3

    assert failures(sched) == [(job.token, error) for job in queued]
    assert sched.queue_depth == 0
    assert sched.in_flight == 1
    assert sched.on_reply("w1", running.token, 1.5) == (running, LaneState.IDLE)
    assert sched.take_assignments() == [("w1", running)]


# --------------------------------------------------------------------------- deadlines


def test_deadline_is_start_plus_budget_plus_grace() -> None:
    """A job's deadline is when it reached a worker plus its budget plus the grace; it is
    reported by `expired` only after that."""
    sched = make_scheduler()
    sched.add_worker("w1", recycle_after=1_000, now=0.0)
    job = make_job(UNKNOWN, budget_s=2.0)
    sched.submit(job, 5.0)
    assert job.started == 5.0
    assert job.deadline == pytest.approx(5.0 + 2.0 + GRACE_S)
    assert sched.expired(5.0 + 2.0 + GRACE_S - 0.01) == []
    assert sched.expired(5.0 + 2.0 + GRACE_S + 0.01) == [("w1", job)]


def test_clock_starts_when_a_job_reaches_the_head_of_its_lane() -> None:
    """A prefetched job's deadline runs from the reply that put it at the head of its lane,
    not from when it was sent."""
    sched = quick_pool(["w1"])
    head, behind = make_job(), make_job()
    sched.submit(head, 10.0)
    sched.submit(behind, 10.2)
    assert sched.jobs_on("w1") == 2
    assert behind.deadline == 0.0 and behind.started == 0.0  # not started yet

    assert sched.on_reply("w1", head.token, 10.3) == (head, LaneState.BUSY)

    assert behind.started == 10.3
    assert behind.deadline == pytest.approx(10.3 + BUDGET_S + GRACE_S)
    assert sched.expired(10.2 + BUDGET_S + GRACE_S + 0.05) == []
    assert sched.expired(10.3 + BUDGET_S + GRACE_S + 0.05) == [("w1", behind)]


def test_configure_changes_the_grace_of_later_jobs() -> None:
    """configure() takes a new grace (and queue bound) for jobs started afterwards."""
    sched = make_scheduler(max_queue=0)
    sched.configure(max_queue=5, prefetch=8, deadline_grace_s=3.0)
    sched.add_worker("w1", recycle_after=1_000, now=0.0)
    job = make_job(UNKNOWN)
    sched.submit(job, 1.0)
    assert job.deadline == pytest.approx(1.0 + BUDGET_S + 3.0)
    sched.submit(make_job(UNKNOWN), 1.0)  # would be Busy with the old max_queue=0
    assert sched.queue_depth == 1


# --------------------------------------------------------------------------- recycle, drain


def test_worker_is_recycled_after_its_quota_of_executions() -> None:
    """The reply that completes `recycle_after` executions says RECYCLE, and the worker takes
    no more jobs."""
    sched = make_scheduler()
    sched.add_worker("w1", recycle_after=3, now=0.0)
    states = []
    for i in range(3):
        job = make_job(UNKNOWN)
        sched.submit(job, float(i))
        outcome = sched.on_reply("w1", job.token, i + 0.5)
        assert outcome is not None
        states.append(outcome[1])
    assert states == [LaneState.IDLE, LaneState.IDLE, LaneState.RECYCLE]
    sched.take_assignments()

    sched.submit(make_job(UNKNOWN), 4.0)
    assert sched.take_assignments() == []
    assert sched.queue_depth == 1


def test_prefetch_stops_at_the_recycle_quota() -> None:
    """A worker is never sent more jobs than it has executions left before it recycles."""
    sched = make_scheduler()
    sched.add_worker("w1", recycle_after=3, now=0.0)
    teach(sched, "w1", QUICK, QUICK_MS, 0.0)  # one execution used
    jobs = [make_job() for _ in range(3)]
    for job in jobs:
        sched.submit(job, 1.0)
    assert sched.jobs_on("w1") == 2
    assert sched.queue_depth == 1

    assert sched.on_reply("w1", jobs[0].token, 1.1) == (jobs[0], LaneState.BUSY)
    assert sched.on_reply("w1", jobs[1].token, 1.2) == (jobs[1], LaneState.RECYCLE)
    assert sched.queue_depth == 1


def test_stopped_worker_with_jobs_reports_drained() -> None:
    """stop_worker on a busy lane: no new jobs go to it, and its last reply says DRAINED."""
    sched = make_scheduler()
    sched.add_worker("w1", recycle_after=1_000, now=0.0)
    running = make_job(UNKNOWN)
    sched.submit(running, 1.0)
    sched.take_assignments()

    assert sched.stop_worker("w1") is False
    later = make_job(UNKNOWN)
    sched.submit(later, 1.1)
    assert sched.take_assignments() == []

    assert sched.on_reply("w1", running.token, 1.2) == (running, LaneState.DRAINED)
    assert sched.take_assignments() == []
    assert sched.queue_depth == 1


def test_stopped_idle_worker_may_exit_at_once() -> None:
    """stop_worker on an idle lane (or an unknown worker) says it may exit now, and the
    idle worker is no longer chosen."""
    sched = make_scheduler()
    sched.add_worker("w1", recycle_after=1_000, now=0.0)
    assert sched.stop_worker("w1") is True
    assert sched.stop_worker("ghost") is True
    sched.submit(make_job(UNKNOWN), 1.0)
    assert sched.take_assignments() == []
    assert sched.queue_depth == 1


def test_new_worker_takes_queued_work_at_once() -> None:
    """A worker that says ready while jobs wait starts on the oldest one and prefetches quick
    ones behind it, up to its depth."""
    sched = quick_pool(["w1"], prefetch=4)
    blocker = make_job(UNKNOWN)
    sched.submit(blocker, 1.0)
    waiting = [make_job() for _ in range(6)]
    for job in waiting:
        sched.submit(job, 1.0)
    assert sched.queue_depth == 6
    sched.take_assignments()

    sched.add_worker("w2", recycle_after=1_000, now=2.0)
    assert assigned(sched) == {job.token: "w2" for job in waiting[:4]}
    assert sched.queue_depth == 2


# --------------------------------------------------------------------------- tenants


def run_one_at_a_time(sched: Scheduler, worker_id: str, sent: list[PendingJob], replies: int,
                      run_ms: float, now: float) -> tuple[list[PendingJob], float]:
    """Answer `replies` jobs on `worker_id` one after another, each `run_ms` after the last;
    every job the scheduler sends meanwhile is appended to `sent`. Returns the jobs in the
    order they ended, and the time after the last reply."""
    ended: list[PendingJob] = []
    sent += [job for _, job in sched.take_assignments()]
    for _ in range(replies):
        head = next(job for job in sent if job not in ended)
        now += run_ms / 1000
        outcome = sched.on_reply(worker_id, head.token, now)
        assert outcome is not None and outcome[0] is head
        ended.append(head)
        sent += [job for _, job in sched.take_assignments()]
    return ended, now


def test_weights_shape_service_between_two_flooding_tenants() -> None:
    """Tenants A (weight 3) and B (weight 1) both keep far more jobs queued than the worker
    can run: of every four jobs run, three are A's and one is B's."""
    sched = make_scheduler(max_queue=1_000, prefetch=1, tenants={
        "a": TenantConfig(weight=3), "b": TenantConfig(weight=1)})
    sched.add_worker("w1", recycle_after=10_000, now=0.0)
    now = teach(sched, "w1", "slow-a", 5.0, 0.0)
    now = teach(sched, "w1", "slow-b", 5.0, now)
    for _ in range(100):
        sched.submit(make_job("slow-a", tenant="a"), now)
        sched.submit(make_job("slow-b", tenant="b"), now)
    sent: list[PendingJob] = []
    ended, _ = run_one_at_a_time(sched, "w1", sent, 80, 5.0, now)
    tenants = [job.tenant for job in ended]
    assert abs(tenants.count("a") - 60) <= 2, tenants
    for start in range(0, 80, 8):  # no long run of one tenant anywhere
        window = tenants[start:start + 8]
        assert window.count("b") >= 1 and window.count("a") >= 5, tenants


def test_equal_weights_share_by_run_time_not_by_count() -> None:
    """Fair share is of the workers' time: a tenant whose jobs take four times longer gets
    about a quarter as many of them run while both flood."""
    sched = make_scheduler(max_queue=1_000, prefetch=1)
    sched.add_worker("w1", recycle_after=10_000, now=0.0)
    now = teach(sched, "w1", "long", 20.0, 0.0)
    now = teach(sched, "w1", "short", 5.0, now)
    for _ in range(100):
        sched.submit(make_job("long", tenant="a"), now)
        sched.submit(make_job("short", tenant="b"), now)
    sent: list[PendingJob] = []
    ended: list[PendingJob] = []
    for _ in range(50):  # each reply after the job's own run time
        sent += [job for _, job in sched.take_assignments()]
        head = next(job for job in sent if job not in ended)
        now += (20.0 if head.tenant == "a" else 5.0) / 1000
        assert sched.on_reply("w1", head.token, now) is not None
        ended.append(head)
    a_ms = 20.0 * sum(1 for job in ended if job.tenant == "a")
    b_ms = 5.0 * sum(1 for job in ended if job.tenant == "b")
    assert 0.7 < a_ms / b_ms < 1.4, (a_ms, b_ms)


def test_a_single_request_goes_before_a_flooding_tenants_queue() -> None:
    """Tenant A has 50 jobs queued; B's one request is the next to run, not the 51st."""
    sched = make_scheduler(max_queue=1_000, prefetch=1)
    sched.add_worker("w1", recycle_after=10_000, now=0.0)
    now = teach(sched, "w1", "slow", 5.0, 0.0)
    for _ in range(50):
        sched.submit(make_job("slow", tenant="a"), now)
    sent = [job for _, job in sched.take_assignments()]
    ended, now = run_one_at_a_time(sched, "w1", sent, 3, 5.0, now)
    lone = make_job(UNKNOWN, tenant="b")
    sched.submit(lone, now)
    assert sched.take_assignments() == []  # the worker is busy: it waits, at the front
    head = next(job for job in sent if job not in ended)
    assert sched.on_reply("w1", head.token, now + 0.005) is not None
    assert sched.take_assignments() == [("w1", lone)]
    assert sched.queue_depth == 50 - 4  # four of a's were sent, one is answered


def test_each_tenant_is_served_in_fifo_order() -> None:
    """Whatever the interleaving between tenants, each tenant's jobs run in the order they
    were submitted."""
    sched = make_scheduler(max_queue=1_000, prefetch=1, tenants={
        "a": TenantConfig(weight=2), "b": TenantConfig(weight=1), "c": TenantConfig(weight=5)})
    sched.add_worker("w1", recycle_after=10_000, now=0.0)
    now = teach(sched, "w1", "slow", 5.0, 0.0)
    submitted: dict[str, list[int]] = {"a": [], "b": [], "c": []}
    for i in range(90):
        tenant = "abc"[(i * 7) % 3]
        job = make_job("slow", tenant=tenant)
        submitted[tenant].append(job.token)
        sched.submit(job, now)
    sent: list[PendingJob] = []
    ended, _ = run_one_at_a_time(sched, "w1", sent, 90, 5.0, now)
    for tenant, tokens in submitted.items():
        assert [job.token for job in ended if job.tenant == tenant] == tokens


def test_tenant_pending_cap_counts_running_and_queued_jobs() -> None:
    """`max_pending` bounds a tenant's jobs on workers plus in the queue; past it that tenant
    gets QUOTA_EXCEEDED with its count and limit, while other tenants are still taken."""
    sched = make_scheduler(tenants={"a": TenantConfig(max_pending=3)})
    sched.add_worker("w1", recycle_after=1_000, now=0.0)
    sched.add_worker("w2", recycle_after=1_000, now=0.0)
    for _ in range(3):  # two run, one waits
        sched.submit(make_job(UNKNOWN, tenant="a"), 1.0)
    assert sched.in_flight == 2 and sched.queue_depth == 1
    with pytest.raises(QuotaExceeded) as refused:
        sched.submit(make_job(UNKNOWN, tenant="a"), 1.0)
    assert refused.value.details == {"quota": "max_pending", "limit": 3, "used": 3}
    sched.submit(make_job(UNKNOWN, tenant="b"), 1.0)
    assert sched.queue_depth == 2

    worker_id, running = sched.take_assignments()[0]
    assert sched.on_reply(worker_id, running.token, 1.5) is not None  # one of a's ends
    sched.submit(make_job(UNKNOWN, tenant="a"), 1.6)  # room again


def test_tenant_queued_bytes_bound() -> None:
    """A tenant's held bytes (queued or on a worker) are bounded: QUOTA_EXCEEDED with the use
    and the limit; another tenant's request of the same size is still taken."""
    sched = make_scheduler(tenants={"default": TenantConfig(max_queued_bytes=1000)})
    sched.add_worker("w1", recycle_after=1_000, now=0.0)
    sched.submit(make_job(UNKNOWN, tenant="a", size_bytes=600), 1.0)  # runs
    sched.submit(make_job(UNKNOWN, tenant="a", size_bytes=300), 1.0)  # waits
    with pytest.raises(QuotaExceeded) as refused:
        sched.submit(make_job(UNKNOWN, tenant="a", size_bytes=200), 1.0)
    assert refused.value.details == {"quota": "max_queued_bytes", "limit": 1000, "used": 900,
                                     "size": 200}
    sched.submit(make_job(UNKNOWN, tenant="b", size_bytes=600), 1.0)
    assert sched.queue_depth == 2
    assert sched.queued_bytes == 1500


def test_server_queued_bytes_bound() -> None:
    """All tenants together hold at most `max_queued_bytes`; past it, BUSY with the use."""
    sched = make_scheduler(max_queued_bytes=1000)
    sched.add_worker("w1", recycle_after=1_000, now=0.0)
    sched.submit(make_job(UNKNOWN, tenant="a", size_bytes=500), 1.0)
    sched.submit(make_job(UNKNOWN, tenant="b", size_bytes=400), 1.0)
    with pytest.raises(Busy) as refused:
        sched.submit(make_job(UNKNOWN, tenant="c", size_bytes=200), 1.0)
    assert refused.value.details == {"queued_bytes": 900, "size": 200, "limit": 1000}


def test_request_over_a_bytes_bound_alone_is_too_large() -> None:
    """A request that could never fit a bytes bound, even with nothing else held, gets
    PAYLOAD_TOO_LARGE (retrying cannot help), not BUSY."""
    sched = make_scheduler(max_queued_bytes=5000, tenants={
        "default": TenantConfig(max_queued_bytes=1000),
        "big": TenantConfig(max_queued_bytes=10_000)})
    sched.add_worker("w1", recycle_after=1_000, now=0.0)
    with pytest.raises(PayloadTooLarge) as tenant_refused:
        sched.submit(make_job(UNKNOWN, size_bytes=1001), 1.0)
    assert tenant_refused.value.details == {"size": 1001, "limit": 1000}
    with pytest.raises(PayloadTooLarge) as server_refused:
        sched.submit(make_job(UNKNOWN, tenant="big", size_bytes=6000), 1.0)
    assert server_refused.value.details == {"size": 6000, "limit": 5000}
    assert sched.in_flight == 0 and sched.queued_bytes == 0


def test_bytes_and_counts_are_given_back_when_jobs_end() -> None:
    """Replies, failures of a lost worker and cancellations all return what a job held."""
    sched = make_scheduler(tenants={"default": TenantConfig(max_pending=10)})
    sched.add_worker("w1", recycle_after=1_000, now=0.0)
    jobs = [make_job(UNKNOWN, tenant="a", size_bytes=100) for _ in range(4)]
    for job in jobs:
        sched.submit(job, 1.0)
    assert sched.tenant_usage("a") == (4, 400)
    assert sched.on_reply("w1", jobs[0].token, 1.1) is not None  # jobs[1] starts
    assert sched.tenant_usage("a") == (3, 300)
    sched.release_worker("w1", HEAD_ERROR, WAITING_ERROR, 1.2)
    assert sched.tenant_usage("a") == (2, 200)
    assert sched.cancel_queued(WAITING_ERROR) == 2
    assert sched.tenant_usage("a") == (0, 0)
    assert sched.queued_bytes == 0


def test_unbounded_submit_ignores_tenant_caps() -> None:
    """A hot reload's compile (bounded=False) is never refused, whatever its tenant holds."""
    sched = make_scheduler(max_queued_bytes=10, tenants={
        "default": TenantConfig(max_pending=1, max_queued_bytes=10)})
    sched.add_worker("w1", recycle_after=1_000, now=0.0)
    sched.submit(make_job(UNKNOWN, size_bytes=10), 1.0)
    sched.submit(make_job(UNKNOWN, size_bytes=50), 1.0, bounded=False)
    sched.submit(make_job(UNKNOWN, size_bytes=50), 1.0, bounded=False)
    assert sched.tenant_usage("default") == (3, 110)


def test_requeued_jobs_go_back_to_the_front_of_their_own_tenant() -> None:
    """Jobs waiting on a lost worker return to the head of their tenant's queue, in order,
    ahead of that tenant's later jobs."""
    sched = quick_pool(["w1"], prefetch=4)
    first = [make_job(tenant="a"), make_job(tenant="b"), make_job(tenant="a"),
             make_job(tenant="b")]
    for job in first:
        sched.submit(job, 1.0)
    later = [make_job(tenant="a"), make_job(tenant="b")]
    for job in later:
        sched.submit(job, 1.0)
    assert sched.jobs_on("w1") == 4 and sched.queue_depth == 2
    sched.take_assignments()
    sched.release_worker("w1", HEAD_ERROR, WAITING_ERROR, 2.0)
    sched.add_worker("w2", recycle_after=1_000, now=3.0)
    sent: list[PendingJob] = []
    run_one_at_a_time(sched, "w2", sent, 5, QUICK_MS, 3.0)
    for tenant in "ab":
        assert [j.token for j in sent if j.tenant == tenant] == [
            j.token for j in [*first[1:], *later] if j.tenant == tenant]


def test_quick_jobs_of_one_tenant_cannot_starve_a_slow_job_of_another() -> None:
    """A slow job waits for an idle worker; another tenant's stream of quick jobs, prefetched
    onto the busy worker, stops once its share is used, so the worker drains and the slow
    job gets it."""
    sched = quick_pool(["w1"], prefetch=4)
    sched.submit(make_job(tenant="b"), 1.0)
    slow = make_job(UNKNOWN, tenant="a")
    sched.submit(slow, 1.0)
    sent = [job for _, job in sched.take_assignments()]
    ended: list[PendingJob] = []
    now = 1.0
    for _ in range(200):
        if slow in sent:
            break
        sched.submit(make_job(tenant="b"), now)
        sent += [job for _, job in sched.take_assignments()]
        head = next(job for job in sent if job not in ended)
        now += QUICK_MS / 1000
        assert sched.on_reply("w1", head.token, now) is not None
        ended.append(head)
        sent += [job for _, job in sched.take_assignments()]
    assert slow in sent, "the slow job never got the worker"


def test_configure_applies_new_tenant_caps() -> None:
    """A config reload's tenant table applies to the next submit."""
    sched = make_scheduler()
    sched.add_worker("w1", recycle_after=1_000, now=0.0)
    sched.submit(make_job(UNKNOWN, tenant="a"), 1.0)
    sched.configure(max_queue=100, prefetch=8, deadline_grace_s=GRACE_S,
                    max_queued_bytes=1 << 40,
                    tenant_policy=lambda name: TenantConfig(max_pending=1))
    with pytest.raises(QuotaExceeded):
        sched.submit(make_job(UNKNOWN, tenant="a"), 1.0)


def test_records_of_idle_tenants_stay_bounded() -> None:
    """Tenant names are the clients' to choose: thousands of names, one request each, leave
    at most a bounded number of records behind (and refused ones leave none)."""
    sched = make_scheduler(tenants={"default": TenantConfig(max_queued_bytes=10)})
    sched.add_worker("w1", recycle_after=100_000, now=0.0)
    now = 0.0
    for i in range(3 * IDLE_TENANTS_KEPT):
        job = make_job(UNKNOWN, tenant=f"t{i}")
        sched.submit(job, now)
        now += 0.001
        assert sched.on_reply("w1", job.token, now) is not None
        with pytest.raises(PayloadTooLarge):
            sched.submit(make_job(UNKNOWN, tenant=f"refused{i}", size_bytes=11), now)
    assert sched.tenants_tracked <= IDLE_TENANTS_KEPT + 1


# --------------------------------------------------------------------------- units


def make_unit(count: int, binary: str = QUICK, tenant: str = "default",
              size_bytes: int = 0) -> PendingJob:
    """A unit: `count` executes of one binary as one job (RunJob.unit)."""
    job = make_job(binary, budget_s=BUDGET_S * count, tenant=tenant, size_bytes=size_bytes)
    job.request_ids = [job.token * 1000 + i for i in range(count)]
    job.count = count
    job.steps = count  # one after another, each under its own budget (Requests.execute_unit)
    job.payload = [b""] * count
    return job


def test_unit_size_follows_the_measured_run_time() -> None:
    """A unit holds as many executes as fit in the prefetch budget, at most `most`; a binary
    not yet measured, or slow, runs in no unit at all."""
    sched = make_scheduler()
    sched.add_worker("w1", recycle_after=1_000, now=0.0)
    assert sched.unit_size(UNKNOWN, 32) == 1
    now = teach(sched, "w1", QUICK, QUICK_MS, 0.0)
    assert sched.unit_size(QUICK, 32) == 32
    assert sched.unit_size(QUICK, 1) == 1
    teach(sched, "w1", "half", PREFETCH_BUDGET_MS / 4, now)
    assert sched.unit_size("half", 32) == 4
    teach(sched, "w1", "slow", PREFETCH_BUDGET_MS * 3, now + 1)
    assert sched.unit_size("slow", 32) == 1


def test_a_unit_counts_as_its_executes() -> None:
    """Quotas, the queue, in-flight and the tenant's usage count a unit's executes, not one
    job: a unit of 5 takes 5 of a tenant's max_pending of 6, and one more unit of 2 is
    refused while a single execute still fits."""
    sched = make_scheduler(tenants={"default": TenantConfig(max_pending=6)})
    sched.add_worker("w1", recycle_after=1_000, now=0.0)
    teach(sched, "w1", QUICK, QUICK_MS, 0.0)
    unit = make_unit(5, size_bytes=50)
    sched.submit(unit, 1.0)
    assert assigned(sched) == {unit.token: "w1"}
    assert sched.in_flight == 5
    assert sched.tenant_usage("default") == (5, 50)
    with pytest.raises(QuotaExceeded):
        sched.submit(make_unit(2), 1.0)
    single = make_job()
    sched.submit(single, 1.0)
    assert sched.tenant_usage("default") == (6, 50)
    outcome = sched.on_reply("w1", unit.token, 1.001)
    assert outcome is not None and outcome[0] is unit
    assert sched.tenant_usage("default") == (1, 0)
    assert sched.executions_on("w1") == 1 + 5  # the teaching job, then the unit's five


def test_a_queued_unit_counts_against_max_queue() -> None:
    sched = make_scheduler(max_queue=4)
    sched.add_worker("w1", recycle_after=1_000, now=0.0)
    teach(sched, "w1", UNKNOWN, 5.0, 0.0)  # slow: nothing is prefetched behind it
    sched.submit(make_job(UNKNOWN), 1.0)
    assigned(sched)
    queued = make_unit(3, binary=UNKNOWN)
    sched.submit(queued, 1.0)
    assert sched.queue_depth == 3
    with pytest.raises(Busy):
        sched.submit(make_unit(2, binary=UNKNOWN), 1.0)
    sched.submit(make_job(UNKNOWN), 1.0)  # one more still fits
    assert sched.queue_depth == 4


def test_a_unit_is_charged_its_executes_for_fair_share() -> None:
    """A unit of N is charged N times its binary's estimate, like N executes: a tenant that
    sends units does not get more than its share against one that sends single executes."""
    sched = make_scheduler(tenants={"a": TenantConfig(weight=1), "b": TenantConfig(weight=1)})
    sched.add_worker("w1", recycle_after=10_000, now=0.0)
    now = teach(sched, "w1", "one-ms", 1.0, 0.0)
    blocker = make_job("slowpoke")  # unknown: the lane takes nothing behind it
    sched.submit(blocker, now)
    assigned(sched)
    units = [make_unit(10, binary="one-ms", tenant="a") for _ in range(3)]
    singles = [make_job("one-ms", tenant="b") for _ in range(30)]
    for job in units + singles:
        sched.submit(job, now)
    order: list[str] = []
    lane = [blocker]
    while lane and len(order) < 24:
        job = lane.pop(0)
        now += 0.001 * job.count  # a unit's executes run one after another
        assert sched.on_reply("w1", job.token, now) is not None
        for _, taken in sched.take_assignments():
            lane.append(taken)
            order.append(taken.tenant)
    # After a's first unit (10 ms charged) b gets about ten single executes before a again.
    first_a = order.index("a")
    second_a = order.index("a", first_a + 1)
    assert order[first_a + 1:second_a].count("b") >= 8


def test_a_lost_unit_fails_as_one_job() -> None:
    """A unit running on a lost worker ends with one failure (the server answers each of its
    request ids); a unit waiting behind it is requeued whole, once."""
    sched = quick_pool(["w1"], prefetch=4)
    head, waiting = make_unit(4), make_unit(3)
    sched.submit(head, 1.0)
    sched.submit(waiting, 1.0)
    assert assigned(sched) == {head.token: "w1", waiting.token: "w1"}
    assert sched.in_flight == 7
    sched.release_worker("w1", HEAD_ERROR, WAITING_ERROR, 2.0)
    assert failures(sched) == [(head.token, HEAD_ERROR)]
    assert waiting.requeued and sched.queue_depth == 3 and sched.in_flight == 0
    assert sched.tenant_usage("default")[0] == 3


def test_a_units_deadline_moves_with_its_workers_progress() -> None:
    """A unit starts with one execute's budget; each heartbeat that shows its worker started
    another execute moves the deadline to one budget from then, never past the whole
    unit's; without progress it expires one budget (plus the grace) after the last."""
    sched = quick_pool(["w1"])
    unit = make_unit(4)  # 4 x BUDGET_S
    sched.submit(unit, 10.0)
    assigned(sched)
    assert unit.deadline == pytest.approx(10.0 + BUDGET_S + GRACE_S)
    sched.progress("w1", 1, 10.5)
    assert unit.deadline == pytest.approx(10.5 + BUDGET_S + GRACE_S)
    sched.progress("w1", 1, 11.2)  # no new execute started: unchanged
    assert unit.deadline == pytest.approx(10.5 + BUDGET_S + GRACE_S)
    assert sched.expired(12.1) == [("w1", unit)]
    sched.progress("w1", 2, 13.5)
    assert sched.expired(14.4) == []
    sched.progress("w1", 3, 13.9)
    sched.progress("w1", 4, 16.0)
    assert unit.deadline == pytest.approx(10.0 + 4 * BUDGET_S + GRACE_S)  # the whole unit's


# --------------------------------------------------------------------------- direct-lane leases


def _leased_pool() -> tuple[Scheduler, PendingJob]:
    """w1 and w2 ready; a job on w2 answered with a lease kept."""
    sched = quick_pool(["w1", "w2"])
    job = make_job()
    sched.submit(job, 1.0)
    assert assigned(sched) == {job.token: "w2"}
    outcome = sched.on_reply("w2", job.token, 1.001, leased=True)
    assert outcome is not None and outcome[1] is LaneState.LEASED
    return sched, job


def test_a_leased_worker_takes_no_jobs_until_returned() -> None:
    sched, _ = _leased_pool()
    assert sched.idle_workers == 1
    first, second = make_job(), make_job()
    sched.submit(first, 2.0)
    sched.submit(second, 2.0)
    # w1 takes both (prefetch); nothing goes to the leased w2.
    assert set(assigned(sched).values()) == {"w1"}
    assert sched.lease_returned("w2", "default", 10, 1.5, 2.1) is LaneState.IDLE
    later = make_job(binary=UNKNOWN)  # slow: only an idle worker takes it
    sched.submit(later, 2.2)
    assert assigned(sched) == {later.token: "w2"}
    assert sched.executions_on("w2") == 1 + 1 + 10  # teach, the leasing job, the lease's


def test_a_lease_is_not_kept_when_work_is_queued() -> None:
    sched = quick_pool(["w1"])
    running = make_job(binary=UNKNOWN)
    waiting = make_job(binary=UNKNOWN)
    sched.submit(running, 1.0)
    sched.submit(waiting, 1.0)  # queued: the only worker is busy with a slow job
    assert assigned(sched) == {running.token: "w1"}
    outcome = sched.on_reply("w1", running.token, 1.5, leased=True)
    assert outcome is not None and outcome[1] is not LaneState.LEASED
    assert assigned(sched) == {waiting.token: "w1"}
    # The worker's report of the lease it dropped charges the tenant, changes no lane.
    assert sched.lease_returned("w1", "default", 0, 0.0, 1.6) is None


def test_a_stopped_leased_worker_drains_when_its_lease_returns() -> None:
    sched, _ = _leased_pool()
    assert sched.stop_worker("w2") is False  # not while it serves a lease
    assert sched.lease_returned("w2", "default", 3, 0.2, 2.0) is LaneState.DRAINED


def _after_a_lease(busy_ms: float) -> str:
    """The tenant whose queued job runs first when a lease of tenant `hog` that ran
    `busy_ms` returns; `other` had run 50 ms before, the hog 0.1 ms besides its lease."""
    sched = make_scheduler()
    sched.add_worker("w1", recycle_after=1_000, now=0.0)
    warm = make_job(binary=UNKNOWN, tenant="other")
    sched.submit(warm, 0.0)
    sched.on_reply("w1", warm.token, 0.050)
    leasing = make_job(binary=UNKNOWN, tenant="hog")
    sched.submit(leasing, 1.0)
    outcome = sched.on_reply("w1", leasing.token, 1.0001, leased=True)
    assert outcome is not None and outcome[1] is LaneState.LEASED
    assigned(sched)
    hog, other = make_job(binary=UNKNOWN, tenant="hog"), make_job(binary=UNKNOWN, tenant="other")
    sched.submit(hog, 1.1)
    sched.submit(other, 1.1)
    assert assigned(sched) == {}  # the only worker is leased: both wait
    assert sched.lease_returned("w1", "hog", 400, busy_ms, 1.6) is LaneState.BUSY
    (job,) = [job for _, job in sched.take_assignments()]
    return job.tenant


def test_a_lease_charges_its_tenants_share() -> None:
    """Run time spent on a lease counts toward fair share like jobs' run time: after a long
    lease the other tenant goes first, though it had been given more before."""
    assert _after_a_lease(busy_ms=0.0) == "hog"  # without the lease's charge
    assert _after_a_lease(busy_ms=500.0) == "other"
