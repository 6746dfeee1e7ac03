"""A large payload end to end against the in-process fast path, in one run.

    python bench/bench_large.py [--mib 16] [--runs 30]

Rows: `Sandbox.execute` in this process; the service through `Client()` (output copied into
bytes) and `Client(zero_copy=True)` (output as a view of the mapped segment). Same plugin
(uppercase), same input, same raised limits. Prints medians and the ratio to in-process.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from wasmcore.client.core import Client  # noqa: E402
from wasmcore.client.launcher import start_service  # noqa: E402
from wasmcore.protocol.limits import Limits  # noqa: E402
from wasmcore.sandbox_worker.runtime import Sandbox, SandboxConfig  # noqa: E402

MiB = 1024 * 1024
UPPERCASE = ROOT / "plugins" / "uppercase.wasm"


def median_ms(fn, runs: int) -> float:
    fn()  # warm: compile caches, allocator thresholds, page cache
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=16)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    data = b"x" * (args.mib * MiB)
    limits = Limits(memory_bytes=256 * MiB, output_bytes=64 * MiB, fuel=10**12,
                    timeout_ms=60_000)
    sandbox = Sandbox(SandboxConfig(default_limits=limits))
    module = sandbox.compile(UPPERCASE.read_bytes())
    base = median_ms(lambda: sandbox.execute(module, data, limits=limits), args.runs)
    sandbox.close()
    print(f"{args.mib} MiB uppercase, {args.runs} runs each, medians")
    print(f"{'in-process fast path':34} {base:8.1f} ms  1.00x")
    svc = start_service(workers=2, config={
        "server": {"log_level": "warning"},
        "limits": {"memory_mb": 256, "output_bytes": 64 * MiB, "fuel": 10**12,
                   "timeout_ms": 60_000},
    })
    try:
        for zero_copy in (False, True):
            with Client(svc.endpoint, zero_copy=zero_copy) as client:
                binary = client.load(UPPERCASE).binary_id
                result = client.execute(binary, data)
                assert len(result.output) == len(data) and bytes(result.output[:1]) == b"X"
                ms = median_ms(lambda c=client, b=binary: c.execute(b, data), args.runs)
            label = "service, Client(zero_copy=True)" if zero_copy else "service, Client()"
            print(f"{label:34} {ms:8.1f} ms  {ms / base:.2f}x")
    finally:
        svc.cleanup()


if __name__ == "__main__":
    main()
