"""The cost of a host method call from wasm, in a worker's sandbox (docs/performance.md,
"Host methods").

A plugin calls `host.call` (then `host.call_result` to read the answer) K times in a loop;
the cost of one call is (time of an execution with K calls - time of one with none) / K, so
instantiation and the rest of an execution cancel out. Measured in this process with the
worker's own pieces (Sandbox + HostMethods, called from the main thread, so the SIGALRM
deadline is armed around every operator call as in a worker), for:

* `echo`: a trivial operator method (wasmcore.plugins.methods:echo on `{}`);
* `missing`: a name with no method (the refusal path: no callable runs);
* `kv.get`, `kv.set`, `kv.incr`: the built-in key-value state (SQLite in WAL mode, a
  temporary file; kv.set and kv.incr commit one transaction per call).

    python bench/bench_host_methods.py [--calls K] [--runs R]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import struct
import tempfile
import time
from pathlib import Path

from wasmcore.protocol.messages import HostMethodSpec, HostMethodTable
from wasmcore.sandbox_worker.host_methods import HostMethods
from wasmcore.sandbox_worker.runtime import Sandbox

# Input: i32 call count, then the method's name (NUL-terminated), then its JSON request.
CALLER_WAT = """
(module
  (import "host" "call"        (func $call        (param i32 i32 i32 i32) (result i64)))
  (import "host" "call_result" (func $call_result (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 4096))
  (func (export "alloc") (param $len i32) (result i32)
    (local $p i32) (local.set $p (global.get $heap))
    (global.set $heap (i32.add (local.get $p) (local.get $len))) (local.get $p))
  (func (export "process") (param $in i32) (param $len i32) (param $e i32) (param $el i32)
        (result i32)
    (local $n i32) (local $name i32) (local $name_len i32) (local $req i32) (local $r i64)
    (local.set $n (i32.load (local.get $in)))
    (local.set $name (i32.add (local.get $in) (i32.const 4)))
    (block $end (loop $scan
      (br_if $end (i32.eqz (i32.load8_u (i32.add (local.get $name) (local.get $name_len)))))
      (local.set $name_len (i32.add (local.get $name_len) (i32.const 1)))
      (br $scan)))
    (local.set $req (i32.add (local.get $name) (i32.add (local.get $name_len) (i32.const 1))))
    (block $done (loop $again
      (br_if $done (i32.eqz (local.get $n)))
      (local.set $r (call $call (local.get $name) (local.get $name_len) (local.get $req)
                    (i32.sub (i32.add (local.get $in) (local.get $len)) (local.get $req))))
      (drop (call $call_result (i32.const 1024)
              (i32.wrap_i64 (select (i64.sub (i64.const 0) (local.get $r)) (local.get $r)
                                    (i64.lt_s (local.get $r) (i64.const 0))))))
      (local.set $n (i32.sub (local.get $n) (i32.const 1)))
      (br $again)))
    (i32.const 0))
)
"""

# The baseline, in the same run: an existing host function (host.log of 2 bytes) K times.
LOG_WAT = """
(module
  (import "host" "log" (func $log (param i32 i32)))
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 4096))
  (func (export "alloc") (param $len i32) (result i32)
    (local $p i32) (local.set $p (global.get $heap))
    (global.set $heap (i32.add (local.get $p) (local.get $len))) (local.get $p))
  (func (export "process") (param $in i32) (param $len i32) (param $e i32) (param $el i32)
        (result i32)
    (local $n i32)
    (local.set $n (i32.load (local.get $in)))
    (block $done (loop $again
      (br_if $done (i32.eqz (local.get $n)))
      (call $log (i32.const 0) (i32.const 2))
      (local.set $n (i32.sub (local.get $n) (i32.const 1)))
      (br $again)))
    (i32.const 0))
)
"""

CASES = {
    "echo (trivial operator method)": ("echo", b"{}"),
    "missing (no such method)": ("missing", b"{}"),
    "kv.get": ("kv.get", b'{"key":"bench"}'),
    "kv.set": ("kv.set", b'{"key":"bench","value":{"n":1}}'),
    "kv.incr": ("kv.incr", b'{"key":"counter"}'),
}


def payload(calls: int, name: str, request: bytes) -> bytes:
    return struct.pack("<i", calls) + name.encode() + b"\0" + request


def measure(sandbox: Sandbox, module: object, calls: int, name: str, request: bytes,
            runs: int) -> tuple[float, float]:
    """Median and least microseconds per call over `runs` pairs of executions."""
    with_calls = payload(calls, name, request)
    without = payload(0, name, request)
    per_call = []
    for _ in range(runs):
        started = time.perf_counter()
        sandbox.execute(module, without, tenant="bench")  # type: ignore[arg-type]
        base = time.perf_counter() - started
        started = time.perf_counter()
        sandbox.execute(module, with_calls, tenant="bench")  # type: ignore[arg-type]
        full = time.perf_counter() - started
        per_call.append((full - base) / calls * 1e6)
    return statistics.median(per_call), min(per_call)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="host calls per execution")
    parser.add_argument("--runs", type=int, default=15, help="executions of each kind")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        table = HostMethodTable(
            methods=[HostMethodSpec(name="echo", target="wasmcore.plugins.methods:echo",
                                    tenants=["*"])],
            kv_path=str(Path(tmp) / "kv.sqlite3"), kv_quotas={"default": [0, 0]})
        methods = HostMethods(table, preempt=True)  # as in a worker
        ok, _ = methods.call("bench", "kv.set", b'{"key":"bench","value":{"n":1}}')
        assert ok
        with Sandbox(methods=methods) as sandbox:
            module = sandbox.compile(CALLER_WAT.encode())
            baseline = sandbox.compile(LOG_WAT.encode())
            print(f"# {platform.python_implementation()} {platform.python_version()}, "
                  f"{args.calls} calls per execution, {args.runs} runs")
            print(f"{'call':34} {'median us':>10} {'least us':>10} {'x host.log':>10}")
            log_us = measure(sandbox, baseline, args.calls, "", b"", args.runs)
            print(f"{'host.log (baseline)':34} {log_us[0]:10.2f} {log_us[1]:10.2f} "
                  f"{1.0:10.1f}")
            for label, (name, request) in CASES.items():
                calls = args.calls if not name.startswith(("kv.set", "kv.incr")) else max(
                    1, args.calls // 10)  # a commit each: fewer of them
                median, least = measure(sandbox, module, calls, name, request, args.runs)
                print(f"{label:34} {median:10.2f} {least:10.2f} {median / log_us[0]:10.1f}")
        methods.close()


if __name__ == "__main__":
    main()
