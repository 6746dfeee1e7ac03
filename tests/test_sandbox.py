"""The in-process sandbox runtime: sample plugins, every failure kind, isolation, caching."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from wasmcore.protocol.engine import engine_fingerprint
from wasmcore.protocol.errors import (
    BadRequest,
    InternalError,
    InvalidModule,
    MemoryLimit,
    OutOfFuel,
    OutputLimit,
    PluginError,
    Timeout,
    Trap,
    WasmCoreError,
)
from wasmcore.protocol.limits import Limits
from wasmcore.sandbox_worker.outcome import ExecutionResult
from wasmcore.sandbox_worker.runtime import (
    CompiledModule,
    Sandbox,
    SandboxConfig,
    deadline_ticks,
)

PLUGINS = Path(__file__).parent.parent / "plugins"
HOSTILE = PLUGINS / "hostile"

# Small caps so hostile plugins fail fast.
TIGHT = Limits(
    timeout_ms=100, fuel=50_000_000, memory_bytes=2 * 1024 * 1024, output_bytes=64 * 1024,
    log_bytes=4096,
)

# A plugin with a mutable global: outputs its value as one byte ('0' + n), then increments it.
# If any state survived between executions the output would change.
GLOBAL_COUNTER_WAT = """
(module
  (import "host" "output" (func $output (param i32 i32)))
  (memory (export "memory") 1)
  (global $n (mut i32) (i32.const 0))
  (global $heap (mut i32) (i32.const 1024))
  (func (export "alloc") (param $len i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $len)))
    (local.get $p))
  (func (export "process") (param i32 i32 i32 i32) (result i32)
    ;; memory is fresh too: byte 0 counts previous runs in memory
    (i32.store8 (i32.const 0) (i32.add (i32.const 48) (global.get $n)))
    (i32.store8 (i32.const 1) (i32.add (i32.const 48) (i32.load8_u (i32.const 100))))
    (i32.store8 (i32.const 100) (i32.add (i32.load8_u (i32.const 100)) (i32.const 1)))
    (global.set $n (i32.add (global.get $n) (i32.const 1)))
    (call $output (i32.const 0) (i32.const 2))
    (i32.const 0)))
