"""Tenants share the service: one tenant's flood, queued bytes or long chains cannot starve,
fill or hold it for the others. Through the wire, with raw DEALER sockets for the flood."""

from __future__ import annotations

import struct
import time
from typing import Any

import pytest
import zmq

from tests.conftest import HOSTILE, PLUGINS, raw_dealer, wait_for
from wasmcore.client.launcher import start_service
from wasmcore.protocol import errors
from wasmcore.protocol import messages as p

KiB = 1024
MiB = 1024 * KiB
FAST_POOL = {"deadline_grace_ms": 500, "heartbeat_interval_ms": 100,
             "heartbeat_timeout_ms": 2000}

# A WASI command that spins until `SPIN_MS` of wall time have passed (WASI's monotonic
# clock), then exits 0: a step that takes a known time and succeeds.
SPIN_WAT = """
(module
  (import "wasi_snapshot_preview1" "clock_time_get"
    (func $clock (param i32 i64 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (local $end i64)
    (drop (call $clock (i32.const 1) (i64.const 0) (i32.const 0)))
    (local.set $end (i64.add (i64.load (i32.const 0)) (i64.const SPIN_NS)))
    (loop $spin
      (drop (call $clock (i32.const 1) (i64.const 0) (i32.const 0)))
      (br_if $spin (i64.lt_u (i64.load (i32.const 0)) (local.get $end))))))
"""


def spin_module(ms: int) -> bytes:
    return SPIN_WAT.replace("SPIN_NS", str(ms * 1_000_000)).encode()


def hog_input(spin_millions: int) -> bytes:
    """rss_hog's input: touch no memory, spin this many million loop iterations, succeed."""
    return struct.pack("<II", 0, spin_millions)


def send_execute(sock: zmq.Socket[bytes], request_id: int, tenant: str, binary_id: str,
                 payload: bytes) -> None:
    header = p.encode(p.Execute(id=request_id, tenant=tenant, binary_id=binary_id))
    sock.send_multipart([header, payload])


def receive(sock: zmq.Socket[bytes], count: int, wait_s: float) -> dict[int, Any]:
    """`count` replies by request id, within `wait_s`; fails on a second reply to one id."""
    replies: dict[int, Any] = {}
    deadline = time.monotonic() + wait_s
    while len(replies) < count:
        left_ms = int((deadline - time.monotonic()) * 1000)
        assert left_ms > 0 and sock.poll(left_ms), f"only {len(replies)}/{count} replies"
        reply = p.reply_decoder.decode(sock.recv_multipart()[0])
        assert reply.id not in replies, f"two replies to request {reply.id}"
        replies[reply.id] = reply
    return replies


def received_so_far(sock: zmq.Socket[bytes]) -> int:
    count = 0
    while sock.poll(0):
        sock.recv_multipart()
        count += 1
    return count


# --------------------------------------------------------------------------- fair share


