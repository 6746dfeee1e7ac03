"""The native fast path (sandbox_worker/fastcall.py + native/fastcall.c) against the ctypes
path: the same executions give the same outcome on both (output, logs, fuel, memory, error code,
message and details), for successes, traps, fuel, timeouts, memory limits with the grow
probe's details, output and log caps, output sinks, host methods and kv. Also: the library
loads where it is committed, and a mismatch or WASMCORE_NATIVE=0 keeps the ctypes path."""

from __future__ import annotations

import ctypes
import platform
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import HOSTILE, PLUGINS
from wasmcore.protocol.errors import InternalError, WasmCoreError
from wasmcore.protocol.limits import Limits
from wasmcore.protocol.messages import HostMethodSpec, HostMethodTable
from wasmcore.sandbox_worker import _raw, fastcall
from wasmcore.sandbox_worker.host_methods import HostMethods
from wasmcore.sandbox_worker.runtime import Sandbox

MiB = 1024 * 1024
TIGHT = Limits(timeout_ms=2_000, fuel=50_000_000, memory_bytes=2 * MiB, output_bytes=64 * 1024,
               log_bytes=4 * 1024)
COMMITTED = sys.platform == "linux" and platform.machine() == "x86_64"
# The committed build links glibc's thread functions at their 2.34 symbol versions (the ticker
# thread); an older glibc cannot load it, and the Sandbox falls back to ctypes and the POSIX timer.
_libc, _libc_version = platform.libc_ver()
LOADABLE = COMMITTED and _libc == "glibc" and tuple(
    int(part) for part in _libc_version.split(".")[:2]) >= (2, 34)


@pytest.fixture(scope="module")
def methods(tmp_path_factory: pytest.TempPathFactory) -> HostMethods:
    table = HostMethodTable(
        methods=[HostMethodSpec(name=name, target=f"wasmcore.plugins.methods:{name}",
                                tenants=["*"]) for name in ("echo", "fail", "shout")],
        kv_path=str(tmp_path_factory.mktemp("kv") / "kv.sqlite3"),
        kv_quotas={"default": [0, 0]})
    return HostMethods(table, log=lambda line: None)


@pytest.fixture(scope="module")
def pair(methods: HostMethods) -> Iterator[tuple[Sandbox, Sandbox]]:
    with Sandbox(methods=methods, native=True) as native, \
            Sandbox(methods=methods, native=False) as plain:
        if LOADABLE:
            assert native._native is not None, "the committed library did not load"
        assert plain._native is None
        yield native, plain


def outcome(sandbox: Sandbox, wasm: bytes, data: bytes, fuel: bool = True,
            **kwargs: Any) -> tuple[Any, ...]:
    """What an execution reports, wall time left out (and fuel where the clock decides)."""
    module = sandbox.compile(wasm)
    try:
        result = sandbox.execute(module, data, **kwargs)
    except WasmCoreError as exc:
        details = {k: v for k, v in exc.details.items() if k != "wall_time_us"}
        if not fuel:
            details.pop("fuel_consumed", None)
        return ("error", type(exc).__name__, exc.code, exc.message, details)
    m = result.metering
    return ("ok", result.output, result.logs, m.fuel_consumed if fuel else None,
            m.peak_memory_bytes, result.logs_truncated, result.output_in_sink)


def same(pair: tuple[Sandbox, Sandbox], path: Path | bytes, data: bytes = b"",
         fuel: bool = True, **kwargs: Any) -> tuple[Any, ...]:
    wasm = path if isinstance(path, bytes) else path.read_bytes()
    native, plain = pair
    # Twice each: the first execution of a module checks its export order (another branch
    # of the native path), the second is the usual one.
    first = [outcome(s, wasm, data, fuel, **kwargs) for s in (native, plain)]
    again = [outcome(s, wasm, data, fuel, **kwargs) for s in (native, plain)]
    assert first[0] == first[1]
    assert again[0] == again[1]
    return first[0]


@pytest.mark.parametrize("data", [b"", b"hello world", bytes(range(256)) * 40])
def test_outputs_and_metering(pair, data: bytes) -> None:
    got = same(pair, PLUGINS / "uppercase.wasm", data)
    assert got[0] == "ok" and got[1] == data.upper()
    same(pair, PLUGINS / "rot13.wasm", data)
    same(pair, PLUGINS / "counter.wasm", data)


