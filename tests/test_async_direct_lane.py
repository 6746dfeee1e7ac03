"""Direct lanes for `AsyncClient`: an application that awaits one execute before sending the
next goes straight to a leased worker; anything with more in flight takes the packed path
through the server. The blocking client's guarantees hold: one result per execute,
LeaseEnded and a worker gone before the execute reached it -> through the server, the
server's LeaseLost -> the execute's error, the deadline.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests.conftest import HOSTILE, PLUGINS, spin_input
from wasmcore.client import AsyncClient
from wasmcore.protocol import errors


async def _until(predicate: Callable[[], Awaitable[Any]], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = await predicate()
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what} (last: {last!r})")


def _holds_lease(client: AsyncClient) -> bool:
    return client._lanes is not None and bool(client._lanes._leases)


async def _leased(client: AsyncClient, binary_id: str, data: bytes | str = b"a",
                  **options: Any) -> int:
    """Execute one at a time until the client holds a lease: the worker pid of the last."""
    async def leased() -> int:
        pid = (await client.execute(binary_id, data, **options)).worker_pid
        return pid if _holds_lease(client) else 0

    return await _until(leased, 15, "a direct lane")


def _run(coroutine: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine, 60))


def test_one_at_a_time_executes_go_direct(lane_service):
    async def main() -> None:
        async with AsyncClient(lane_service.endpoint) as client:
            upper = (await client.load(PLUGINS / "uppercase.wat")).binary_id
            before = (await client.stats()).direct_executes
            pids = set()
            for i in range(40):
                result = await client.execute(upper, f"n{i}")
                assert result.output == f"N{i}".encode()
                pids.add(result.worker_pid)
            assert _holds_lease(client)
            assert len(pids) == 1  # one warm worker served them all, leased after the first
            await _until(lambda: _direct_executes_since(client, before, 30), 10,
                         "direct executes counted")

    _run(main())


async def _direct_executes_since(client: AsyncClient, before: int, at_least: int) -> bool:
    return (await client.stats()).direct_executes - before >= at_least


def test_gathers_while_a_lease_is_held_take_the_server_and_get_their_results(lane_service):
    async def main() -> None:
        async with AsyncClient(lane_service.endpoint) as client:
            upper = (await client.load(PLUGINS / "uppercase.wat")).binary_id
            await _leased(client, upper)
            for wave in range(3):
                results = await asyncio.gather(*(client.execute(upper, f"w{wave}-{i}")
                                                 for i in range(300)))
                assert [r.output for r in results] == [f"W{wave}-{i}".encode()
                                                       for i in range(300)]
                # Alone again: a lease held (or asked for again) serves it.
                assert (await client.execute(upper, f"a{wave}")).output == f"A{wave}".encode()

    _run(main())


def test_worker_killed_mid_direct_execute_answers_worker_lost(lane_service):
    async def main() -> None:
        async with AsyncClient(lane_service.endpoint) as client:
            spin = (await client.load(HOSTILE / "rss_hog.wat")).binary_id
            upper = (await client.load(PLUGINS / "uppercase.wat")).binary_id
            pid = await _leased(client, spin, spin_input(0), timeout_ms=20_000)
            loop = asyncio.get_running_loop()
            loop.call_later(0.3, os.kill, pid, signal.SIGKILL)
            with pytest.raises(errors.WorkerLost) as info:
                await client.execute(spin, spin_input(100_000), timeout_ms=20_000)  # many seconds
            assert info.value.details["pid"] == pid
            assert not _holds_lease(client)  # the lost lease is dropped
            assert (await client.execute(upper, "next")).output == b"NEXT"
            result = await client.execute(spin, spin_input(0), timeout_ms=20_000)
            assert result.worker_pid != pid

    _run(main())


def test_a_direct_execute_hung_in_the_host_is_killed_with_timeout(lane_service):
    async def main() -> None:
        async with AsyncClient(lane_service.endpoint) as client:
            caller = (await client.load(PLUGINS / "call_method.wat")).binary_id
            pid = await _leased(client, caller, 'slow\n{"ms": 0}', timeout_ms=300)
            with pytest.raises(errors.Timeout) as info:
                await client.execute(caller, 'slow\n{"ms": 30000}', timeout_ms=300)
            assert "killed" in info.value.message and info.value.details["pid"] == pid
            assert (await client.execute(caller, 'slow\n{"ms": 0}', timeout_ms=300)).output

    _run(main())


def test_a_revoked_lease_falls_back_through_the_server(lane_service):
    """Another tenant's burst takes the leased worker back; the holder's next execute gets
    LeaseEnded on the lane and is answered through the server, once."""
    async def main() -> None:
        async with AsyncClient(lane_service.endpoint) as holder, \
                AsyncClient(lane_service.endpoint, tenant="other") as other:
            upper = (await holder.load(PLUGINS / "uppercase.wat")).binary_id
            spin = (await other.load(HOSTILE / "rss_hog.wat")).binary_id
            await _leased(holder, upper, "warm")
            token = next(iter(holder._lanes._leases.values())).token
            results = await asyncio.gather(*(other.execute(spin, spin_input(2)) for _ in range(60)))
            assert len({r.worker_pid for r in results}) == 2, "the lease was never revoked"
            # The client still holds the revoked lease's token: the lane answers LeaseEnded.
            assert next(iter(holder._lanes._leases.values())).token == token
            for i in range(5):
                assert (await holder.execute(upper, f"after{i}")).output == f"AFTER{i}".encode()

    _run(main())


def test_a_declining_async_client_is_never_leased(lane_service):
    async def main() -> None:
        async with AsyncClient(lane_service.endpoint) as admin, \
                AsyncClient(lane_service.endpoint, direct=False) as client:
            upper = (await client.load(PLUGINS / "uppercase.wat")).binary_id

            async def no_lease() -> bool:
                return not any(w.leased for w in (await admin.stats()).workers)

            await _until(no_lease, 10, "no lease held")  # earlier tests' leases end first
            before = (await admin.stats()).direct_executes
            for i in range(20):
                assert (await client.execute(upper, f"x{i}")).output == f"X{i}".encode()
            await asyncio.sleep(0.5)  # past lease_ms: a lease, had there been one, is counted
            assert (await admin.stats()).direct_executes == before
            assert client._lanes is None

    _run(main())


def _killed(service, pid: int) -> None:
    """SIGKILL a worker and wait until the server has replaced it (asked on a client of its
    own: the lease holder must not read the server's notice before its next execute)."""
    os.kill(pid, signal.SIGKILL)
    with service.client() as watcher:
        deadline = time.monotonic() + 10
        while pid in {w.pid for w in watcher.stats().workers}:
            assert time.monotonic() < deadline, "the killed worker was never reaped"
            time.sleep(0.05)


def test_a_worker_gone_while_leased_and_idle_costs_the_client_nothing(lane_service):
    """The worker died holding the lease while nothing was on it: the next execute never
    reaches it and runs through the server, without an error."""
    async def main() -> None:
        async with AsyncClient(lane_service.endpoint) as client:
            upper = (await client.load(PLUGINS / "uppercase.wat")).binary_id
            pid = await _leased(client, upper)
            await asyncio.to_thread(_killed, lane_service, pid)
            result = await client.execute(upper, "next")
            assert result.output == b"NEXT" and result.worker_pid != pid

    _run(main())


def test_a_worker_gone_after_the_lease_ended_costs_the_client_nothing(lane_service):
    async def main() -> None:
        async with AsyncClient(lane_service.endpoint) as client, \
                AsyncClient(lane_service.endpoint, tenant="other") as other:
            upper = (await client.load(PLUGINS / "uppercase.wat")).binary_id
            spin = (await other.load(HOSTILE / "rss_hog.wat")).binary_id
            pid = await _leased(client, upper)
            await asyncio.gather(*(other.execute(spin, spin_input(2)) for _ in range(60)))

            async def revoked() -> bool:
                return not any(w.leased for w in (await client.stats()).workers)

            await _until(revoked, 10, "the lease revoked")
            await asyncio.to_thread(_killed, lane_service, pid)
            started = time.monotonic()
            result = await client.execute(upper, "after")
            assert result.output == b"AFTER" and result.worker_pid != pid
            assert time.monotonic() - started < 20  # not a wait for a timeout (30 s)

    _run(main())
