"""WorkerPool and RestartPolicy tests: real worker processes, a real zmq.Poller, a fake clock
for the pool's decisions and a fake `tell` that records what the pool sends.

Workers started here have no supervisor to talk to (their ipc endpoints lead nowhere), which
is fine: the pool only spawns, watches, kills and reaps them. Every process started is killed
and reaped (`pool.close()`), and every wait has a bound.
"""

from __future__ import annotations

import shutil
import signal
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import zmq

from wasmcore.protocol import messages as p
from wasmcore.protocol.errors import WorkerLost
from wasmcore.supervisor import worker_pool
from wasmcore.supervisor.config import Config, PoolConfig
from wasmcore.supervisor.restart_policy import RestartPolicy
from wasmcore.supervisor.worker_pool import WorkerPool
from wasmcore.supervisor.worker_process import RestartCause, WorkerHandle, WorkerState

WAIT_S = 10.0  # bound on any wait for a process to exit
T0 = 1_000.0  # the fake clock's start


@dataclass
class FakeTell:
    """Stands in for the server's `_tell`: records (worker id, message), delivers or not."""

    deliver: bool = True
    sent: list[tuple[str, bytes]] = field(default_factory=list)

    def __call__(self, worker_id: str, message: bytes) -> bool:
        self.sent.append((worker_id, message))
        return self.deliver


@dataclass
class SpawnLog:
    """Counts calls to spawn_worker (including ones that raise)."""

    slots: list[int] = field(default_factory=list)


@pytest.fixture
def spawns(monkeypatch: pytest.MonkeyPatch) -> SpawnLog:
    """Every spawn_worker call the pool makes, recorded (the real one still runs)."""
    log = SpawnLog()
    real = worker_pool.spawn_worker

    def counting(slot: int, *args: Any, **kwargs: Any) -> WorkerHandle:
        log.slots.append(slot)
        return real(slot, *args, **kwargs)

    monkeypatch.setattr(worker_pool, "spawn_worker", counting)
    return log


