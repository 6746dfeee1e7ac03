"""Micro-benchmarks of the request hot paths (pytest-benchmark).

    python -m pytest bench/test_micro.py --benchmark-only

Outside the default test run (testpaths = tests). Each case asserts its result so a broken
fast path fails rather than getting faster.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from bench.common import PLUGIN, make_input
from wasmcore.protocol import messages as p
from wasmcore.sandbox_worker.runtime import Sandbox
from wasmcore.supervisor.registry import Registry

BINARY_ID = "5b0c5e3e-1f7a-4c55-9a51-3f1c1a0d8e21"
INPUT = make_input(100)


def _execute() -> p.Execute:
    return p.Execute(id=7, tenant="acme", binary_id=BINARY_ID, timeout_ms=500)


def _executed() -> p.Executed:
    metering = p.Metering(fuel_consumed=2345, wall_time_us=14, peak_memory_bytes=65536)
    return p.Executed(id=7, metering=metering, binary_id=BINARY_ID, version=3, worker_pid=4242)


def test_encode_execute(benchmark: Any) -> None:
    request = _execute()
    assert benchmark(p.encode, request)


def test_decode_execute(benchmark: Any) -> None:
    frame = p.encode(_execute())
    assert benchmark(p.request_decoder.decode, frame).binary_id == BINARY_ID


def test_encode_executed(benchmark: Any) -> None:
    reply = _executed()
    assert benchmark(p.encode, reply)


def test_decode_executed(benchmark: Any) -> None:
    frame = p.encode(_executed())
    assert benchmark(p.reply_decoder.decode, frame).worker_pid == 4242


def _module_ref() -> p.ModuleRef:
    return p.ModuleRef(binary_id=BINARY_ID, version=3, sha256="ab" * 32,
                       blob_path="/var/lib/wasm-core/blobs/ab/" + "ab" * 32,
                       artifact_path="/dev/shm/wasm-core/" + "ab" * 32 + "-f.cwasm")


def test_encode_run_job(benchmark: Any) -> None:
    """What the supervisor builds per execute (ModuleRef + RunJob)."""

    def build() -> bytes:
        ref = _module_ref()
        return p.encode(p.RunJob(token=1, request_id=7, modules=[ref], timeout_ms=5000,
                                 fuel=2_000_000_000, memory_bytes=64 << 20))

    assert benchmark(build)


def test_job_pack_of_16_round_trip(benchmark: Any) -> None:
    """A loop turn's jobs for one worker: encoded headers spliced into one JobPack, decoded
    by the worker (per job: divide by 16)."""
    ref = _module_ref()
    headers = [p.encode(p.RunJob(token=i, request_id=i, modules=[ref], timeout_ms=5000,
                                 fuel=2_000_000_000, memory_bytes=64 << 20))
               for i in range(16)]
    payload = make_input(100)

    def round_trip() -> Any:
        frame = p.encode(p.JobPack(jobs=[msgspec.Raw(h) for h in headers],  # type: ignore[misc]
                                   payloads=[payload] * 16))
        return p.command_decoder.decode(frame)

    assert len(benchmark(round_trip).jobs) == 16


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    reg = Registry(Path(tmp_path_factory.mktemp("registry")))
    for i in range(100):  # lookups among many binaries, as in a multi-tenant service
        reg.commit(binary_id=f"{i:08d}-0000-4000-8000-000000000000", tenant=f"t{i % 10}",
                   name=f"plugin{i}", path=None, sha256=f"{i:064x}", size=100, kind="core",
                   exports=["process"])
    reg.commit(binary_id=BINARY_ID, tenant="acme", name="uppercase", path=None,
               sha256="ab" * 32, size=100, kind="core", exports=["process"])
    try:
        yield reg
    finally:
        reg.close()


def test_registry_lookup(benchmark: Any, registry: Registry) -> None:
    """The supervisor's per-request lookup plus its tenant check."""

    def owned() -> Any:
        binary = registry.get(BINARY_ID)
        assert binary is not None and binary.tenant == "acme"
        return binary

    assert benchmark(owned).name == "uppercase"


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    box = Sandbox()
    try:
        yield box
    finally:
        box.close()


def test_sandbox_fast_path(benchmark: Any, sandbox: Sandbox) -> None:
    module = sandbox.compile(PLUGIN.read_bytes())
    assert benchmark(lambda: sandbox.execute(module, INPUT).output) == INPUT.upper()
