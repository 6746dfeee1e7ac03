"""The compile lane, through the wire: compiles run in their own worker processes, so another
tenant's executions never wait behind them; a module the service cannot link is refused
before any compile; a compile has a timeout and a memory cap, and the lane recovers."""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import zmq

from bench.wasm_gen import big_module
from tests.conftest import PLUGINS, raw_dealer, wait_for
from wasmcore.client.launcher import RunningService, render_toml, start_service
from wasmcore.protocol import errors
from wasmcore.protocol import messages as p
from wasmcore.protocol.settings import SandboxConfig
from wasmcore.sandbox_worker.runtime import Sandbox
from wasmcore.sandbox_worker.worker import for_compiles
from wasmcore.supervisor.compile_lane import COMPILE_NICE, TenantGate
from wasmcore.supervisor.jobs import PendingJob

ROOT = Path(__file__).resolve().parent.parent
# About 1-3 s to compile on the 2-core test machine: long enough to be seen, short for a suite.
BIG = 3_000_000
FOREIGN_IMPORTS = [("wbg", "__wbindgen_throw"), ("go", "syscall/js.valueGet"),
                   ("env", "emscripten_memcpy_big"), ("host", "log")]
LOAD_WAIT_MS = 120_000


def _send_load(sock: zmq.Socket[bytes], request_id: int, tenant: str, name: str,
               data: bytes) -> None:
    sock.send_multipart([p.encode(p.Load(id=request_id, tenant=tenant, name=name)), data])


def _reply(sock: zmq.Socket[bytes], timeout_ms: int = LOAD_WAIT_MS) -> object:
    assert sock.poll(timeout_ms), "no reply"
    return p.reply_decoder.decode(sock.recv_multipart()[0])


def _compiling(svc: RunningService) -> bool:
    """A compile is under way: on a compile worker, or (before the lane) on a pool worker."""
    with svc.client() as c:
        stats = c.stats()
    lane = getattr(stats, "compile_workers", [])
    return (any(w.state == "busy" for w in lane)
            or sum(w.state == "busy" for w in stats.workers) == len(stats.workers))


@pytest.fixture
def lane_service() -> Iterator[RunningService]:
    svc = start_service(workers=2)
    try:
        yield svc
    finally:
        svc.cleanup()


def test_executes_are_answered_while_another_tenant_loads_big_modules(lane_service):
    svc = lane_service
    with svc.client(tenant="b") as b:
        upper = b.load(PLUGINS / "uppercase.wat").binary_id
        assert b.execute(upper, "warm").output == b"WARM"
        modules = [big_module(BIG, seed=seed) for seed in (1, 2)]
        with raw_dealer(svc.endpoint) as a1, raw_dealer(svc.endpoint) as a2:
            for index, (sock, data) in enumerate(zip((a1, a2), modules, strict=True)):
                _send_load(sock, index + 1, "a", f"big{index}", data)
            wait_for(lambda: _compiling(svc), 30, "tenant a's compiles to start")
            for _ in range(5):
                assert b.execute(upper, "still served").output == b"STILL SERVED"
            # Behavioural, no timing threshold: b was served while both loads still pend.
            assert not a1.poll(0) and not a2.poll(0), "a load finished before b was served"
            loaded = [_reply(a1), _reply(a2)]
        assert all(isinstance(reply, p.Loaded) for reply in loaded), loaded
        stats = b.stats()
        # The executing workers compiled nothing: the lane did, once per module.
        assert sum(w.compiled for w in stats.workers) == 0
        assert sum(w.compiled for w in stats.compile_workers) >= 2
        with svc.client(tenant="a") as a:
            assert a.execute(loaded[0].binary_id, entry="run").output == b""
        assert sum(w.compiled for w in b.stats().workers) == 0


def test_a_tenant_takes_one_compile_worker_at_a_time():
    svc = start_service(workers=1, config={"compile": {"workers": 2, "per_tenant": 1}})
    try:
        modules = [big_module(BIG, seed=seed) for seed in (3, 4)]
        with raw_dealer(svc.endpoint) as a1, raw_dealer(svc.endpoint) as a2:
            for index, (sock, data) in enumerate(zip((a1, a2), modules, strict=True)):
                _send_load(sock, index + 1, "a", f"big{index}", data)
            wait_for(lambda: _compiling(svc), 30, "tenant a's compiles to start")
            with svc.client(tenant="b") as b:
                upper = b.load(PLUGINS / "uppercase.wat").binary_id
                assert b.execute(upper, "mine").output == b"MINE"
            assert not a1.poll(0) and not a2.poll(0), "b's load waited for a's compiles"
            assert isinstance(_reply(a1), p.Loaded) and isinstance(_reply(a2), p.Loaded)
    finally:
        svc.cleanup()