def test_env_and_entries(pair) -> None:
    env = {"A": "1", "BB": "two"}
    assert same(pair, PLUGINS / "env_reader.wasm", b"BB", env=env)[1] == b"two"
    assert same(pair, PLUGINS / "env_reader.wasm", b"", env=env)[2] == ["env-reader: 2 entries"]
    assert same(pair, PLUGINS / "env_reader.wasm", b"x", env=env)[2] == "PLUGIN_ERROR"
    assert same(pair, PLUGINS / "multi_entry.wasm", b"Mixed", entry="process")[1] == b"Mixed"
    assert same(pair, PLUGINS / "multi_entry.wasm", entry="hello")[0] == "ok"
    assert same(pair, PLUGINS / "multi_entry.wasm", entry="fail")[2] == "PLUGIN_ERROR"


# Echoes its input with one host.output per `step` bytes (step = the env's length, or 40,000),
# so that a large output crosses the native path's 64 KiB buffer in the middle of the stream.
CHUNKED_ECHO = b"""
(module
  (import "host" "output" (func $output (param i32 i32)))
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 1024))
  (func (export "alloc") (param $n i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (local.get $p) (local.get $n)))
    (if (i32.gt_u (global.get $heap) (i32.shl (memory.size) (i32.const 16)))
      (then (if (i32.eq (memory.grow (i32.add (i32.shr_u (i32.sub (global.get $heap)
                  (i32.shl (memory.size) (i32.const 16))) (i32.const 16)) (i32.const 1)))
                (i32.const -1)) (then unreachable))))
    (local.get $p))
  (func (export "process") (param $in i32) (param $len i32) (param $env i32) (param $env_len i32)
        (result i32)
    (local $i i32) (local $n i32) (local $step i32)
    (local.set $step (select (local.get $env_len) (i32.const 40000) (local.get $env_len)))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (local.get $len)))
        (local.set $n (i32.sub (local.get $len) (local.get $i)))
        (if (i32.gt_u (local.get $n) (local.get $step)) (then (local.set $n (local.get $step))))
        (call $output (i32.add (local.get $in) (local.get $i)) (local.get $n))
        (local.set $i (i32.add (local.get $i) (local.get $n)))
        (br $next)))
    (i32.const 0)))
"""


@pytest.mark.parametrize("size", [65_536, 65_537, 200_000, 1_000_003])
def test_large_outputs_keep_their_order(pair, size: int) -> None:
    data = bytes(i * 7 % 251 for i in range(size))
    assert same(pair, PLUGINS / "uppercase.wasm", data)[1] == data.upper()  # one output call
    assert same(pair, CHUNKED_ECHO, data)[1] == data  # 40,000-byte calls
    assert same(pair, CHUNKED_ECHO, data, env={"S": "x" * 9_000})[1] == data  # 9,003 each
    small = Limits(output_bytes=size - 1)
    assert same(pair, CHUNKED_ECHO, data, limits=small)[2] == "OUTPUT_LIMIT"


def test_traps(pair) -> None:
    for name in ("trap.wasm", "trap_divzero.wasm", "recursion.wasm", "nonzero.wasm"):
        assert same(pair, HOSTILE / name, b"abc", limits=TIGHT)[0] == "error"


def test_fuel_exhaustion(pair) -> None:
    got = same(pair, HOSTILE / "loop.wasm", limits=Limits(fuel=100_000))
    assert got[2] == "OUT_OF_FUEL" and got[4]["fuel_consumed"] == 100_000


@pytest.mark.parametrize("timeout_ms", [5, 60])  # a short (clock-checked) and a longer one
def test_timeout(pair, timeout_ms: int) -> None:
    got = same(pair, HOSTILE / "loop.wasm", fuel=False,
               limits=Limits(timeout_ms=timeout_ms, fuel=10**15))
    assert got[2] == "TIMEOUT"