@pytest.fixture
def endpoint_dir() -> Iterator[str]:
    """A short temp dir for ipc endpoints (socket paths have a ~100 byte limit)."""
    path = tempfile.mkdtemp(prefix="wc", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def make_config(**pool: Any) -> Config:
    """A config with one worker and the given pool settings."""
    return Config(pool=PoolConfig(**{"workers": 1, **pool}))


def make_pool(config: Config, endpoint_dir: str, tell: FakeTell | None = None) -> WorkerPool:
    return WorkerPool(config, f"ipc://{endpoint_dir}/back", f"ipc://{endpoint_dir}/pub",
                      None, zmq.Poller(), tell if tell is not None else FakeTell())


def only_worker(pool: WorkerPool) -> WorkerHandle:
    handles = list(pool.live())
    assert len(handles) == 1, handles
    return handles[0]


def wait_exit(handle: WorkerHandle) -> int:
    """The process's exit status, waiting at most WAIT_S (TimeoutExpired fails the test)."""
    return handle.process.wait(timeout=WAIT_S)


def reap_all(pool: WorkerPool, now: float) -> int:
    """Wait for every live worker to exit and reap it; how many there were."""
    handles = list(pool.live())
    for handle in handles:
        wait_exit(handle)
        assert pool.reap(handle, now) is not None
    return len(handles)


# --------------------------------------------------------------------------- breaker


@pytest.mark.parametrize("python", ["/bin/false", "/nonexistent/wc-python"])
def test_breaker_trips_on_workers_that_cannot_start(
        python: str, endpoint_dir: str, spawns: SpawnLog) -> None:
    """Workers that exit at once (or cannot be executed) count as start failures; after
    breaker_failures of them the pool sets stop_reason, naming the failure, and never
    spawns again, however long the clock runs."""
    config = make_config(workers=3, python=python, breaker_failures=3, breaker_window_s=60.0,
                         restart_backoff_initial_ms=1, restart_backoff_max_ms=4)
    pool = make_pool(config, endpoint_dir)
    try:
        now = T0
        pool.start(now)
        for _ in range(20):  # bounded: a pool that never trips fails below, not hangs
            reap_all(pool, now)
            if pool.stop_reason is not None:
                break
            now += 1.0
            pool.tick(now)
        reason = pool.stop_reason
        assert reason is not None, f"breaker never tripped after {len(spawns.slots)} spawns"
        assert "3 workers failed to start" in reason
        expected = "exit status 1" if python == "/bin/false" else "cannot start a worker"
        assert expected in reason
        assert pool.restarts[RestartCause.START_FAILURE] == 3

        tripped_after = len(spawns.slots)
        for _ in range(5):
            reap_all(pool, now)
            now += 10.0
            pool.tick(now)
        assert len(spawns.slots) == tripped_after
        assert list(pool.live()) == []
        assert not pool.starting
    finally:
        pool.close()


def test_failed_start_is_retried_after_the_backoff(endpoint_dir: str, spawns: SpawnLog) -> None:
    """After a start failure the slot is started again only once the backoff has passed, and
    the backoff doubles with each consecutive failure."""
    config = make_config(python="/bin/false", breaker_failures=100,
                         restart_backoff_initial_ms=1000, restart_backoff_max_ms=60_000)
    pool = make_pool(config, endpoint_dir)
    try:
        now = T0
        pool.start(now)
        assert spawns.slots == [0]
        for delay in (1.0, 2.0, 4.0):
            reap_all(pool, now)
            attempts = len(spawns.slots)
            pool.tick(now + delay - 0.1)
            assert len(spawns.slots) == attempts, f"restarted before the {delay}s backoff"
            now += delay
            pool.tick(now)
            assert len(spawns.slots) == attempts + 1, f"not restarted after {delay}s"
        assert pool.stop_reason is None
    finally:
        pool.close()


def test_worker_killed_for_start_timeout_counts_as_start_failure(
        endpoint_dir: str, spawns: SpawnLog) -> None:
    """A worker that never says ready is killed at the start timeout, and that counts toward
    the breaker like a worker that exits at start (restart_policy: "a worker that dies before
    saying ready counts as a start failure")."""
    config = make_config(breaker_failures=2, start_timeout_ms=1000,
                         restart_backoff_initial_ms=1, restart_backoff_max_ms=4)
    pool = make_pool(config, endpoint_dir)
    try:
        now = T0
        pool.start(now)
        for _ in range(2):
            handle = only_worker(pool)
            now += 2.0
            assert handle in pool.tick(now).killed
            assert wait_exit(handle) == -signal.SIGKILL
            pool.reap(handle, now)
            now += 1.0
            pool.tick(now)
            if pool.stop_reason is not None:
                break
        assert pool.policy.consecutive_failures > 0
        assert pool.stop_reason is not None
    finally:
        pool.close()


# --------------------------------------------------------------------------- RestartPolicy


def test_backoff_doubles_up_to_its_cap_and_resets_on_success() -> None:
    """delay_s is 0 with no failure, then initial * 2**(n-1) for n consecutive failures,
    capped at max_delay_s; a successful start resets it."""
    policy = RestartPolicy(initial_delay_s=0.1, max_delay_s=1.0, max_failures=100,
                           window_s=60.0)
    assert policy.delay_s() == 0.0
    delays = []
    for n in range(6):
        policy.record_start_failure(now=10.0 + n)
        delays.append(policy.delay_s())
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    policy.record_start_success()
    assert policy.delay_s() == 0.0
    policy.record_start_failure(now=20.0)
    assert policy.delay_s() == pytest.approx(0.1)


def test_breaker_counts_only_failures_inside_its_window() -> None:
    """tripped() once max_failures failures fall within window_s of `now`; old failures age
    out, and a success does not forgive the ones in the window."""
    policy = RestartPolicy(initial_delay_s=0.1, max_delay_s=1.0, max_failures=3, window_s=10.0)
    policy.record_start_failure(now=0.0)
    policy.record_start_failure(now=5.0)
    assert not policy.tripped(now=5.0)
    policy.record_start_success()
    policy.record_start_failure(now=9.0)
    assert policy.tripped(now=9.0)
    assert not policy.tripped(now=10.5)  # the failure at 0.0 is out of the window
    policy.record_start_failure(now=11.0)  # 5, 9, 11: three inside the window again
    assert policy.tripped(now=11.0)


def test_policy_configure_takes_new_settings() -> None:
    """configure() (start and reload) replaces the backoff and breaker settings with the
    pool config's, converting milliseconds."""
    policy = RestartPolicy.from_config(PoolConfig(restart_backoff_initial_ms=100,
                                                  restart_backoff_max_ms=5000,
                                                  breaker_failures=10, breaker_window_s=60.0))
    assert (policy.initial_delay_s, policy.max_delay_s) == pytest.approx((0.1, 5.0))
    policy.configure(PoolConfig(restart_backoff_initial_ms=250, restart_backoff_max_ms=2000,
                                breaker_failures=4, breaker_window_s=30.0))
    assert policy.initial_delay_s == pytest.approx(0.25)
    assert policy.max_delay_s == pytest.approx(2.0)
    assert policy.max_failures == 4
    assert policy.window_s == 30.0
    for n in range(4):
        policy.record_start_failure(now=float(n))
    assert policy.tripped(now=3.0)
    assert policy.delay_s() == pytest.approx(2.0)  # 0.25 * 8, at the new cap


def test_pool_reconfigure_updates_its_policy(endpoint_dir: str, spawns: SpawnLog) -> None:
    """A reloaded config reaches the pool's restart policy (same size: nothing is spawned)."""
    pool = make_pool(make_config(breaker_failures=10), endpoint_dir)
    try:
        removed = pool.reconfigure(make_config(breaker_failures=2, restart_backoff_initial_ms=7),
                                   T0)
        assert removed == []
        assert pool.policy.max_failures == 2
        assert pool.policy.initial_delay_s == pytest.approx(0.007)
        assert spawns.slots == []
    finally:
        pool.close()


# --------------------------------------------------------------------------- live workers


def test_heartbeat_timeout_kills_a_silent_ready_worker(
        endpoint_dir: str, spawns: SpawnLog) -> None:
    """A READY worker is killed once nothing was heard from it for heartbeat_timeout; a
    heartbeat in time keeps it alive. Reaped, it is a lost worker (not a start failure) and
    a successor takes its slot."""
    config = make_config(heartbeat_timeout_ms=3000, restart_backoff_initial_ms=1)
    pool = make_pool(config, endpoint_dir)
    try:
        now = T0
        pool.start(now)
        handle = only_worker(pool)
        assert pool.ready(handle.worker_id, "fp", "fp", now) is handle
        assert handle.state is WorkerState.READY

        assert pool.tick(now + 2.9).killed == []
        pool.heartbeat(handle.worker_id, compiled=0, deserialized=0, now=now + 2.9)
        assert pool.tick(now + 5.8).killed == []  # 2.9s after the heartbeat

        now += 2.9 + 3.1
        result = pool.tick(now)
        assert result.killed == [handle]
        assert handle.kill_cause is RestartCause.HEARTBEAT
        assert wait_exit(handle) == -signal.SIGKILL

        gone = pool.reap(handle, now)
        assert gone is not None and gone.code == -signal.SIGKILL
        assert isinstance(gone.error, WorkerLost)
        assert gone.error.details["cause"] == "heartbeat"
        assert pool.restarts[RestartCause.HEARTBEAT] == 1
        assert pool.policy.consecutive_failures == 0
        assert pool.get(handle.worker_id) is None

        pool.tick(now + 0.01)
        successor = only_worker(pool)
        assert successor is not handle and successor.slot == handle.slot
        assert spawns.slots == [0, 0]
    finally:
        pool.close()


def test_starting_worker_is_killed_by_start_timeout_not_heartbeats(endpoint_dir: str) -> None:
    """Before it says ready, a worker is judged by start_timeout only."""
    config = make_config(heartbeat_timeout_ms=1000, start_timeout_ms=5000)
    pool = make_pool(config, endpoint_dir)
    try:
        pool.start(T0)
        handle = only_worker(pool)
        assert pool.tick(T0 + 4.9).killed == []
        assert pool.tick(T0 + 5.1).killed == [handle]
        assert handle.kill_cause is RestartCause.START_FAILURE
        assert wait_exit(handle) == -signal.SIGKILL
    finally:
        pool.close()


def test_ready_is_accepted_once_and_only_from_known_workers(endpoint_dir: str) -> None:
    """ready() returns the handle for a STARTING worker of the pool, None otherwise."""
    pool = make_pool(make_config(), endpoint_dir)
    try:
        pool.start(T0)
        handle = only_worker(pool)
        assert pool.ready("w9g9p1", "fp", "fp", T0) is None
        assert pool.ready(handle.worker_id, "fp", "other-fp", T0) is handle  # only a warning
        assert pool.ready(handle.worker_id, "fp", "fp", T0) is None
    finally:
        pool.close()


def test_dismiss_tells_a_retiring_worker_to_shut_down(
        endpoint_dir: str, spawns: SpawnLog) -> None:
    """retire() starts a successor in the slot at once; dismiss() sends the retiring worker
    a Shutdown naming the cause, and kills it when the message cannot be delivered."""
    tell = FakeTell()
    pool = make_pool(make_config(), endpoint_dir, tell)
    try:
        pool.start(T0)
        handle = only_worker(pool)
        pool.ready(handle.worker_id, "fp", "fp", T0)

        pool.retire(handle, RestartCause.MEMORY, T0 + 1)
        assert handle.state is WorkerState.RETIRING
        assert spawns.slots == [0, 0]
        assert pool.restarts[RestartCause.MEMORY] == 1

        pool.dismiss(handle, T0 + 2)
        assert len(tell.sent) == 1
        worker_id, message = tell.sent[0]
        assert worker_id == handle.worker_id
        assert p.command_decoder.decode(message) == p.Shutdown(reason="memory")
        assert handle.kill_cause is None  # delivered: it exits by itself

        tell.deliver = False
        pool.dismiss(handle, T0 + 3)
        assert handle.kill_cause is RestartCause.MEMORY
        assert wait_exit(handle) == -signal.SIGKILL
        pool.reap(handle, T0 + 3)
        assert spawns.slots == [0, 0]  # its successor was started at retire, not again
    finally:
        pool.close()
