"""Crash isolation: real processes are killed, stopped and starved; every request gets one reply."""

from __future__ import annotations

import asyncio
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import FAST_POOL, HOSTILE, PLUGINS, raw_dealer, wait_for
from wasmcore.client.core import AsyncClient
from wasmcore.client.launcher import start_service
from wasmcore.protocol import errors
from wasmcore.protocol import messages as p

# Room for rss_hog to make a worker's RSS grow past the watchdog's limits.
HOG_LIMITS = {"memory_mb": 512, "fuel": 10**13, "timeout_ms": 30_000}


def _hog_input(mib: int, spin_millions: int) -> bytes:
    return struct.pack("<II", mib, spin_millions)


def _live_pids(client) -> set[int]:
    return {w.pid for w in client.stats().workers if w.state in ("idle", "busy")}


def _kill_workers_at_random(svc, stop_at: float, seed: int) -> set[int]:
    """SIGKILL a random live worker every 0.3-0.8 s until `stop_at`; the pids killed."""
    import random

    rng = random.Random(seed)
    killed: set[int] = set()
    with svc.client() as c:
        while True:
            time.sleep(rng.uniform(0.3, 0.8))
            if time.monotonic() >= stop_at:  # never a kill after it: the caller's checks follow
                break
            pids = list(_live_pids(c))
            if pids:
                victim = rng.choice(pids)
                try:
                    os.kill(victim, signal.SIGKILL)
                    killed.add(victim)
                except ProcessLookupError:
                    pass
    return killed


def _busy_pid(client) -> int:
    def find() -> int:
        busy = [w.pid for w in client.stats().workers if w.state == "busy"]
        return busy[0] if busy else 0

    return wait_for(find, 10, "a busy worker")


class Background:
    """Runs one blocking client call in a thread and keeps its outcome."""

    def __init__(self, service, fn) -> None:
        self.result: object = None
        self.error: BaseException | None = None
        self.finished_at = 0.0

        def run() -> None:
            with service.client() as c:
                try:
                    self.result = fn(c)
                except BaseException as exc:  # noqa: BLE001 - kept for the test to inspect
                    self.error = exc
            self.finished_at = time.monotonic()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self, timeout_s: float = 30) -> None:
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "request got no reply in time"


@pytest.fixture
def fault_service():
    svc = start_service(workers=2, config={"pool": FAST_POOL, "limits": {"fuel": 10**13}})
    try:
        yield svc
    finally:
        svc.cleanup()


def test_sigkill_worker_mid_request(fault_service):
    svc = fault_service
    with svc.client() as c:
        loop = c.load(HOSTILE / "loop.wat").binary_id
        upper = c.load(PLUGINS / "uppercase.wat").binary_id
        before = _live_pids(c)
        victim = Background(svc, lambda cl: cl.execute(loop, "x", timeout_ms=20_000))
        pid = _busy_pid(c)
        os.kill(pid, signal.SIGKILL)
        victim.join()
        assert isinstance(victim.error, errors.WorkerLost), victim.error
        # Noticed through the pidfd, not by a missed heartbeat or a deadline:
        assert victim.error.details["cause"] == "crash"
        assert c.execute(upper, "other").output == b"OTHER"
        after = wait_for(lambda: len(_live_pids(c)) == 2 and _live_pids(c), 10, "pool at size")
        assert pid not in after and len(after & before) == 1
        assert c.stats().restarts_by_cause.get("crash") == 1


def test_sigstop_worker_is_declared_dead(fault_service):
    svc = fault_service
    with svc.client() as c:
        loop = c.load(HOSTILE / "loop.wat").binary_id
        victim = Background(svc, lambda cl: cl.execute(loop, "x", timeout_ms=20_000))
        pid = _busy_pid(c)
        os.kill(pid, signal.SIGSTOP)
        victim.join()
        assert isinstance(victim.error, errors.WorkerLost), victim.error
        wait_for(lambda: not psutil.pid_exists(pid) or
                 psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, 10, "stopped worker gone")
        wait_for(lambda: len(_live_pids(c)) == 2, 10, "pool at size")
        assert c.stats().restarts_by_cause.get("heartbeat") == 1