def test_memory_limits_with_the_grow_probe_details(pair) -> None:
    limits = Limits(memory_bytes=16 * MiB)
    for name, data in (("hostile/grow16.wat", b"x"), ("hostile/big_alloc.wat", b"x"),
                       ("malloc_fail.wasm", b"x"), ("malloc_fail.wasm", b"y" * 40)):
        got = same(pair, PLUGINS / name, data, limits=limits)
        assert got[2] == "MEMORY_LIMIT" and got[4]["requested_bytes"] > 16 * MiB, got
    assert same(pair, HOSTILE / "memory_bomb.wasm", limits=TIGHT)[2] == "MEMORY_LIMIT"
    # inputs that cannot fit, before and after alloc
    assert same(pair, PLUGINS / "uppercase.wasm", b"x" * (3 * MiB), limits=TIGHT)[2] == \
        "MEMORY_LIMIT"
    assert same(pair, PLUGINS / "uppercase.wasm", b"x" * (TIGHT.memory_bytes - 1000),
                limits=TIGHT)[2] == "MEMORY_LIMIT"


def test_output_cap_and_logs(pair) -> None:
    assert same(pair, HOSTILE / "output_flood.wasm", limits=TIGHT)[2] == "OUTPUT_LIMIT"
    assert same(pair, PLUGINS / "uppercase.wasm", b"a" * 101,
                limits=Limits(output_bytes=100))[2] == "OUTPUT_LIMIT"
    assert same(pair, PLUGINS / "uppercase.wasm", b"a" * 100,
                limits=Limits(output_bytes=100))[0] == "ok"
    # logs truncated, never failing: the flood ends when its fuel does
    flood = Limits(timeout_ms=20_000, fuel=2_000_000, log_bytes=4 * 1024)
    got = same(pair, HOSTILE / "log_flood.wasm", limits=flood)
    assert got[2] == "OUT_OF_FUEL" and got[4]["logs_truncated"] is True
    assert len(got[4]["logs"]) == 4


class Sink:
    def __init__(self, threshold: int, fail: bool = False) -> None:
        self.threshold = threshold
        self.data = bytearray()
        self.fail = fail

    def write(self, address: int, length: int) -> None:
        if self.fail:
            raise OSError("disk full")
        self.data += ctypes.string_at(address, length)

    def write_bytes(self, data: bytes) -> None:
        self.data += data


def test_output_sink(pair) -> None:
    wasm = (PLUGINS / "uppercase.wasm").read_bytes()
    for data, threshold in ((b"a" * 5000, 1000), (b"b" * 10, 1000), (b"c" * 10, 0)):
        sinks = [Sink(threshold), Sink(threshold)]
        got = [outcome(s, wasm, data, output_sink=sink)
               for s, sink in zip(pair, sinks, strict=True)]
        assert got[0] == got[1] and sinks[0].data == sinks[1].data
        assert bytes(sinks[0].data) + got[0][1] == data.upper()
    # a sink whose threshold is past the native path's 64 KiB buffer: pieces kept by Python
    # before the sink takes over must reach it first
    data = bytes(i * 7 % 251 for i in range(1_000_003))
    sinks = [Sink(100_000), Sink(100_000)]
    got = [outcome(s, CHUNKED_ECHO, data, output_sink=sink)
           for s, sink in zip(pair, sinks, strict=True)]
    assert got[0] == got[1] and got[0][6] is True
    assert bytes(sinks[0].data) == bytes(sinks[1].data) == data
    failing = [outcome(s, wasm, b"c" * 5000, output_sink=Sink(1000, fail=True)) for s in pair]
    assert failing[0] == failing[1] and failing[0][2] == InternalError.code


def call_input(method: str, request: str) -> bytes:
    return f"{method}\n{request}".encode()


def test_host_methods_and_kv(pair) -> None:
    caller = PLUGINS / "call_method.wat"
    for method, request in (("echo", '{"a": 1}'), ("fail", "{}"), ("shout", '"hi"'),
                            ("nope", "{}"), ("kv.get", '{"key": "k"}')):
        got = same(pair, caller, call_input(method, request), tenant="t")
        assert got[0] == "ok" and got[2] in (["ok"], ["error"])
    # kv state is shared by both sandboxes: each path increments in turn
    native, plain = pair
    wasm = (PLUGINS / "visit_counter.wasm").read_bytes()
    outputs = [outcome(s, wasm, b"home", tenant="kv-tenant")[1] for s in (native, plain) * 2]
    assert outputs == [f"home: {n} visits".encode() for n in range(1, 5)]


