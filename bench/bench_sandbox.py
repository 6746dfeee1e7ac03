"""Per-execution cost of the in-process sandbox: straightforward wasmtime-py vs the fast path.

Workload: `plugins/uppercase.wasm` on 100 bytes, a fresh Store + instance every execution
(the isolation the service guarantees), same limits in every path (fuel, epoch deadline,
memory cap). The fast path is measured twice in the same run: through the native call
(sandbox_worker/fastcall.py, when its library loads) and through ctypes alone
(`Sandbox(native=False)`). Each row also reports CPU per execution (process time of a plain
loop), which the machine's other load does not inflate as much as wall time.

    python bench/bench_sandbox.py [-n ITERATIONS]     # table: median / p99 / CPU us, ratio
    pytest bench/bench_sandbox.py                     # pytest-benchmark, every path
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import wasmtime

from wasmcore.protocol.limits import Limits
from wasmcore.sandbox_worker.runtime import Sandbox

PLUGIN = Path(__file__).parent.parent / "plugins" / "uppercase.wasm"
INPUT = (b"The quick brown fox jumps over the lazy dog. " * 3)[:100]
EXPECTED = INPUT.upper()
LIMITS = Limits()


class Straightforward:
    """What one writes with wasmtime-py's public API: the honest baseline.

    Per execution: new Store (fuel, epoch deadline, memory limit), linker.instantiate,
    exports lookup by name, alloc via Func.__call__, Memory.write, process via Func.__call__,
    host functions as Python callables through Linker.define_func, Memory.read in host.output.
    """

    def __init__(self) -> None:
        config = wasmtime.Config()
        config.epoch_interruption = True
        config.consume_fuel = True
        config.max_wasm_stack = 512 * 1024
        self.engine = wasmtime.Engine(config)
        self.module = wasmtime.Module(self.engine, PLUGIN.read_bytes())
        self.linker = wasmtime.Linker(self.engine)
        i32 = wasmtime.ValType.i32()
        host_type = wasmtime.FuncType([i32, i32], [])
        self.linker.define_func("host", "output", host_type, self._output, access_caller=True)
        self.linker.define_func("host", "log", host_type, self._log, access_caller=True)
        self._out: list[bytes] = []
        self._logs: list[str] = []

    def _memory(self, caller: wasmtime.Caller) -> wasmtime.Memory:
        memory = caller["memory"]
        assert isinstance(memory, wasmtime.Memory)
        return memory

    def _output(self, caller: wasmtime.Caller, ptr: int, length: int) -> None:
        self._out.append(bytes(self._memory(caller).read(caller, ptr, ptr + length)))

    def _log(self, caller: wasmtime.Caller, ptr: int, length: int) -> None:
        data = self._memory(caller).read(caller, ptr, ptr + length)
        self._logs.append(bytes(data).decode("utf-8", "replace"))

    def execute(self, data: bytes) -> bytes:
        self._out = []
        self._logs = []
        store = wasmtime.Store(self.engine)
        store.set_limits(memory_size=LIMITS.memory_bytes)
        store.set_fuel(LIMITS.fuel)
        store.set_epoch_deadline(LIMITS.timeout_ms + 1)
        instance = self.linker.instantiate(store, self.module)
        exports = instance.exports(store)
        memory, alloc, process = exports["memory"], exports["alloc"], exports["process"]
        assert isinstance(memory, wasmtime.Memory)
        assert isinstance(alloc, wasmtime.Func) and isinstance(process, wasmtime.Func)
        ptr = alloc(store, len(data))
        memory.write(store, data, ptr)
        code = process(store, ptr, len(data), 0, 0)
        if code != 0:
            raise RuntimeError(f"plugin error {code}")
        store.get_fuel()  # metering, as the fast path reports it
        return b"".join(self._out)


class FastPath:
    """The service's runtime: `Sandbox.execute` (raw C API calls, pooling, cached exports);
    `native`: through the native call (None: whatever the Sandbox picks by default)."""

    def __init__(self, native: bool | None = None) -> None:
        self.sandbox = Sandbox(native=native)
        self.native = self.sandbox._native is not None
        self.module = self.sandbox.compile(PLUGIN.read_bytes())

    def execute(self, data: bytes) -> bytes:
        return self.sandbox.execute(self.module, data).output

    def close(self) -> None:
        self.sandbox.close()


def measure(fn: Callable[[bytes], bytes], iterations: int) -> list[float]:
    """Per-call microseconds, after a warm-up (compiled code and pools hot)."""
    for _ in range(min(1000, iterations // 10 + 1)):
        fn(INPUT)
    clock = time.perf_counter_ns
    samples: list[float] = []
    for _ in range(iterations):
        start = clock()
        fn(INPUT)
        samples.append((clock() - start) / 1000.0)
    return samples


def cpu_per_call(fn: Callable[[bytes], bytes], iterations: int) -> float:
    """Process CPU microseconds per call over a plain loop (no per-call clock reads)."""
    start = time.process_time_ns()
    for _ in range(iterations):
        fn(INPUT)
    return (time.process_time_ns() - start) / iterations / 1000.0


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--iterations", type=int, default=20_000)
    args = parser.parse_args(argv)

    straight, native, ctypes_only = Straightforward(), FastPath(), FastPath(native=False)
    paths = [("straightforward", straight.execute), ("fast path, ctypes", ctypes_only.execute)]
    if native.native:
        paths.append(("fast path, native", native.execute))
    for _, fn in paths:
        assert fn(INPUT) == EXPECTED
    rows: list[tuple[str, float, float, float]] = []
    try:
        for name, fn in paths:
            samples = measure(fn, args.iterations)
            cpu = cpu_per_call(fn, args.iterations)
            rows.append((name, statistics.median(samples), percentile(samples, 0.99), cpu))
    finally:
        native.close()
        ctypes_only.close()

    print(
        f"uppercase.wasm, {len(INPUT)}-byte input, fresh store per execution, "
        f"N={args.iterations}"
    )
    print(
        f"python {platform.python_version()}, wasmtime {metadata.version('wasmtime')}, "
        f"{platform.machine()}"
    )
    if not native.native:
        print("(native path not available here: its row is left out)")
    print(f"{'path':<18} {'median us':>10} {'p99 us':>10} {'CPU us':>10} {'vs straight':>12}")
    slow_median = rows[0][1]
    for name, median, p99, cpu in rows:
        print(f"{name:<18} {median:>10.1f} {p99:>10.1f} {cpu:>10.1f} "
              f"{slow_median / median:>11.1f}x")


# ---------------------------------------------------------------- pytest-benchmark


def test_straightforward(benchmark: Any) -> None:
    path = Straightforward()
    assert benchmark(path.execute, INPUT) == EXPECTED


def test_fast_path_ctypes(benchmark: Any) -> None:
    path = FastPath(native=False)
    try:
        assert benchmark(path.execute, INPUT) == EXPECTED
    finally:
        path.close()


def test_fast_path(benchmark: Any) -> None:
    path = FastPath()
    try:
        assert benchmark(path.execute, INPUT) == EXPECTED
    finally:
        path.close()


if __name__ == "__main__":
    main()