def test_one_tenants_flood_does_not_starve_another():
    """Tenant A keeps 300 slow requests queued; tenant B's one request is served at the next
    free worker, while most of A's are still waiting (before: B waited for all of A's)."""
    svc = start_service(workers=2, config={"server": {"log_level": "warning"}})
    flood = 300
    try:
        with svc.client(tenant="a") as a, svc.client(tenant="b") as b:
            hog = a.load(HOSTILE / "rss_hog.wat").binary_id
            upper = b.load(PLUGINS / "uppercase.wat").binary_id
            with raw_dealer(svc.endpoint) as sock:
                for request_id in range(1, flood + 1):
                    send_execute(sock, request_id, "a", hog, hog_input(4))
                wait_for(lambda: b.stats().queue_depth >= flood // 2, 30, "A's flood queued")
                assert b.execute(upper, "b's turn").output == b"B'S TURN"
                done_before_b = received_so_far(sock)
                assert done_before_b < flood // 2, f"B waited for {done_before_b} of A's"
                replies = receive(sock, flood - done_before_b, 120)
                assert all(isinstance(r, p.Executed) for r in replies.values())
    finally:
        svc.cleanup()


def test_tenant_pending_cap_answers_quota_exceeded_and_spares_the_others():
    """`[tenants.capped] max_pending = 2`: its third request in flight gets QUOTA_EXCEEDED
    with the count and the limit; another tenant is served meanwhile."""
    svc = start_service(workers=1, config={
        "server": {"log_level": "warning"},
        "limits": {"fuel": 10**13, "timeout_ms": 30_000},
        "tenants": {"capped": {"max_pending": 2}},
    })
    try:
        with svc.client(tenant="capped") as capped, svc.client(tenant="other") as other:
            hog = capped.load(HOSTILE / "rss_hog.wat").binary_id
            upper = other.load(PLUGINS / "uppercase.wat").binary_id
            with raw_dealer(svc.endpoint) as sock:
                for request_id in (1, 2, 3):
                    send_execute(sock, request_id, "capped", hog, hog_input(100))
                refused = receive(sock, 1, 10)
                assert list(refused) == [3]
                assert refused[3].code == "QUOTA_EXCEEDED"
                assert refused[3].details == {"quota": "max_pending", "limit": 2, "used": 2}
                assert other.execute(upper, "meanwhile").output == b"MEANWHILE"
                replies = receive(sock, 2, 60)
                assert sorted(replies) == [1, 2]
                assert all(isinstance(r, p.Executed) for r in replies.values())
    finally:
        svc.cleanup()


def test_queued_bytes_are_bounded_per_tenant_and_in_all():
    """Payloads waiting for a busy worker are bounded per tenant (2 MiB here) and for the
    server (3 MiB): past the tenant's QUOTA_EXCEEDED, past the server's BUSY, says how much is
    held; a request over a bound on its
    own gets PAYLOAD_TOO_LARGE. Every request gets exactly one reply."""
    svc = start_service(workers=1, config={
        "server": {"log_level": "warning", "max_queued_bytes": 3 * MiB, "shm_dir": "off"},
        "limits": {"fuel": 10**13, "timeout_ms": 30_000},
        "tenants": {"default": {"max_queued_bytes": 2 * MiB}},
    })
    chunk = b"x" * (900 * KiB)
    try:
        with svc.client(tenant="a") as a, svc.client(tenant="b") as b:
            hog = a.load(HOSTILE / "rss_hog.wat").binary_id
            upper_a = a.load(PLUGINS / "uppercase.wat").binary_id
            upper_b = b.load(PLUGINS / "uppercase.wat").binary_id
            with raw_dealer(svc.endpoint) as sock:
                send_execute(sock, 1, "a", hog, hog_input(300))  # holds the only worker
                wait_for(lambda: a.stats().in_flight == 1, 10, "the hog to start")
                send_execute(sock, 2, "a", upper_a, chunk)
                send_execute(sock, 3, "a", upper_a, chunk)
                send_execute(sock, 4, "a", upper_a, chunk)  # a: 2.7 MiB > 2 MiB
                send_execute(sock, 5, "b", upper_b, chunk)  # all: 2.7 MiB, fits
                send_execute(sock, 6, "b", upper_b, chunk)  # all: 3.5 MiB > 3 MiB
                send_execute(sock, 7, "b", upper_b, b"y" * (2 * MiB + 1))  # alone > 2 MiB
                replies = receive(sock, 7, 60)
        tenant_busy, server_busy, too_large = replies[4], replies[6], replies[7]
        assert tenant_busy.code == "QUOTA_EXCEEDED"
        assert tenant_busy.details["quota"] == "max_queued_bytes"
        assert tenant_busy.details["limit"] == 2 * MiB
        assert 2 * len(chunk) < tenant_busy.details["used"] < 2 * MiB
        assert server_busy.code == "BUSY"
        assert server_busy.details["limit"] == 3 * MiB
        assert 3 * len(chunk) < server_busy.details["queued_bytes"] < 3 * MiB
        assert too_large.code == "PAYLOAD_TOO_LARGE"
        assert too_large.details == {"size": too_large.details["size"], "limit": 2 * MiB}
        for request_id in (1, 2, 3, 5):
            assert isinstance(replies[request_id], p.Executed), replies[request_id]
    finally:
        svc.cleanup()


# --------------------------------------------------------------------------- chains


@pytest.fixture(scope="module")
def chain_service():
    svc = start_service(workers=2, config={"server": {"log_level": "warning"},
                                           "pool": FAST_POOL})
    try:
        yield svc
    finally:
        svc.cleanup()


def test_chain_timeout_is_the_whole_chains_budget(chain_service):
    """Each step spins 60% of the timeout: the second step runs out of what is left of the
    chain's one budget and the chain gets TIMEOUT there (before: each step had the whole
    timeout, so three such steps took 1.8 timeouts and succeeded)."""
    with chain_service.client() as c:
        spin = c.load(data=spin_module(1200), name="spin1200").binary_id
        assert len(c.chain([spin, spin], "x", timeout_ms=5000).steps) == 2
        with pytest.raises(errors.Timeout) as info:
            c.chain([spin, spin, spin], "x", timeout_ms=2000)
    assert info.value.details["step"] == 1
    assert info.value.details["timeout_ms"] == 2000
    assert "2000 ms" in info.value.message


def test_supervisor_deadline_of_a_chain_is_its_budget_not_steps_times_it(chain_service):
    """A chain stuck in a host call is ended by the supervisor at its one budget plus the
    grace; the TIMEOUT reply names that budget (before: steps x timeout)."""
    with chain_service.client() as c:
        sleeper = c.load(HOSTILE / "sleep.wat").binary_id
        with pytest.raises(errors.Timeout) as info:
            c.chain([sleeper, sleeper, sleeper], "x", timeout_ms=300)
    assert info.value.details["timeout_ms"] == 300
    assert "pid" in info.value.details  # the supervisor's deadline, not the worker's epoch


def test_chain_steps_are_capped(chain_service):
    """More than `server.max_chain_steps` (32 by default) steps: BAD_REQUEST with the count
    and the limit, before any binary is looked up."""
    with chain_service.client() as c:
        upper = c.load(PLUGINS / "uppercase.wat").binary_id
        assert c.chain([upper] * 32, "ok").output == b"OK"
        with pytest.raises(errors.BadRequest) as info:
            c.chain([upper] * 33, "too long")
    assert info.value.details == {"steps": 33, "limit": 32}