def test_blocking_host_call_hits_supervisor_deadline(fault_service):
    svc = fault_service
    with svc.client() as c:
        sleeper = c.load(HOSTILE / "sleep.wat").binary_id
        upper = c.load(PLUGINS / "uppercase.wat").binary_id
        with pytest.raises(errors.Timeout) as info:
            c.execute(sleeper, "", timeout_ms=300)
        # The supervisor's deadline answered (the plugin sleeps 60 s in the host):
        assert "killed" in info.value.message
        assert c.execute(upper, "next").output == b"NEXT"
        wait_for(lambda: c.stats().restarts_by_cause.get("timeout") == 1, 10, "restart")
        wait_for(lambda: len(_live_pids(c)) == 2, 10, "pool at size")


def test_late_reply_never_answers_another_request():
    """A reply still in flight when its deadline passes must not answer twice, nor answer a
    later request. The supervisor itself is SIGSTOPped while its worker runs the job: the
    worker finishes and sends its reply, which waits in the socket until the supervisor is
    resumed past the deadline. The request then gets exactly one answer (its result or
    TIMEOUT, whichever the resumed loop handles first), and the next requests on the same
    connection get their own replies, never the stale one."""
    svc = start_service(workers=1, config={
        "pool": {**FAST_POOL, "deadline_grace_ms": 100, "heartbeat_timeout_ms": 30_000},
        "limits": {"fuel": 10**13}})
    try:
        with svc.client() as c:
            loop = c.load(HOSTILE / "loop.wat").binary_id
            upper = c.load(PLUGINS / "uppercase.wat").binary_id
            worker = psutil.Process(_live_pids(c).pop())
        supervisor = psutil.Process(svc.process.pid)
        with raw_dealer(svc.endpoint) as sock:
            cpu_before = sum(worker.cpu_times()[:2])
            # Runs until its fuel is gone (a fraction of a second), well inside its timeout;
            # the supervisor's deadline is timeout + 100 ms grace.
            sock.send_multipart([p.encode(p.Execute(id=1, binary_id=loop, fuel=300_000_000,
                                                    timeout_ms=400))])
            wait_for(lambda: sum(worker.cpu_times()[:2]) > cpu_before + 0.02, 10,
                     "the worker running the job")
            supervisor.suspend()
            try:
                # Until the worker has answered (idle again) and the deadline has passed.
                time.sleep(0.6)
                wait_for(lambda: worker.status() == psutil.STATUS_SLEEPING, 10,
                         "the worker done with the job")
            finally:
                supervisor.resume()
            first = _replies(sock, 1.0)
            assert [r.id for r in first] == [1], first
            assert isinstance(first[0], p.ErrorReply), first
            assert first[0].code in ("OUT_OF_FUEL", "TIMEOUT"), first
            for request_id in range(2, 12):
                sock.send_multipart([p.encode(p.Execute(id=request_id, binary_id=upper)),
                                     f"req {request_id}".encode()])
                replies = _replies(sock, 10.0, stop_after=1)
                assert [r.id for r in replies] == [request_id], replies
            assert _replies(sock, 0.5) == [], "a second reply to an answered request"
    finally:
        svc.cleanup()


def _replies(sock, wait_s: float, stop_after: int | None = None) -> list:
    """Every reply that arrives within `wait_s` (or the first `stop_after` of them)."""
    out: list = []
    deadline = time.monotonic() + wait_s
    while stop_after is None or len(out) < stop_after:
        left_ms = int((deadline - time.monotonic()) * 1000)
        if left_ms <= 0 or not sock.poll(left_ms):
            break
        out.append(p.reply_decoder.decode(sock.recv_multipart()[0]))
    return out


def test_rss_soft_limit_recycles_after_the_execution():
    svc = start_service(workers=1, config={
        "pool": {**FAST_POOL, "rss_soft_limit_mb": 150, "rss_hard_limit_mb": 4000},
        "limits": HOG_LIMITS,
    })
    try:
        with svc.client() as c:
            hog = c.load(HOSTILE / "rss_hog.wat").binary_id
            upper = c.load(PLUGINS / "uppercase.wat").binary_id
            pid = _live_pids(c).pop()
            result = c.execute(hog, _hog_input(256, 600))  # resident 256 MiB, then spins
            assert result.worker_pid == pid
            wait_for(lambda: c.stats().restarts_by_cause.get("memory") == 1, 10, "recycle")
            wait_for(lambda: (live := _live_pids(c)) and pid not in live, 10, "replacement")
            assert c.execute(upper, "fresh").output == b"FRESH"
    finally:
        svc.cleanup()