def test_unknown_imports_are_refused_before_any_compile(lane_service):
    with lane_service.client() as c:
        module = big_module(200_000, imports=FOREIGN_IMPORTS)
        with pytest.raises(errors.InvalidModule) as refused:
            c.load(data=module, name="foreign")
        assert refused.value.details["missing_imports"] == [
            "wbg.__wbindgen_throw", "go.syscall/js.valueGet", "env.emscripten_memcpy_big"]
        # Only the header is read: cut the module in half (its code section now runs past
        # the end) and it is still refused for its imports, not for being malformed.
        with pytest.raises(errors.InvalidModule) as refused:
            c.load(data=module[: len(module) // 2], name="foreign-cut")
        assert "wbg.__wbindgen_throw" in refused.value.details["missing_imports"]
        assert "does not provide" in refused.value.message
        # WAT goes through the same check.
        with pytest.raises(errors.InvalidModule) as refused:
            c.load(data=b'(module (import "env" "mystery" (func)) (func (export "run")))',
                   name="foreign-wat")
        assert refused.value.details["missing_imports"] == ["env.mystery"]
        stats = c.stats()
        assert sum(w.compiled for w in stats.workers) == 0
        assert sum(w.compiled for w in stats.compile_workers) == 0


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "not a WebAssembly module"),
        (b"\0asm\x0d\0\x01\0" + b"\0" * 16, "component"),
        (b"\0asm\x01\0\0\0\x02\xff\xff\xff\xff\x0f", "malformed"),
    ],
    ids=["png", "component", "import-section-past-the-end"],
)
def test_what_is_not_a_core_module_is_refused_with_a_clear_reason(lane_service, data, says):
    with lane_service.client() as c:
        with pytest.raises(errors.InvalidModule) as refused:
            c.load(data=data, name="not-wasm")
        assert says in refused.value.message
        upper = c.load(PLUGINS / "uppercase.wat").binary_id
        assert c.execute(upper, "ok").output == b"OK"


def test_a_compile_past_its_timeout_is_answered_and_the_lane_recovers():
    svc = start_service(workers=1, config={"compile": {"timeout_ms": 200}})
    try:
        with svc.client(tenant="a") as c:
            with pytest.raises(errors.Timeout) as late:
                c.load(data=big_module(3 * BIG, seed=5), name="slow")
            assert "compile" in late.value.message and "compile.timeout_ms" in late.value.message
            upper = c.load(PLUGINS / "uppercase.wat").binary_id  # a new compile worker
            assert c.execute(upper, "after").output == b"AFTER"
            stats = c.stats()
            assert stats.restarts_by_cause.get("compile_timeout") == 1
            assert "slow" not in {b.name for b in stats.binaries}
    finally:
        svc.cleanup()


def test_a_compile_over_its_memory_cap_is_answered_and_the_lane_recovers():
    svc = start_service(workers=1, config={"compile": {"memory_mb": 160}})
    try:
        with svc.client(tenant="a") as c:
            with pytest.raises(errors.MemoryLimit) as big:
                c.load(data=big_module(4 * BIG, seed=6), name="huge")
            assert "compile.memory_mb" in big.value.message
            upper = c.load(PLUGINS / "uppercase.wat").binary_id
            assert c.execute(upper, "after").output == b"AFTER"
    finally:
        svc.cleanup()


def test_compile_workers_run_at_a_lower_priority_than_executing_ones(lane_service):
    with lane_service.client() as c:
        stats = c.stats()

    def niceness(pid: int) -> set[int]:  # of every thread: Linux nice is per thread
        return {psutil.Process(thread.id).nice() for thread in psutil.Process(pid).threads()}

    assert {n for w in stats.workers for n in niceness(w.pid)} == {os.nice(0)}
    assert {n for w in stats.compile_workers for n in niceness(w.pid)} == {COMPILE_NICE}