"""

# Several output calls concatenate; logs are lines; host.output out of bounds traps.
CHATTY_WAT = """
(module
  (import "host" "output" (func $output (param i32 i32)))
  (import "host" "log" (func $log (param i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "abcline one\\nline two")
  (func (export "alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "process") (param i32 i32 i32 i32) (result i32)
    (call $output (i32.const 0) (i32.const 1))
    (call $output (i32.const 1) (i32.const 2))
    (call $log (i32.const 3) (i32.const 9))
    (call $log (i32.const 12) (i32.const 8))
    (i32.const 0))
  (func (export "oob") (result i32)
    (call $output (i32.const 65530) (i32.const 100))
    (i32.const 0)))
"""

# No memory, no alloc: only no-argument entries (and a host import) -> accepted.
NOARG_ONLY_WAT = """
(module
  (import "host" "log" (func $log (param i32 i32)))
  (func (export "ok"))
  (func (export "three") (result i32) (i32.const 3))
  (func (export "logs") (call $log (i32.const 0) (i32.const 1))))
"""


@pytest.fixture(scope="module", params=[True, False], ids=["native", "ctypes"])
def sandbox(request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    """Every test on both execution paths: the native one (fastcall.py) and ctypes."""
    with Sandbox(native=request.param) as sb:
        yield sb


def load(sandbox: Sandbox, path: Path) -> CompiledModule:
    return sandbox.compile(path.read_bytes())


def run_ok(sandbox: Sandbox, name: str = "uppercase.wasm") -> ExecutionResult:
    """A clean run after a failure: the sandbox must be fully usable."""
    result = sandbox.execute(load(sandbox, PLUGINS / name), b"still fine")
    assert result.output == b"STILL FINE"
    return result


def assert_metered(details: dict[str, object]) -> None:
    for key in ("fuel_consumed", "wall_time_us", "logs", "peak_memory_bytes"):
        assert key in details, key
    assert isinstance(details["logs"], list)


# ---------------------------------------------------------------- sample plugins


@pytest.mark.parametrize("name", ["uppercase.wasm", "uppercase.wat"])
def test_uppercase(sandbox: Sandbox, name: str) -> None:
    result = sandbox.execute(load(sandbox, PLUGINS / name), b"hello world 123")
    assert result.output == b"HELLO WORLD 123"
    assert result.logs == []
    assert not result.logs_truncated


def test_rot13(sandbox: Sandbox) -> None:
    assert sandbox.execute(load(sandbox, PLUGINS / "rot13.wasm"), b"Hello").output == b"Uryyb"


def test_counter(sandbox: Sandbox) -> None:
    result = sandbox.execute(load(sandbox, PLUGINS / "counter.wasm"), b"hello world\nfoo\n")
    assert result.output == b"bytes=16 words=3 lines=2"


def test_wordfreq_c_plugin(sandbox: Sandbox) -> None:
    result = sandbox.execute(load(sandbox, PLUGINS / "wordfreq.wasm"), b"b a b c B a b")
    assert result.output == b"b 4\na 2\nc 1\n"


def test_empty_input(sandbox: Sandbox) -> None:
    assert sandbox.execute(load(sandbox, PLUGINS / "uppercase.wasm"), b"").output == b""


def test_env_passing(sandbox: Sandbox) -> None:
    module = load(sandbox, PLUGINS / "env_reader.wasm")
    env = {"A": "1", "B": "two=2"}
    everything = sandbox.execute(module, b"", env=env)
    assert everything.output == b"A=1\nB=two=2\n"
    assert everything.logs == ["env-reader: 2 entries"]
    assert sandbox.execute(module, b"B", env=env).output == b"two=2"
    assert sandbox.execute(module, b"").output == b""  # no env at all


def test_invalid_env_key_is_bad_request(sandbox: Sandbox) -> None:
    with pytest.raises(BadRequest):
        sandbox.execute(load(sandbox, PLUGINS / "env_reader.wasm"), b"", env={"A=B": "1"})
    run_ok(sandbox)


def test_multi_entry(sandbox: Sandbox) -> None:
    module = load(sandbox, PLUGINS / "multi_entry.wasm")
    assert set(module.exports) == {"process", "hello", "fail"}
    assert sandbox.execute(module, b"echo").output == b"echo"
    assert sandbox.execute(module, b"", entry="hello").output == b"hello"
    with pytest.raises(PluginError) as err:
        sandbox.execute(module, b"", entry="fail")
    assert err.value.details["plugin_code"] == 7
    assert "7" in err.value.message
    run_ok(sandbox)


def test_output_calls_concatenate_and_logs_are_lines(sandbox: Sandbox) -> None:
    result = sandbox.execute(sandbox.compile(CHATTY_WAT.encode()), b"")
    assert result.output == b"abc"
    assert result.logs == ["line one", "line two"]


def test_noarg_only_module_without_memory(sandbox: Sandbox) -> None:
    module = sandbox.compile(NOARG_ONLY_WAT.encode())
    assert module.kind == "core"
    assert sandbox.execute(module, b"", entry="ok").output == b""
    with pytest.raises(PluginError) as err:
        sandbox.execute(module, b"", entry="three")
    assert err.value.details["plugin_code"] == 3
    # host.log needs an exported memory to read from: a clear trap, not a crash.
    with pytest.raises(Trap):
        sandbox.execute(module, b"", entry="logs")
    # Input cannot be delivered to a module without alloc.
    with pytest.raises(BadRequest):
        sandbox.execute(module, b"data")
    run_ok(sandbox)


def test_logs_truncated_not_failed(sandbox: Sandbox) -> None:
    limits = Limits(log_bytes=10)
    result = sandbox.execute(sandbox.compile(CHATTY_WAT.encode()), b"", limits=limits)
    assert result.output == b"abc"
    assert result.logs_truncated
    assert sum(len(line) for line in result.logs) <= 10


# ---------------------------------------------------------------- isolation & metering


def test_fresh_state_every_execution(sandbox: Sandbox) -> None:
    module = sandbox.compile(GLOBAL_COUNTER_WAT.encode())
    outputs = {sandbox.execute(module, b"x").output for _ in range(5)}
    assert outputs == {b"00"}


def test_metering_is_sane(sandbox: Sandbox) -> None:
    module = load(sandbox, PLUGINS / "uppercase.wasm")
    small = sandbox.execute(module, b"a" * 10).metering
    big = sandbox.execute(module, b"a" * 10_000).metering
    assert 0 < small.fuel_consumed < big.fuel_consumed <= TIGHT.fuel
    assert small.wall_time_us >= 0 and big.wall_time_us > 0
    assert small.peak_memory_bytes >= 64 * 1024
    assert big.peak_memory_bytes % (64 * 1024) == 0


def test_fuel_consumed_is_deterministic(sandbox: Sandbox) -> None:
    module = load(sandbox, PLUGINS / "counter.wasm")
    fuel = {sandbox.execute(module, b"one two\n").metering.fuel_consumed for _ in range(3)}
    assert len(fuel) == 1


# ---------------------------------------------------------------- failures, each then a clean run


def test_timeout(sandbox: Sandbox) -> None:
    limits = Limits(timeout_ms=50, fuel=10**15)
    with pytest.raises(Timeout) as err:
        sandbox.execute(load(sandbox, HOSTILE / "loop.wasm"), b"", limits=limits)
    assert err.value.code == "TIMEOUT"
    assert err.value.details["wall_time_us"] > 0
    assert_metered(err.value.details)
    run_ok(sandbox)


def test_out_of_fuel(sandbox: Sandbox) -> None:
    limits = Limits(fuel=100_000)
    with pytest.raises(OutOfFuel) as err:
        sandbox.execute(load(sandbox, HOSTILE / "loop.wasm"), b"", limits=limits)
    assert err.value.details["fuel_consumed"] == 100_000
    assert_metered(err.value.details)
    run_ok(sandbox)


def test_memory_limit(sandbox: Sandbox) -> None:
    with pytest.raises(MemoryLimit) as err:
        sandbox.execute(load(sandbox, HOSTILE / "memory_bomb.wasm"), b"", limits=TIGHT)
    assert err.value.details["peak_memory_bytes"] <= TIGHT.memory_bytes
    assert err.value.details["peak_memory_bytes"] + 64 * 1024 > TIGHT.memory_bytes
    assert_metered(err.value.details)
    run_ok(sandbox)


def test_input_that_cannot_fit_is_memory_limit(sandbox: Sandbox) -> None:
    module = load(sandbox, PLUGINS / "uppercase.wasm")
    with pytest.raises(MemoryLimit):
        sandbox.execute(module, b"x" * (3 * 1024 * 1024), limits=TIGHT)
    # Fits the cap in total but not next to what is already there: still MEMORY_LIMIT.
    with pytest.raises(MemoryLimit):
        sandbox.execute(module, b"x" * (TIGHT.memory_bytes - 1000), limits=TIGHT)
    run_ok(sandbox)


def test_output_limit(sandbox: Sandbox) -> None:
    with pytest.raises(OutputLimit) as err:
        sandbox.execute(load(sandbox, HOSTILE / "output_flood.wasm"), b"", limits=TIGHT)
    assert_metered(err.value.details)
    run_ok(sandbox)


def test_output_limit_exact_cap_is_fine(sandbox: Sandbox) -> None:
    module = load(sandbox, PLUGINS / "uppercase.wasm")
    assert len(sandbox.execute(module, b"a" * 100, limits=Limits(output_bytes=100)).output) == 100
    with pytest.raises(OutputLimit):
        sandbox.execute(module, b"a" * 101, limits=Limits(output_bytes=100))
    run_ok(sandbox)


def test_trap_with_message(sandbox: Sandbox) -> None:
    with pytest.raises(Trap) as err:
        sandbox.execute(load(sandbox, HOSTILE / "trap.wasm"), b"", limits=TIGHT)
    assert "unreachable" in err.value.message
    assert err.value.details["trap_code"] == "UNREACHABLE"
    assert_metered(err.value.details)
    run_ok(sandbox)


def test_trap_divide_by_zero(sandbox: Sandbox) -> None:
    with pytest.raises(Trap) as err:
        sandbox.execute(load(sandbox, HOSTILE / "trap_divzero.wasm"), b"abc", limits=TIGHT)
    assert "divide by zero" in err.value.message
    assert err.value.details["trap_code"] == "INTEGER_DIVISION_BY_ZERO"
    run_ok(sandbox)


def test_stack_overflow_is_trap(sandbox: Sandbox) -> None:
    with pytest.raises(Trap) as err:
        sandbox.execute(load(sandbox, HOSTILE / "recursion.wasm"), b"", limits=TIGHT)
    assert err.value.details["trap_code"] == "STACK_OVERFLOW"
    assert "stack" in err.value.message
    run_ok(sandbox)


def test_host_output_out_of_bounds_is_trap(sandbox: Sandbox) -> None:
    with pytest.raises(Trap) as err:
        sandbox.execute(sandbox.compile(CHATTY_WAT.encode()), b"", entry="oob")
    assert "host.output" in err.value.message
    run_ok(sandbox)


def test_plugin_error_code(sandbox: Sandbox) -> None:
    with pytest.raises(PluginError) as err:
        sandbox.execute(load(sandbox, HOSTILE / "nonzero.wasm"), b"", limits=TIGHT)
    assert err.value.details["plugin_code"] == 42
    assert "42" in err.value.message
    assert_metered(err.value.details)
    run_ok(sandbox)


def test_plugin_error_keeps_logs(sandbox: Sandbox) -> None:
    module = load(sandbox, PLUGINS / "env_reader.wasm")
    with pytest.raises(PluginError) as err:
        sandbox.execute(module, b"MISSING", env={"A": "1"})
    assert err.value.details["plugin_code"] == 2
    assert err.value.details["logs"] == ["env-reader: 1 entries"]
    run_ok(sandbox)


def test_log_flood_truncates_then_stops(sandbox: Sandbox) -> None:
    limits = Limits(timeout_ms=200, fuel=2_000_000, log_bytes=4096)
    with pytest.raises((Timeout, OutOfFuel)) as err:
        sandbox.execute(load(sandbox, HOSTILE / "log_flood.wasm"), b"", limits=limits)
    details = err.value.details
    assert details["logs_truncated"] is True
    assert 0 < sum(len(line) for line in details["logs"]) <= 4096
    run_ok(sandbox)


def test_unknown_entry_is_bad_request(sandbox: Sandbox) -> None:
    with pytest.raises(BadRequest) as err:
        sandbox.execute(load(sandbox, PLUGINS / "multi_entry.wasm"), b"", entry="nope")
    assert sorted(err.value.details["available"]) == ["fail", "hello", "process"]
    run_ok(sandbox)


def test_invalid_bytes(sandbox: Sandbox) -> None:
    with pytest.raises(InvalidModule) as err:
        load(sandbox, HOSTILE / "invalid.wasm")
    assert err.value.details["reason"]
    with pytest.raises(InvalidModule):
        sandbox.compile(b"\xff\xfe definitely not wasm \x00\x01")
    with pytest.raises(InvalidModule):
        sandbox.compile(b"(module (func $f (export \"f\") (unknown_instr)))")
    run_ok(sandbox)


def test_unknown_imports_listed(sandbox: Sandbox) -> None:
    with pytest.raises(InvalidModule) as err:
        load(sandbox, HOSTILE / "unknown_import.wasm")
    assert sorted(err.value.details["missing_imports"]) == ["env.mystery", "host.nope"]
    assert "env.mystery" in err.value.message
    run_ok(sandbox)


def test_host_import_with_wrong_type_refused(sandbox: Sandbox) -> None:
    wat = '(module (import "host" "log" (func (param i32))) (func (export "go")))'
    with pytest.raises(InvalidModule):
        sandbox.compile(wat.encode())


def test_core_module_without_alloc_and_only_abi_entries_refused(sandbox: Sandbox) -> None:
    wat = """(module (memory (export "memory") 1)
      (func (export "process") (param i32 i32 i32 i32) (result i32) (i32.const 0)))"""
    with pytest.raises(InvalidModule):
        sandbox.compile(wat.encode())
    with pytest.raises(InvalidModule):
        sandbox.compile(b'(module (memory (export "memory") 1))')  # no entry at all


def test_failure_in_every_kind_then_success_in_sequence(sandbox: Sandbox) -> None:
    """Interleave all failure kinds in one Sandbox; each next run is clean."""
    hostile = ["loop", "memory_bomb", "recursion", "trap", "output_flood", "nonzero"]
    limits = Limits(timeout_ms=50, fuel=20_000_000, memory_bytes=1 << 20, output_bytes=1 << 16)
    for name in hostile * 2:
        with pytest.raises(WasmCoreError):
            sandbox.execute(load(sandbox, HOSTILE / f"{name}.wasm"), b"x", limits=limits)
        run_ok(sandbox)


# ---------------------------------------------------------------- compile cache & artifacts


def test_compile_cache_hit_returns_same_object(sandbox: Sandbox) -> None:
    data = (PLUGINS / "rot13.wasm").read_bytes()
    first = sandbox.compile(data)
    assert sandbox.compile(data) is first
    assert len(first.sha256) == 64
    assert first.size == len(data)
    assert first.kind == "core"
    assert first.exports == ["process"]


def test_cache_is_lru_bounded() -> None:
    with Sandbox(SandboxConfig(cache_size=2)) as sb:
        a = sb.compile((PLUGINS / "rot13.wasm").read_bytes())
        sb.compile((PLUGINS / "uppercase.wasm").read_bytes())
        sb.compile((PLUGINS / "counter.wasm").read_bytes())
        again = sb.compile((PLUGINS / "rot13.wasm").read_bytes())
        assert again is not a
        assert sb.execute(again, b"abc").output == b"nop"


def test_serialize_roundtrip(sandbox: Sandbox, tmp_path: Path) -> None:
    module = load(sandbox, PLUGINS / "uppercase.wasm")
    artifact = tmp_path / f"{module.sha256}.{engine_fingerprint()}.cwasm"
    sandbox.serialize(module, artifact)
    assert artifact.stat().st_size > 0
    assert [p.name for p in tmp_path.iterdir()] == [artifact.name]  # no temp file left
    with Sandbox() as other:
        loaded = other.load_serialized(artifact, module.sha256)
        assert loaded.sha256 == module.sha256
        assert loaded.exports == module.exports
        assert other.execute(loaded, b"abc").output == b"ABC"
        assert other.load_serialized(artifact, module.sha256) is loaded


def test_load_serialized_garbage_is_invalid(sandbox: Sandbox, tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.cwasm"
    bogus.write_bytes(b"not an artifact")
    with pytest.raises(InvalidModule):
        sandbox.load_serialized(bogus, "0" * 64)
    run_ok(sandbox)


def test_engine_fingerprint_is_stable() -> None:
    assert engine_fingerprint() == engine_fingerprint()
    assert "wasmtime-" in engine_fingerprint()


def test_wat_text_accepted(sandbox: Sandbox) -> None:
    module = sandbox.compile((PLUGINS / "uppercase.wat").read_bytes())
    assert sandbox.execute(module, b"wat").output == b"WAT"


# ---------------------------------------------------------------- configuration & lifecycle


def test_on_demand_allocator_also_works() -> None:
    with Sandbox(SandboxConfig(pool_slots=0)) as sb:
        module = sb.compile((PLUGINS / "uppercase.wasm").read_bytes())
        assert sb.execute(module, b"abc").output == b"ABC"
        with pytest.raises(MemoryLimit):
            sb.execute(sb.compile((HOSTILE / "memory_bomb.wasm").read_bytes()), b"", limits=TIGHT)
        assert sb.execute(module, b"abc").output == b"ABC"


def test_default_limits_from_config() -> None:
    config = SandboxConfig(default_limits=Limits(fuel=10_000))
    with Sandbox(config) as sb:
        with pytest.raises(OutOfFuel):
            sb.execute(sb.compile((HOSTILE / "loop.wasm").read_bytes()), b"")


def test_closed_sandbox_refuses_work() -> None:
    sb = Sandbox()
    module = sb.compile((PLUGINS / "uppercase.wasm").read_bytes())
    sb.close()
    sb.close()  # idempotent
    with pytest.raises(InternalError):
        sb.execute(module, b"abc")


def test_timeout_with_python_thread_ticker() -> None:
    """The portable ticker (a daemon thread) enforces timeouts too."""
    with Sandbox(SandboxConfig(native_ticker=False)) as sb:
        loop = sb.compile((HOSTILE / "loop.wasm").read_bytes())
        with pytest.raises(Timeout):
            sb.execute(loop, b"", limits=Limits(timeout_ms=50, fuel=10**15))
        upper = sb.compile((PLUGINS / "uppercase.wasm").read_bytes())
        assert sb.execute(upper, b"a").output == b"A"


def test_timeout_is_not_early() -> None:
    """The deadline is rounded up to whole ticks, plus the partly elapsed current tick.
    (A unit check of the arithmetic: wall-clock assertions would be flaky on shared machines.)"""
    assert deadline_ticks(30, 20.0) == 3
    assert deadline_ticks(40, 20.0) == 3
    assert deadline_ticks(1, 10.0) == 2
    with Sandbox(SandboxConfig(epoch_tick_ms=20.0)) as sb:
        with pytest.raises(Timeout):
            sb.execute(
                sb.compile((HOSTILE / "loop.wasm").read_bytes()), b"",
                limits=Limits(timeout_ms=30, fuel=10**15),
            )


class CollectingSink:
    """An output sink that keeps what it is given (the worker's is a shm segment writer)."""

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        self.data = bytearray()

    def write(self, address: int, length: int) -> None:
        import ctypes

        self.data += ctypes.string_at(address, length)

    def write_bytes(self, data: bytes) -> None:
        self.data += data


def test_large_output_streams_into_the_sink(sandbox: Sandbox) -> None:
    upper = load(sandbox, PLUGINS / "uppercase.wasm")
    sink = CollectingSink(threshold=1000)
    result = sandbox.execute(upper, b"a" * 5000, output_sink=sink)
    assert result.output_in_sink and result.output == b"" and bytes(sink.data) == b"A" * 5000
    small = CollectingSink(threshold=1000)
    result = sandbox.execute(upper, b"b" * 10, output_sink=small)
    assert not result.output_in_sink and result.output == b"B" * 10 and not small.data


def test_sink_keeps_the_output_cap(sandbox: Sandbox) -> None:
    flood = load(sandbox, HOSTILE / "output_flood.wasm")
    sink = CollectingSink(threshold=1000)
    with pytest.raises(OutputLimit):
        sandbox.execute(flood, b"", output_sink=sink, limits=TIGHT)
    assert len(sink.data) <= TIGHT.output_bytes
    run_ok(sandbox)


def test_dropping_sandboxes_quickly_never_touches_a_freed_engine():
    """A stopped POSIX epoch timer may still deliver a notification that calls into its
    engine; the engine must outlive it. Without that, this loop crashed (SIGSEGV) within a
    second on the 2-core test machine."""
    script = (
        "import time\n"
        "from wasmcore.sandbox_worker.runtime import Sandbox, SandboxConfig\n"
        "end = time.monotonic() + 2\n"
        "while time.monotonic() < end:\n"
        "    Sandbox(SandboxConfig(epoch_tick_ms=0.02, pool_slots=1)).close()\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
