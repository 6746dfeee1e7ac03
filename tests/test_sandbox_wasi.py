"""WASI preview 1 commands in the sandbox: stdin/stdout/stderr, env, exit status, caps."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from wasmcore.protocol.errors import OutOfFuel, OutputLimit, PluginError, Timeout
from wasmcore.protocol.limits import Limits
from wasmcore.sandbox_worker.runtime import CompiledModule, Sandbox

PLUGINS = Path(__file__).parent.parent / "plugins"

# A WASI command written in WAT: writes 64 KiB to stdout forever (ignores write errors).
STDOUT_FLOOD_WAT = """
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 1024))      ;; iov.buf
    (i32.store (i32.const 4) (i32.const 65536))     ;; iov.len
    (loop $forever
      (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 16)))
      (br $forever))))
"""

# Prints its environment and argv count: proves nothing of the host's env leaks in.
ENV_DUMP_WAT = """
(module
  (import "wasi_snapshot_preview1" "environ_sizes_get"
    (func $sizes (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get" (func $get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (drop (call $sizes (i32.const 0) (i32.const 4)))          ;; count@0, bytes@4
    (drop (call $get (i32.const 64) (i32.const 1024)))        ;; ptrs@64, strings@1024
    (i32.store (i32.const 16) (i32.const 1024))
    (i32.store (i32.const 20) (i32.load (i32.const 4)))
    (drop (call $fd_write (i32.const 1) (i32.const 16) (i32.const 1) (i32.const 24)))))
"""


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    with Sandbox() as sb:
        yield sb


@pytest.fixture(scope="module")
def wasi_upper(sandbox: Sandbox) -> CompiledModule:
    return sandbox.compile((PLUGINS / "wasi_upper.wasm").read_bytes())


def test_wasi_module_kind(wasi_upper: CompiledModule) -> None:
    assert wasi_upper.kind == "wasi"
    assert wasi_upper.exports == ["_start"]


def test_stdin_to_stdout_and_stderr_to_logs(sandbox: Sandbox, wasi_upper: CompiledModule) -> None:
    result = sandbox.execute(wasi_upper, b"hello wasi\n")
    assert result.output == b"HELLO WASI\n"
    assert result.logs == ["wasi_upper: 11 bytes"]
    assert result.metering.fuel_consumed > 0
    assert result.metering.peak_memory_bytes > 0


def test_exit_status_is_plugin_error(sandbox: Sandbox, wasi_upper: CompiledModule) -> None:
    with pytest.raises(PluginError) as err:
        sandbox.execute(wasi_upper, b"abc", env={"FAIL_WITH": "3"})
    assert err.value.details["plugin_code"] == 3
    assert err.value.details["logs"] == ["wasi_upper: 3 bytes"]
    assert sandbox.execute(wasi_upper, b"abc").output == b"ABC"


def test_exit_zero_is_success(sandbox: Sandbox, wasi_upper: CompiledModule) -> None:
    assert sandbox.execute(wasi_upper, b"ok", env={"FAIL_WITH": "0"}).output == b"OK"


def test_env_is_exactly_the_given_pairs(sandbox: Sandbox) -> None:
    module = sandbox.compile(ENV_DUMP_WAT.encode())
    assert sandbox.execute(module, b"", env={"A": "1", "B": "x=y"}).output == b"A=1\0B=x=y\0"
    assert sandbox.execute(module, b"").output == b""


def test_stdout_flood_hits_output_limit(sandbox: Sandbox, wasi_upper: CompiledModule) -> None:
    module = sandbox.compile(STDOUT_FLOOD_WAT.encode())
    limits = Limits(timeout_ms=2000, fuel=5_000_000, output_bytes=256 * 1024)
    with pytest.raises(OutputLimit):
        sandbox.execute(module, b"", limits=limits)
    assert sandbox.execute(wasi_upper, b"x").output == b"X"


def test_wasi_limits_apply(sandbox: Sandbox, wasi_upper: CompiledModule) -> None:
    with pytest.raises((OutOfFuel, Timeout)):
        sandbox.execute(wasi_upper, b"a" * 100_000, limits=Limits(fuel=1000))
    assert sandbox.execute(wasi_upper, b"x").output == b"X"