def test_the_lane_follows_a_config_reload():
    svc = start_service(workers=1)
    try:
        with svc.client() as c:
            assert len(c.stats().compile_workers) == 1
            config = tomllib.loads(svc.config_path.read_text())
            config["compile"] = {"workers": 2, "per_tenant": 2, "timeout_ms": 30_000}
            svc.config_path.write_text(render_toml(config))
            wait_for(lambda: [w.state for w in c.stats().compile_workers] == ["idle", "idle"],
                     20, "two idle compile workers")
            config["compile"]["workers"] = 1
            svc.config_path.write_text(render_toml(config))
            wait_for(lambda: len(c.stats().compile_workers) == 1, 20, "one compile worker")
            upper = c.load(PLUGINS / "uppercase.wat").binary_id
            assert c.execute(upper, "reloaded").output == b"RELOADED"
            assert c.stats().config_error is None
    finally:
        svc.cleanup()


def test_shipped_config_lists_every_compile_setting():
    from wasmcore.supervisor.config import CompileConfig

    text = (ROOT / "config" / "wasm-core.toml").read_text()
    section = text.split("[compile]", 1)[1].split("\n[", 1)[0]
    for key in CompileConfig.__struct_fields__:
        assert re.search(rf"^{key} = ", section, re.M), f"compile.{key} missing"


def test_a_compile_workers_artifacts_are_an_executing_workers(tmp_path: Path):
    """The compile lane's sandbox differs (no instance pool, slow ticks), never its code."""
    module = big_module(50_000, seed=7)
    paths = []
    for config in (SandboxConfig(), for_compiles(SandboxConfig())):
        with Sandbox(config) as sandbox:
            paths.append(tmp_path / f"{len(paths)}.cwasm")
            sandbox.serialize(sandbox.compile(module), paths[-1])
    assert paths[0].read_bytes() == paths[1].read_bytes()
    with Sandbox() as executing:
        loaded = executing.load_serialized(paths[1], "x")
        assert executing.execute(loaded, b"", entry="run").output == b""


# ---------------------------------------------------------------------------- TenantGate (pure)


def _job(token: int) -> PendingJob:
    return PendingJob(token=token, envelope=None, request_id=0, header=b"", payload=None,
                      budget_s=1.0)


def test_gate_lets_in_per_tenant_and_queues_the_rest_in_order():
    gate = TenantGate(per_tenant=1)
    a1, a2, a3, b1 = _job(1), _job(2), _job(3), _job(4)
    assert gate.admit("a", a1)
    assert gate.would_wait("a") and not gate.would_wait("b")
    assert not gate.admit("a", a2) and not gate.admit("a", a3)
    assert gate.admit("b", b1)  # another tenant is not held up by a's queue
    assert gate.waiting == 2
    assert gate.done("a", a1) is a2
    assert gate.done("b", b1) is None
    assert gate.done("a", a2) is a3
    assert gate.done("a", a3) is None
    assert gate.waiting == 0 and not gate.would_wait("a")


def test_gate_cancelled_jobs_never_free_a_place_they_did_not_hold():
    gate = TenantGate(per_tenant=1)
    running, waiting = _job(1), _job(2)
    assert gate.admit("a", running) and not gate.admit("a", waiting)
    assert gate.cancel_waiting() == [waiting]
    assert gate.done("a", waiting) is None  # its completion runs when it is failed
    assert gate.would_wait("a")  # `running` still holds the tenant's place
    assert gate.done("a", running) is None and not gate.would_wait("a")


def test_gate_a_larger_limit_lets_waiting_jobs_in_at_once():
    gate = TenantGate(per_tenant=1)
    jobs = [_job(i) for i in range(4)]
    assert gate.admit("a", jobs[0])
    assert not any(gate.admit("a", job) for job in jobs[1:])
    assert gate.configure(3) == jobs[1:3]
    assert gate.waiting == 1
    assert gate.configure(1) == []
    assert gate.done("a", jobs[0]) is None  # still 2 in, over the new limit of 1
    assert gate.done("a", jobs[1]) is None
    assert gate.done("a", jobs[2]) is jobs[3]


def test_gate_a_tenants_own_compile_concurrency_overrides_per_tenant():
    """[tenants.<t>] compile_concurrency (0: compile.per_tenant) bounds that tenant only,
    and a reload's new value lets waiting jobs in."""
    own = {"big": 2}
    gate = TenantGate(per_tenant=1, override=lambda tenant: own.get(tenant, 0))
    big, small = [_job(i) for i in range(3)], [_job(i) for i in range(10, 12)]
    assert gate.admit("big", big[0]) and gate.admit("big", big[1])
    assert not gate.admit("big", big[2])
    assert gate.admit("small", small[0]) and not gate.admit("small", small[1])
    assert gate.configure(1, lambda tenant: 3 if tenant == "big" else 0) == [big[2]]