def test_rss_hard_limit_kills_with_memory_limit():
    svc = start_service(workers=1, config={
        "pool": {**FAST_POOL, "rss_soft_limit_mb": 100, "rss_hard_limit_mb": 150},
        "limits": HOG_LIMITS,
    })
    try:
        with svc.client() as c:
            hog = c.load(HOSTILE / "rss_hog.wat").binary_id
            upper = c.load(PLUGINS / "uppercase.wat").binary_id
            with pytest.raises(errors.MemoryLimit) as info:
                c.execute(hog, _hog_input(256, 100_000))  # would spin for minutes
            assert "hard RSS limit" in info.value.message
            assert wait_for(lambda: c.execute(upper, "ok").output, 10, "service") == b"OK"
            assert c.stats().restarts_by_cause.get("memory") == 1
    finally:
        svc.cleanup()


def test_recycling_under_load_loses_nothing():
    svc = start_service(workers=2, config={
        "pool": {**FAST_POOL, "max_executions_per_worker": 25, "recycle_jitter": 0.5},
    })
    try:
        with svc.client() as c:
            upper = c.load(PLUGINS / "uppercase.wat").binary_id

        async def load() -> None:
            async with AsyncClient(svc.endpoint) as ac:
                texts = [f"payload {i}" for i in range(600)]
                sem = asyncio.Semaphore(16)

                async def one(text: str):
                    async with sem:
                        return await ac.execute(upper, text)

                results = await asyncio.gather(*(one(t) for t in texts))
                assert [r.output for r in results] == [t.upper().encode() for t in texts]

        asyncio.run(asyncio.wait_for(load(), 120))
        with svc.client() as c:
            stats = c.stats()
            assert stats.restarts_by_cause.get("recycle", 0) >= 600 // 25 - 4
            assert stats.errors_by_code == {}
    finally:
        svc.cleanup()


def test_worker_that_cannot_start_trips_the_breaker(tmp_path: Path):
    broken = tmp_path / "broken-python"
    broken.write_text("#!/bin/sh\necho 'broken install: no module wasmcore' >&2\nexit 1\n")
    broken.chmod(0o755)
    svc = start_service(workers=2, wait=False, stderr=subprocess.PIPE, config={
        "pool": {"python": str(broken), "breaker_failures": 4, "breaker_window_s": 30,
                 "restart_backoff_initial_ms": 50, "restart_backoff_max_ms": 400},
    })
    try:
        _, stderr = svc.process.communicate(timeout=30)
        assert svc.process.returncode == 2
        text = stderr.decode()
        assert "worker pool stopped" in text and "failed to start" in text
        assert text.count("broken install") >= 4
    finally:
        svc.cleanup()


def test_sigterm_answers_every_request(tmp_path: Path):
    svc = start_service(workers=1, config={"pool": FAST_POOL,
                                           "limits": {"fuel": 10**13, "timeout_ms": 30_000}})
    try:
        with svc.client() as c:
            hog = c.load(HOSTILE / "rss_hog.wat").binary_id
        slow = _hog_input(0, 400)  # about a second of spinning, then success
        calls = [Background(svc, lambda cl: cl.execute(hog, slow)) for _ in range(4)]
        with svc.client() as c:
            wait_for(lambda: c.stats().queue_depth == 3, 10, "three queued")
        svc.process.send_signal(signal.SIGTERM)
        for call in calls:
            call.join(30)
        outcomes = [type(call.error).__name__ if call.error else "ok" for call in calls]
        assert outcomes.count("ok") == 1, outcomes
        assert outcomes.count("ShuttingDown") == 3, outcomes
        assert svc.process.wait(timeout=30) == 0
    finally:
        svc.cleanup()