def test_host_pointers_outside_memory(pair) -> None:
    from tests.test_host_methods_unit import HOSTILE_CALLER

    for entry in ("name_out", "request_out", "result_out", "result_short"):
        same(pair, HOSTILE_CALLER, entry=entry, tenant="t")
    same(pair, HOSTILE / "output_flood.wasm", limits=Limits(output_bytes=10))


def test_the_committed_library_loads() -> None:
    if not LOADABLE:
        pytest.skip("the library is committed for linux x86_64 with glibc 2.34 or later")
    assert fastcall.library() is not None


def test_the_committed_library_is_built_from_the_committed_source() -> None:
    """Editing fastcall.c means running sandbox_worker/native/build.sh and committing both."""
    if not LOADABLE:
        pytest.skip("the library is committed for linux x86_64 with glibc 2.34 or later")
    import hashlib

    lib = ctypes.CDLL(str(fastcall.LIBRARY))
    lib.fc_source_sha256.restype = ctypes.c_char_p
    source = fastcall.LIBRARY.parent / "fastcall.c"
    assert lib.fc_source_sha256().decode() == hashlib.sha256(source.read_bytes()).hexdigest()


def test_disabled_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(fastcall.DISABLE_ENV, "0")
    with Sandbox() as sandbox:
        assert sandbox._native is None
        module = sandbox.compile((PLUGINS / "uppercase.wasm").read_bytes())
        assert sandbox.execute(module, b"abc").output == b"ABC"


def test_a_layout_mismatch_refuses_the_library(monkeypatch: pytest.MonkeyPatch) -> None:
    if not fastcall.LIBRARY.is_file():
        pytest.skip("no library for this platform")
    layout = list(_raw.NATIVE_LAYOUT)
    layout[0] += 8  # as if wasmtime_extern_t had grown
    monkeypatch.setattr(_raw, "NATIVE_LAYOUT", tuple(layout))
    with pytest.raises(RuntimeError, match="layout mismatch"):
        fastcall._load()


def test_a_missing_library_falls_back(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(fastcall, "LIBRARY", tmp_path / "absent.so")
    monkeypatch.setattr(fastcall, "_loaded", False)
    monkeypatch.setattr(fastcall, "_library", None)
    assert fastcall.library() is None
    with Sandbox() as sandbox:
        assert sandbox._native is None


def _through_the_service() -> list[tuple[Any, ...]]:
    """Outcomes through a real service: output, a trap, fuel, the grow probe's details."""
    from wasmcore.client.launcher import start_service

    outcomes: list[tuple[Any, ...]] = []
    svc = start_service(workers=1)
    try:
        with svc.client() as c:
            upper = c.load(PLUGINS / "uppercase.wasm").binary_id
            result = c.execute(upper, b"through the wire")
            outcomes.append((bytes(result.output), result.metering.fuel_consumed))
            for plugin, data, kwargs in (
                ("hostile/grow16.wat", b"x", {"memory_mb": 16}),
                ("hostile/trap.wat", b"", {}),
                ("hostile/loop.wat", b"", {"fuel": 100_000}),
            ):
                binary = c.load(PLUGINS / plugin).binary_id
                with pytest.raises(WasmCoreError) as failed:
                    c.execute(binary, data, **kwargs)
                details = {k: v for k, v in failed.value.details.items()
                           if k not in ("wall_time_us", "worker_pid")}
                outcomes.append((failed.value.code, failed.value.message, details))
    finally:
        svc.cleanup()
    return outcomes


def test_both_paths_through_the_service(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker runs whichever path its environment selects; the wire cannot tell them
    apart."""
    native = _through_the_service()
    monkeypatch.setenv(fastcall.DISABLE_ENV, "0")
    plain = _through_the_service()
    assert native == plain
    assert native[0][0] == b"THROUGH THE WIRE"
    assert [o[0] for o in native[1:]] == ["MEMORY_LIMIT", "TRAP", "OUT_OF_FUEL"]
