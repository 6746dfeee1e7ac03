"""Direct lanes: a one-at-a-time client leased a worker, the supervisor off the data path.

Every guarantee of the server path must hold on the lane: one reply per request, the
deadline, WORKER_LOST, fairness (a lease goes back as soon as anyone's work waits), the
tenant's request rate, reloads, and nothing a stranger sends to a worker's socket runs.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import HOSTILE, PLUGINS, exchange, spin_input, wait_for
from wasmcore.client import AsyncClient, Client
from wasmcore.client.launcher import RunningService, start_service
from wasmcore.protocol import errors
from wasmcore.protocol import messages as p

# Leases that end quickly: what ran on them is counted within the tests' waits.
LEASE = {"lease_ms": 300}



def _direct_executes(client: Client) -> int:
    return client.stats().direct_executes


def _lane_sockets(service: RunningService) -> list[Path]:
    sock = Path(service.endpoint[len("ipc://"):])
    return sorted(sock.parent.glob(sock.name + ".d*"))


def _leased(client: Client, binary_id: str, data: bytes | str = b"a", **options) -> int:
    """Execute until the client holds a lease (a lease of an earlier test's client, closed
    now, may hold a worker for up to lease_ms): the worker pid of the last execute."""
    def leased() -> int:
        pid = client.execute(binary_id, data, **options).worker_pid
        return pid if _held_lease(client) is not None else 0

    return wait_for(leased, 15, "a direct lane")


def _held_lease(client: Client) -> p.DirectLease | None:
    """The lease the client holds (its only one), as the server granted it."""
    assert client._lanes is not None
    held = list(client._lanes._leases.values())
    if not held:
        return None
    lease = held[0]
    return p.DirectLease(endpoint=lease.endpoint, token=lease.token, executions=lease.left,
                         max_input_bytes=lease.max_input_bytes)



def test_one_at_a_time_executes_go_direct_and_are_counted(lane_service):
    with lane_service.client() as client:
        upper = client.load(PLUGINS / "uppercase.wat").binary_id
        before = _direct_executes(client)
        pids = {client.execute(upper, f"hello {i}").worker_pid for i in range(40)}
        outputs = [client.execute(upper, f"n{i}").output for i in range(10)]
        assert outputs == [f"N{i}".encode() for i in range(10)]
        # One warm worker served them, and all but the first went straight to it; what ran
        # on the lane is counted once the lease goes back (lease_ms).
        assert len(pids) == 1
        wait_for(lambda: _direct_executes(client) - before >= 49, 10, "direct executes counted")
        assert _held_lease(client) is not None


def test_a_client_that_declines_is_never_leased(lane_service):
    with lane_service.client() as admin, Client(lane_service.endpoint, direct=False) as client:
        upper = client.load(PLUGINS / "uppercase.wat").binary_id
        # Leases of earlier tests' clients are counted when they end: wait for that first.
        wait_for(lambda: not any(w.leased for w in admin.stats().workers), 10, "no lease held")
        before = _direct_executes(admin)
        for i in range(20):
            assert client.execute(upper, f"x{i}").output == f"X{i}".encode()
        time.sleep(0.5)  # past lease_ms: a lease, had there been one, would be counted
        assert _direct_executes(admin) == before
        assert client._lanes is None


def test_leases_go_back_when_other_work_waits(lane_service):
    """Fairness: while a client holds a worker, another tenant's burst queues; the lease is
    revoked and the burst runs on both workers. The lease holder then falls back through
    the server and still gets every answer."""
    with lane_service.client() as holder, lane_service.client(tenant="other") as other:
        spin = other.load(HOSTILE / "rss_hog.wat").binary_id
        upper = holder.load(PLUGINS / "uppercase.wat").binary_id
        _leased(holder, upper, "warm")

        async def burst() -> set[int]:
            async with AsyncClient(lane_service.endpoint, tenant="other") as burster:
                results = await asyncio.gather(*(burster.execute(spin, spin_input(2))
                                                 for _ in range(60)))
                return {r.worker_pid for r in results}

        pids = asyncio.run(burst())
        assert len(pids) == 2, "the leased worker never took a share of the waiting work"
        assert holder.execute(upper, "after").output == b"AFTER"


def test_worker_killed_mid_direct_execute_answers_worker_lost(lane_service):
    with lane_service.client() as client:
        spin = client.load(HOSTILE / "rss_hog.wat").binary_id
        upper = client.load(PLUGINS / "uppercase.wat").binary_id
        pid = _leased(client, spin, spin_input(0), timeout_ms=20_000)
        killer_done = []

        def kill_soon() -> None:
            time.sleep(0.3)
            os.kill(pid, signal.SIGKILL)
            killer_done.append(True)

        import threading

        threading.Thread(target=kill_soon, daemon=True).start()
        started = time.monotonic()
        with pytest.raises(errors.WorkerLost) as info:
            client.execute(spin, spin_input(100_000), timeout_ms=20_000)  # runs for many seconds
        assert killer_done and time.monotonic() - started < 20  # the spin alone runs for minutes
        assert info.value.details["pid"] == pid
        assert _held_lease(client) is None  # the lost lease is dropped
        assert client.execute(upper, "next").output == b"NEXT"
        assert client.execute(spin, spin_input(0), timeout_ms=20_000).worker_pid != pid


def test_a_direct_execute_hung_in_the_host_is_killed_with_timeout(lane_service):
    with lane_service.client() as client:
        caller = client.load(PLUGINS / "call_method.wat").binary_id
        pid = _leased(client, caller, 'slow\n{"ms": 0}', timeout_ms=300)
        started = time.monotonic()
        with pytest.raises(errors.Timeout) as info:
            client.execute(caller, 'slow\n{"ms": 30000}', timeout_ms=300)  # blocks in the host
        waited = time.monotonic() - started
        assert "killed" in info.value.message and info.value.details["pid"] == pid
        assert waited < 20, waited  # the supervisor's deadline, not the host method's 30 s
        assert client.execute(caller, 'slow\n{"ms": 0}', timeout_ms=300).output


def test_a_reload_ends_the_lease(lane_service, plugin_copy):
    path = plugin_copy("uppercase.wat", "shape.wat")
    with lane_service.client() as client:
        binary = client.load(path).binary_id
        assert client.execute(binary, "abc").output == b"ABC"
        _leased(client, binary, "abc")
        path.write_text((PLUGINS / "rot13.wat").read_text())
        wait_for(lambda: client.execute(binary, "abc").output == b"nop", 15,
                 "the new version served to a client that held a lease")


def test_the_request_rate_binds_direct_executes():
    svc = start_service(workers=2, config={
        "pool": LEASE,
        "tenants": {"default": {"requests_per_s": 1, "burst": 20}},
    })
    try:
        with svc.client() as client:
            upper = client.load(PLUGINS / "uppercase.wat").binary_id
            done = refused = 0
            for i in range(60):
                try:
                    client.execute(upper, f"x{i}")
                    done += 1
                except errors.QuotaExceeded:
                    refused += 1
            # The load took one; the lease reserved what was left of the burst, not more.
            assert done <= 20 + 2, done
            assert refused >= 60 - 22
    finally:
        svc.cleanup()


# ------------------------------------------------------------------ strangers on the lane


def _lane_of(service: RunningService, client: Client) -> str:
    upper = client.load(PLUGINS / "uppercase.wat").binary_id
    _leased(client, upper)
    lease = _held_lease(client)
    assert lease is not None and lease.endpoint.startswith("ipc://")
    return lease.endpoint


def _raw(endpoint: str) -> zmq.Socket[bytes]:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def test_strangers_on_a_workers_lane_run_nothing(lane_service):
    with lane_service.client() as client:
        endpoint = _lane_of(lane_service, client)
        sock = _raw(endpoint)
        try:
            reply = exchange(sock, [b"\xc1garbage"])
            assert isinstance(reply, p.ErrorReply) and reply.code == errors.BadRequest.code
            wrong = p.encode(p.DirectExecute(id=7, token=os.urandom(16)))
            assert exchange(sock, [wrong, b"x"]) == p.LeaseEnded(id=7)
            too_many = exchange(sock, [wrong, b"a", b"b"])
            assert isinstance(too_many, p.ErrorReply) and "frames" in too_many.message
            lease = _held_lease(client)
            assert lease is not None
            bad_segment = p.encode(p.DirectExecute(id=9, token=lease.token,
                                                   output_shm_into="../../etc/passwd"))
            reply = exchange(sock, [bad_segment, b"x"])
            assert isinstance(reply, p.ErrorReply) and reply.id == 9
            # Past the size bound the stranger is cut off; nobody else notices.
            sock.send_multipart([wrong, b"\0" * (lease.max_input_bytes + 8192)])
        finally:
            sock.close()
        upper = client.load(PLUGINS / "uppercase.wat").binary_id
        assert client.execute(upper, "still").output == b"STILL"


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(frames=st.lists(st.binary(max_size=64), min_size=1, max_size=4))
def test_fuzzed_frames_on_a_lane_are_answered_and_harmless(lane_service, frames):
    with lane_service.client() as client:
        endpoint = _lane_of(lane_service, client)
        sock = _raw(endpoint)
        try:
            sock.send_multipart(frames)
            assert sock.poll(5000), f"no answer to {frames!r}"
            reply = p.reply_decoder.decode(sock.recv_multipart()[0])
            assert isinstance(reply, p.ErrorReply | p.LeaseEnded | p.Executed)
        finally:
            sock.close()
        upper = client.load(PLUGINS / "uppercase.wat").binary_id
        assert client.execute(upper, "ok").output == b"OK"


def test_shutdown_with_a_lease_held_is_prompt_and_leaves_no_socket():
    # A lease not given back at drain would hold its worker to the end of the grace (30 s).
    svc = start_service(workers=2, config={"pool": {"lease_ms": 60_000,
                                                    "shutdown_grace_ms": 30_000}})
    try:
        with svc.client() as client:
            upper = client.load(PLUGINS / "uppercase.wat").binary_id
            _leased(client, upper)
            assert _lane_sockets(svc)
        started = time.monotonic()
        assert svc.stop(timeout_s=20) == 0
        assert time.monotonic() - started < 15
        assert not _lane_sockets(svc)
    finally:
        svc.cleanup()


def _other_burst(endpoint: str, spin: str) -> None:
    async def burst() -> None:
        async with AsyncClient(endpoint, tenant="other") as burster:
            await asyncio.gather(*(burster.execute(spin, spin_input(2)) for _ in range(60)))

    asyncio.run(burst())


def _killed(service: RunningService, pid: int) -> None:
    """SIGKILL a worker and wait until the server has replaced it (asked on a client of its
    own: the lease holder must not read the server's notice before its next execute)."""
    os.kill(pid, signal.SIGKILL)
    with service.client() as watcher:
        wait_for(lambda: pid not in {w.pid for w in watcher.stats().workers}, 10, "reaped")


def test_a_worker_gone_after_the_lease_ended_costs_the_client_nothing(lane_service):
    """The lease was revoked (the client does not know yet) and then its worker died: the
    next execute never reached it, so it runs through the server, without an error and
    without waiting for a timeout."""
    with lane_service.client() as client, lane_service.client(tenant="other") as other:
        upper = client.load(PLUGINS / "uppercase.wat").binary_id
        spin = other.load(HOSTILE / "rss_hog.wat").binary_id
        pid = _leased(client, upper)
        _other_burst(lane_service.endpoint, spin)
        wait_for(lambda: not any(w.leased for w in client.stats().workers), 10, "revoked")
        _killed(lane_service, pid)
        started = time.monotonic()
        result = client.execute(upper, "after")
        assert result.output == b"AFTER" and result.worker_pid != pid
        assert time.monotonic() - started < 20  # a wait for the client timeout would be 30 s


def test_a_worker_gone_while_leased_and_idle_costs_the_client_nothing(lane_service):
    """The worker died holding the lease while the client had nothing on it: the server's
    LeaseLost is about no execute of the client's, and the next one runs elsewhere."""
    with lane_service.client() as client:
        upper = client.load(PLUGINS / "uppercase.wat").binary_id
        pid = _leased(client, upper)
        _killed(lane_service, pid)
        result = client.execute(upper, "next")
        assert result.output == b"NEXT" and result.worker_pid != pid


# 400,000 bytes of output from any input: past the shared-memory threshold, so a client on
# this host gets it back in the segment it lent.
BIG_OUTPUT_WAT = b"""(module
  (import "host" "output" (func $output (param i32 i32)))
  (memory (export "memory") 8)
  (func (export "alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "process") (param i32 i32 i32 i32) (result i32)
    (call $output (i32.const 0) (i32.const 400000))
    (i32.const 0)))"""


def test_an_execute_sent_back_through_the_server_keeps_its_output_segment(lane_service):
    """The lease ended without the client knowing: its execute is answered LeaseEnded and
    resent through the server, still lending the same segment for its large output."""
    with Client(lane_service.endpoint, zero_copy=True) as client, \
            lane_service.client(tenant="other") as other:
        big = client.load(data=BIG_OUTPUT_WAT, name="big_output").binary_id
        spin = other.load(HOSTILE / "rss_hog.wat").binary_id
        _leased(client, big)
        _other_burst(lane_service.endpoint, spin)
        wait_for(lambda: not any(w.leased for w in other.stats().workers), 10, "revoked")
        result = client.execute(big, b"x")
        assert len(result.output) == 400_000
        assert isinstance(result.output, memoryview), "the output came back inline"
        del result
