"""Scheduler unit tests: fake jobs, a fake clock (plain floats), no processes, no sockets.

The scheduler is pure logic: every method takes `now`, and its decisions accumulate in
`take_assignments()` / `take_failures()`, which is what these tests read.
"""

from __future__ import annotations

import itertools

import pytest

from wasmcore.protocol.errors import Busy, ShuttingDown, Timeout, WasmCoreError, WorkerLost
from wasmcore.supervisor.jobs import PendingJob
from wasmcore.supervisor.scheduler import PREFETCH_BUDGET_MS, LaneState, Scheduler

QUICK = "quick-binary"  # taught to run in QUICK_MS before the jobs under test
QUICK_MS = 0.01
UNKNOWN = "never-run-binary"  # no run time known: counts as slow
GRACE_S = 0.5
BUDGET_S = 1.0

HEAD_ERROR = WorkerLost("head job lost")
WAITING_ERROR = WorkerLost("waiting job lost")

_tokens = itertools.count(1)


def make_job(binary: str = QUICK, budget_s: float = BUDGET_S,
             retryable: bool = True) -> PendingJob:
    """A run job of one binary, with a fresh token."""
    token = next(_tokens)
    return PendingJob(token=token, envelope=None, request_id=token, header=b"", payload=None,
                      budget_s=budget_s, binary_ids=[binary], retryable=retryable)


def make_scheduler(max_queue: int = 100, prefetch: int = 8) -> Scheduler:
    return Scheduler(max_queue=max_queue, prefetch=prefetch, deadline_grace_s=GRACE_S)


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