def test_supervisor_sigkill_leaves_no_worker():
    svc = start_service(workers=2)
    try:
        with svc.client() as c:
            pids = _live_pids(c)
        assert len(pids) == 2
        svc.process.send_signal(signal.SIGKILL)
        svc.process.wait(timeout=10)
        wait_for(lambda: not any(_alive(pid) for pid in pids), 5, "workers to exit")
    finally:
        svc.cleanup()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_no_zombies_after_restarts(fault_service):
    svc = fault_service
    with svc.client() as c:
        for _ in range(3):
            pid = next(iter(_live_pids(c)))
            os.kill(pid, signal.SIGKILL)
            # One snapshot per check: two calls could see two different pools.
            wait_for(lambda p=pid: (live := _live_pids(c)) and len(live) == 2 and p not in live,
                     10, "replacement")

    def settled() -> bool:
        children = psutil.Process(svc.pid).children()
        # The two workers and the compile lane's one.
        return len(children) == 3 and all(_alive(ch.pid) for ch in children)

    wait_for(settled, 10, "exactly three live children, no zombie")


def test_soak_mixed_load_with_random_kills():
    """Client threads send good and hostile executions while workers are killed at random.
    Every request gets exactly one reply; every good result has the right output."""
    import random

    svc = start_service(workers=2, config={"pool": FAST_POOL, "limits": {"fuel": 50_000_000}})
    try:
        with svc.client() as c:
            ids = {
                "upper": c.load(PLUGINS / "uppercase.wat").binary_id,
                "rot13": c.load(PLUGINS / "rot13.wat").binary_id,
                "loop": c.load(HOSTILE / "loop.wat").binary_id,
                "trap": c.load(HOSTILE / "trap.wat").binary_id,
                "bomb": c.load(HOSTILE / "memory_bomb.wat").binary_id,
            }
        stop_at = time.monotonic() + float(os.environ.get("WASM_CORE_SOAK_SECONDS", "8"))
        counts: dict[str, int] = {}
        wrong: list[str] = []
        lock = threading.Lock()

        def client_thread(seed: int) -> None:
            rng = random.Random(seed)
            with svc.client(timeout_s=30) as c:
                n = 0
                while time.monotonic() < stop_at:
                    n += 1
                    kind = rng.choice(["upper", "upper", "rot13", "loop", "trap", "bomb"])
                    text = f"t{seed} n{n} {rng.random()}"
                    try:
                        result = c.execute(ids[kind], text, timeout_ms=300, memory_mb=8)
                        outcome = "ok"
                        expected = {"upper": text.upper(),
                                    "rot13": text.translate(_ROT13)}.get(kind)
                        if expected is None or result.output != expected.encode():
                            wrong.append(f"{kind}: {result.output[:60]!r}")
                    except errors.WasmCoreError as exc:
                        outcome = exc.code
                        if kind in ("upper", "rot13") and exc.code != "WORKER_LOST":
                            wrong.append(f"{kind}: {exc}")
                    with lock:
                        counts[outcome] = counts.get(outcome, 0) + 1

        threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        killed = _kill_workers_at_random(svc, stop_at, seed=42)
        kills = len(killed)
        for t in threads:
            t.join(60)
            assert not t.is_alive(), "a client thread is stuck without a reply"
        print(f"soak: kills={kills} outcomes={counts}")
        assert not wrong, wrong[:5]
        assert counts.get("ok", 0) > 0
        assert counts.get("WORKER_LOST", 0) <= kills
        with svc.client() as c:
            # Two live workers, neither of them one the killer hit (its death may still be
            # on its way to the supervisor when the soak ends).
            wait_for(lambda: (live := _live_pids(c)) and len(live) == 2 and not live & killed,
                     10, "pool at size after soak")
            assert c.execute(ids["upper"], "end").output == b"END"
    finally:
        svc.cleanup()


