"""Units: executes of one client pack with the same binary and limits run as one job on one
worker (docs/architecture.md, docs/protocol.md section "Units"). Sent through the wire with
raw DEALER sockets: every request gets exactly one reply with its own outcome, whatever
happens to its unit-mates or to the worker."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from tests.conftest import FAST_POOL, HOSTILE, PLUGINS, raw_dealer, wait_for
from wasmcore.client.launcher import RunningService, start_service
from wasmcore.protocol import errors
from wasmcore.protocol import messages as p

MIX = HOSTILE / "unit_mix.wat"  # quick; 'L' loops, 'T' traps, 'H' blocks in a host call


@pytest.fixture
def unit_service() -> Iterator[RunningService]:
    svc = start_service(workers=1, config={"pool": FAST_POOL, "limits": {"timeout_ms": 2000},
                                           "tenants": {"capped": {"max_pending": 5},
                                                       "rated": {"requests_per_s": 0.01,
                                                                 "burst": 64}}})
    try:
        yield svc
    finally:
        svc.cleanup()


def _warm(svc: RunningService, binary_id: str, tenant: str = "default") -> None:
    """Executions one at a time until the binary's run time is measured as quick, so that
    executes of it may run in units (a binary not measured never does)."""
    with svc.client(tenant=tenant) as c:
        for _ in range(60):
            c.execute(binary_id, b"warm")


def _send_pack(sock: zmq.Socket[bytes], binary_id: str, inputs: list[bytes], first_id: int,
               tenant: str = "default", **options: Any) -> list[int]:
    executes = [p.Execute(id=first_id + i, tenant=tenant, binary_id=binary_id, **options)
                for i in range(len(inputs))]
    sock.send_multipart([p.encode(p.ExecutePack(executes=executes, payloads=list(inputs)))])
    return [e.id for e in executes]


def _collect(sock: zmq.Socket[bytes], ids: list[int], timeout_s: float,
             settle_s: float = 0.5) -> dict[int, list[tuple[Any, bytes | None]]]:
    """Every reply for `ids` within `timeout_s` (rpacks unpacked), then `settle_s` more to
    catch a second reply to any of them."""
    replies: dict[int, list[tuple[Any, bytes | None]]] = {}
    deadline = time.monotonic() + timeout_s
    settle_until = None
    while True:
        now = time.monotonic()
        if settle_until is None and all(i in replies for i in ids):
            settle_until = now + settle_s
        end = settle_until if settle_until is not None else deadline
        if now >= end:
            break
        if not sock.poll(max(1, int((end - now) * 1000))):
            continue
        frames = sock.recv_multipart()
        reply = p.reply_decoder.decode(frames[0])
        if isinstance(reply, p.ReplyPack):
            for one, payload in zip(reply.replies, reply.payloads, strict=True):
                replies.setdefault(one.id, []).append((one, payload))
        else:
            replies.setdefault(reply.id, []).append((reply, frames[1] if len(frames) > 1
                                                     else None))
    return replies


def _one_each(replies: dict[int, list[tuple[Any, bytes | None]]],
              ids: list[int]) -> dict[int, tuple[Any, bytes | None]]:
    assert set(replies) == set(ids), f"answered {sorted(replies)}, asked {ids}"
    twice = {i: len(r) for i, r in replies.items() if len(r) != 1}
    assert not twice, f"requests answered more than once: {twice}"
    return {i: r[0] for i, r in replies.items()}


def _unit_executes(svc: RunningService) -> int:
    with svc.client() as c:
        return c.stats().unit_executes


def test_executes_of_one_pack_run_as_units_each_answered_with_its_own_output(
        unit_service: RunningService) -> None:
    svc = unit_service
    with svc.client() as c:
        upper = c.load(PLUGINS / "uppercase.wat").binary_id
    _warm(svc, upper)
    before = _unit_executes(svc)
    inputs = [f"input number {i}".encode() for i in range(48)]
    with raw_dealer(svc.endpoint) as sock:
        ids = _send_pack(sock, upper, inputs, 1000)
        answers = _one_each(_collect(sock, ids, 20), ids)
    for request_id, data in zip(ids, inputs, strict=True):
        reply, payload = answers[request_id]
        assert isinstance(reply, p.Executed), reply
        assert payload == data.upper()
    assert _unit_executes(svc) - before >= 2  # some of them ran as units


def test_one_failing_execute_does_not_fail_its_unit_mates(unit_service: RunningService) -> None:
    """Each execute of a unit runs under its own timeout (the epoch) and fails alone: the
    looping one gets TIMEOUT, the trapping one TRAP, the others their output."""
    svc = unit_service
    with svc.client() as c:
        mix = c.load(MIX).binary_id
    _warm(svc, mix)
    before = _unit_executes(svc)
    inputs = [b"ok-0", b"L", b"ok-2", b"T", b"ok-4", b"ok-5"]
    with raw_dealer(svc.endpoint) as sock:
        ids = _send_pack(sock, mix, inputs, 2000, timeout_ms=300)
        answers = _one_each(_collect(sock, ids, 20), ids)
    outcome = {data: answers[i] for i, data in zip(ids, inputs, strict=True)}
    assert isinstance(outcome[b"L"][0], p.ErrorReply)
    assert outcome[b"L"][0].code == errors.Timeout.code
    assert outcome[b"T"][0].code == errors.Trap.code
    for data in (b"ok-0", b"ok-2", b"ok-4", b"ok-5"):
        assert isinstance(outcome[data][0], p.Executed), outcome[data]
        assert outcome[data][1] == data
    assert _unit_executes(svc) - before >= 2


def test_worker_killed_mid_unit_every_request_gets_one_reply(
        unit_service: RunningService) -> None:
    """The worker dies while a unit runs (its first execute loops until its timeout):
    every execute of the pack is answered exactly once, those of the lost unit with
    WORKER_LOST, and the service serves on with a new worker."""
    svc = unit_service
    with svc.client() as c:
        mix = c.load(MIX).binary_id
        _warm(svc, mix)
        pid = c.stats().workers[0].pid
    inputs = [b"L"] + [f"ok-{i}".encode() for i in range(1, 8)]
    with raw_dealer(svc.endpoint) as sock:
        ids = _send_pack(sock, mix, inputs, 3000, timeout_ms=5000)
        with svc.client() as c:
            wait_for(lambda: any(w.state == "busy" for w in c.stats().workers), 10,
                     "the unit running")
        time.sleep(0.2)  # well inside the looping execute's 5 s
        os.kill(pid, signal.SIGKILL)
        answers = _one_each(_collect(sock, ids, 20), ids)
    looped = answers[ids[0]][0]
    assert isinstance(looped, p.ErrorReply) and looped.code == errors.WorkerLost.code
    for request_id in ids[1:]:
        reply, payload = answers[request_id]
        if isinstance(reply, p.ErrorReply):
            assert reply.code == errors.WorkerLost.code, reply
        else:
            assert payload == inputs[ids.index(request_id)]
    with svc.client() as c:
        assert c.execute(mix, b"after").output == b"after"


def test_a_hang_in_a_unit_fails_it_with_a_clear_timeout(unit_service: RunningService) -> None:
    """An execute blocked in a host call (which the epoch cannot stop) hangs its unit: the
    supervisor's deadline for the unit (each execute's timeout, one after another, plus the
    grace) kills the worker, and every execute of that unit gets TIMEOUT saying so; each
    request is answered once."""
    svc = unit_service
    with svc.client() as c:
        mix = c.load(MIX).binary_id
    _warm(svc, mix)
    inputs = [b"H", b"ok-1", b"ok-2", b"ok-3"]
    with raw_dealer(svc.endpoint) as sock:
        ids = _send_pack(sock, mix, inputs, 4000, timeout_ms=300)
        answers = _one_each(_collect(sock, ids, 30), ids)
    hung = answers[ids[0]][0]
    assert isinstance(hung, p.ErrorReply) and hung.code == errors.Timeout.code, hung
    assert "unit" in hung.details and "hung" in hung.message, hung
    for request_id in ids[1:]:
        reply, payload = answers[request_id]
        if isinstance(reply, p.ErrorReply):  # a unit-mate of the hung one
            assert reply.code == errors.Timeout.code and "unit" in reply.details, reply
        else:
            assert payload == inputs[ids.index(request_id)]
    with svc.client() as c:
        assert c.execute(mix, b"after").output == b"after"


def test_a_unit_counts_its_executes_against_max_pending(unit_service: RunningService) -> None:
    """A tenant with max_pending 5 sends 12 executes in one pack: 5 run, 7 get
    QUOTA_EXCEEDED, exactly as if they had come one by one."""
    svc = unit_service
    with svc.client(tenant="capped") as c:
        upper = c.load(PLUGINS / "uppercase.wat").binary_id
    _warm(svc, upper, tenant="capped")
    inputs = [f"q{i}".encode() for i in range(12)]
    with raw_dealer(svc.endpoint) as sock:
        ids = _send_pack(sock, upper, inputs, 5000, tenant="capped")
        answers = _one_each(_collect(sock, ids, 20), ids)
    ran = [i for i in ids if isinstance(answers[i][0], p.Executed)]
    refused = [i for i in ids if isinstance(answers[i][0], p.ErrorReply)]
    assert len(ran) == 5 and len(refused) == 7
    assert {answers[i][0].code for i in refused} == {errors.QuotaExceeded.code}


def test_units_can_be_turned_off() -> None:
    svc = start_service(workers=1, config={"pool": {**FAST_POOL, "unit_executions": 1}})
    try:
        with svc.client() as c:
            upper = c.load(PLUGINS / "uppercase.wat").binary_id
        _warm(svc, upper)
        with raw_dealer(svc.endpoint) as sock:
            ids = _send_pack(sock, upper, [b"a"] * 16, 6000)
            answers = _one_each(_collect(sock, ids, 20), ids)
        assert all(payload == b"A" for _, payload in answers.values())
        assert _unit_executes(svc) == 0
    finally:
        svc.cleanup()


def test_a_unit_of_long_executes_is_not_declared_lost_early(
        unit_service: RunningService) -> None:
    """Executes that each run to their 600 ms timeout: a unit of two or more of them takes
    longer than one execute's budget plus the 500 ms grace, which is where a unit's deadline
    starts; the worker's heartbeats show the unit moving, so it is not killed. Each execute
    ends with its own TIMEOUT (from the epoch, not the supervisor's deadline) and the worker
    lives on."""
    svc = unit_service
    with svc.client() as c:
        mix = c.load(MIX).binary_id
        _warm(svc, mix)
        pid = c.stats().workers[0].pid
    before = _unit_executes(svc)
    with raw_dealer(svc.endpoint) as sock:
        ids = _send_pack(sock, mix, [b"L"] * 6, 7000, timeout_ms=600)
        answers = _one_each(_collect(sock, ids, 30), ids)
    for request_id in ids:
        reply = answers[request_id][0]
        assert isinstance(reply, p.ErrorReply) and reply.code == errors.Timeout.code, reply
        assert "unit" not in reply.details, reply  # its own timeout, not a lost unit
    assert _unit_executes(svc) - before >= 2  # (how many depends on the measured run time)
    with svc.client() as c:
        assert [w.pid for w in c.stats().workers] == [pid]


def test_each_execute_of_a_unit_is_admitted_against_its_tenants_rate(
        unit_service: RunningService) -> None:
    """A tenant whose bucket holds a few more requests sends a pack of 10: as many run as
    it has tokens, the rest get QUOTA_EXCEEDED (requests_per_s), one by one as if alone."""
    svc = unit_service
    with svc.client(tenant="rated") as c:
        upper = c.load(PLUGINS / "uppercase.wat").binary_id
        for _ in range(60):  # warm: measured as quick; 60 of the burst of 64 are gone
            c.execute(upper, b"warm")
    inputs = [f"r{i}".encode() for i in range(10)]
    with raw_dealer(svc.endpoint) as sock:
        ids = _send_pack(sock, upper, inputs, 8000, tenant="rated")
        answers = _one_each(_collect(sock, ids, 20), ids)
    ran = [i for i in ids if isinstance(answers[i][0], p.Executed)]
    refused = {answers[i][0].code for i in ids if isinstance(answers[i][0], p.ErrorReply)}
    assert 3 <= len(ran) <= 4, ran  # the load took one token, the burst refills slowly
    assert refused == {errors.QuotaExceeded.code}


# ------------------------------------------------------------------ execute_batch: same deadline


def test_a_hang_in_a_batch_is_found_one_inputs_timeout_after_it_stopped(
        unit_service: RunningService) -> None:
    """A batch's inputs run one after another: its deadline covers one input's timeout and
    moves with the worker's progress, like a unit's, so an input blocked in a host call is
    found after its own timeout plus the grace, not after all 100 inputs' (30 s here)."""
    svc = unit_service
    with svc.client() as c:
        mix = c.load(MIX).binary_id
        started = time.monotonic()
        with pytest.raises(errors.Timeout) as info:
            c.execute_batch(mix, [b"ok", b"H", *[b"ok"] * 98], timeout_ms=300)
        waited = time.monotonic() - started
        assert info.value.details.get("batch") == 100 and "hung" in info.value.message
        assert waited < 20, waited  # the whole batch's budget would be 30 s plus the grace
        assert c.execute(mix, b"after").output == b"after"


def test_a_batch_of_long_inputs_is_not_declared_lost_early(unit_service: RunningService) -> None:
    """Inputs that each run to their 600 ms timeout: the batch outlives one input's budget
    plus the grace, but its progress shows, so each input ends with its own TIMEOUT and the
    worker lives on."""
    svc = unit_service
    with svc.client() as c:
        mix = c.load(MIX).binary_id
        pid = c.stats().workers[0].pid
        results = c.execute_batch(mix, [b"L"] * 5, timeout_ms=600)
        assert [getattr(r, "code", None) for r in results] == [errors.Timeout.code] * 5
        assert [w.pid for w in c.stats().workers] == [pid]