def test_soak_packed_and_shared_memory_requests_with_random_kills():
    """The AsyncClient's packed frames and shared-memory segments under random worker kills:
    every request gets exactly one reply, no good request gets a wrong output, and nothing
    is left in /dev/shm afterwards."""
    import random

    svc = start_service(workers=2, config={
        "pool": FAST_POOL, "limits": {"fuel": 50_000_000},
        "server": {"shm_threshold_bytes": 4096}})
    seconds = float(os.environ.get("WASM_CORE_SOAK_SECONDS", "6"))
    try:
        with svc.client() as c:
            upper = c.load(PLUGINS / "uppercase.wat").binary_id
            loop = c.load(HOSTILE / "loop.wat").binary_id
            trap = c.load(HOSTILE / "trap.wat").binary_id
        counts: dict[str, int] = {}
        wrong: list[str] = []
        stop_at = time.monotonic() + seconds

        async def lane(client: AsyncClient, seed: int) -> None:
            rng = random.Random(seed)
            n = 0
            while time.monotonic() < stop_at:
                n += 1
                kind = rng.choice(["small", "small", "small", "large", "loop", "trap"])
                text = f"s{seed} n{n} ".encode() * (rng.randint(700, 9000) if kind == "large"
                                                    else 1)
                binary = {"loop": loop, "trap": trap}.get(kind, upper)
                try:
                    result = await client.execute(binary, text, timeout_ms=300, memory_mb=8)
                    outcome = "ok"
                    if kind not in ("small", "large") or bytes(result.output) != text.upper():
                        wrong.append(f"{kind}: {bytes(result.output[:40])!r}")
                except errors.WasmCoreError as exc:
                    outcome = exc.code
                    if kind in ("small", "large") and exc.code != "WORKER_LOST":
                        wrong.append(f"{kind}: {exc}")
                counts[outcome] = counts.get(outcome, 0) + 1

        async def drive() -> None:
            async with AsyncClient(svc.endpoint, timeout_s=30) as plain, \
                    AsyncClient(svc.endpoint, timeout_s=30, zero_copy=True) as zero:
                await asyncio.gather(*(lane(plain if i % 2 else zero, i) for i in range(24)))

        killed: set[int] = set()
        thread = threading.Thread(
            target=lambda: killed.update(_kill_workers_at_random(svc, stop_at, seed=7)))
        thread.start()
        asyncio.run(asyncio.wait_for(drive(), seconds + 60))
        thread.join(30)
        print(f"packed soak: outcomes={counts}")
        assert not wrong, wrong[:5]
        assert counts.get("ok", 0) > 0
        # Both clients closed: their segments are gone (workers create none).
        try:
            wait_for(lambda: os.listdir(svc.shm_dir) == [], 10, "no segment left")
        except AssertionError:
            raise AssertionError(f"segments left: {os.listdir(svc.shm_dir)}") from None
        with svc.client() as c:
            wait_for(lambda: (live := _live_pids(c)) and len(live) == 2 and not live & killed,
                     10, "pool at size after soak")
            assert c.execute(upper, "end").output == b"END"
    finally:
        svc.cleanup()


_ROT13 = str.maketrans(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz",
    "NOPQRSTUVWXYZABCDEFGHIJKLMnopqrstuvwxyzabcdefghijklm",
)


def test_worker_exits_when_supervisor_pid_changes():
    """The worker's own parent check (the PR_SET_PDEATHSIG race window)."""
    code = subprocess.run(
        [sys.executable, "-m", "wasmcore.sandbox_worker",
         '{"worker_id":"x","back_endpoint":"ipc:///tmp/none.b","pub_endpoint":'
         '"ipc:///tmp/none.p","parent_pid":1}'],
        timeout=30, capture_output=True,
    ).returncode
    assert code == 4


def test_nothing_waits_on_a_worker_behind_a_slow_job():
    """Prefetching queues jobs only behind quick ones: while a slow execution runs, the other
    requests wait in the supervisor's queue (free to go to any worker), not on its worker."""
    svc = start_service(workers=1, config={"pool": {**FAST_POOL, "prefetch": 64},
                                           "limits": {"fuel": 10**13, "timeout_ms": 30_000}})
    try:
        with svc.client() as c:
            hog = c.load(HOSTILE / "rss_hog.wat").binary_id
            upper = c.load(PLUGINS / "uppercase.wat").binary_id
            for _ in range(20):  # uppercase is now known to be quick
                c.execute(upper, "warm")
            c.execute(hog, _hog_input(0, 300))  # the hog's average is measured: slow
            slow = Background(svc, lambda cl: cl.execute(hog, _hog_input(0, 3000)))
            wait_for(lambda: c.stats().in_flight == 1, 10, "the slow job to start")
            quick = [Background(svc, lambda cl: cl.execute(upper, "q")) for _ in range(5)]
            stats = wait_for(lambda: (s := c.stats()).queue_depth == 5 and s, 10, "queued")
            assert stats.in_flight == 1  # only the slow job is on the worker
            for call in [slow, *quick]:
                call.join(60)
                assert call.error is None, call.error
            assert all(call.result.output == b"Q" for call in quick)
    finally:
        svc.cleanup()
