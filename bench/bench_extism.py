"""Extism plugin executions/s: wasm-core against the Extism Python SDK, side by side.

    python -m bench.bench_extism                  # 100-byte input, 20,000 per row
    python -m bench.bench_extism --quick          # small counts
    python -m bench.bench_extism --workers 1,2 --concurrency 64 --json /tmp/extism.json

The same plugin (plugins/extism/uppercase.wasm, an Extism-ABI plugin) runs as:

- `extism fresh plugin` / `extism reused plugin`: the SDK rows of bench/suite.py
  (bench/rows.py: `Plugin(CompiledPlugin)` per call, and one Plugin for every call), one call
  at a time in this process (one core);
- `wasm-core sandbox`: the worker's runtime in-process, one execution at a time (one core);
- `wasm-core N worker(s) in flight`: the real service, one execution per request, from one
  AsyncClient with `--concurrency` requests in flight. Its CPU is the workers' plus the
  supervisor's and this client's, so on a small machine the per-core figure to compare with
  the SDK's single-core rows is the 1-worker one (read docs/performance.md).

Besides executions per second of wall time, every row reports executions per CPU-second: the
CPU time of every process doing the work (this process for the serial rows; the supervisor,
its workers and this client process for the service rows), which a shared, noisy machine
disturbs far less than wall time. It is the per-core figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import psutil

if __package__ in (None, ""):  # `python bench/bench_extism.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import rows
from bench.common import (
    EXTISM_PLUGIN,
    expected_output,
    machine_info,
    make_input,
    measure_serial,
    service_config,
    summarize,
)
from wasmcore.client import loadgen
from wasmcore.client.launcher import start_service
from wasmcore.sandbox_worker.runtime import Sandbox


class SandboxRow:
    """The worker's runtime in-process: compile once, a fresh store per execution."""

    def __init__(self) -> None:
        self.sandbox = Sandbox()
        self.module = self.sandbox.compile(EXTISM_PLUGIN.read_bytes())

    def __call__(self, data: bytes) -> bytes:
        return self.sandbox.execute(self.module, data).output

    def close(self) -> None:
        self.sandbox.close()


def _tree_cpu_s(root: psutil.Process) -> float:
    """User + system CPU seconds of `root` and its live children so far."""
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def serial_row(name: str, runner: Any, payload: bytes, iterations: int) -> dict[str, Any]:
    try:
        assert bytes(runner(payload)) == expected_output(payload), name
        for _ in range(min(500, iterations)):
            runner(payload)  # warm-up, outside the CPU count
        cpu_before = time.process_time()
        samples = measure_serial(runner, payload, iterations, warmup=0)
        cpu_s = time.process_time() - cpu_before
    finally:
        runner.close()
    summary = summarize(samples)
    return {"row": name, "mode": "serial", "cpu_s": cpu_s,
            "per_cpu_s": len(samples) / max(cpu_s, 1e-9), **summary.as_dict()}


async def _inflight(endpoint: str, binary_id: str, payload: bytes, requests: int,
                    concurrency: int) -> loadgen.RawLoad:
    from wasmcore.client.core import AsyncClient

    async with AsyncClient(endpoint, timeout_s=120) as client:
        def call() -> Any:
            return client.execute(binary_id, payload)

        await loadgen.drive(call, min(requests, 1000), concurrency)  # warm-up
        return await loadgen.drive(call, requests, concurrency)


def service_row(workers: int, payload: bytes, requests: int, concurrency: int) -> dict[str, Any]:
    service = start_service(workers=workers, config=service_config())
    try:
        with service.client() as client:
            binary_id = client.load(EXTISM_PLUGIN).binary_id
            result = client.execute(binary_id, payload)
            assert result.output == expected_output(payload)
        server = psutil.Process(service.pid)
        before = _tree_cpu_s(server) + time.process_time()
        raw = asyncio.run(_inflight(service.endpoint, binary_id, payload, requests,
                                    concurrency))
        cpu_s = _tree_cpu_s(server) + time.process_time() - before
    finally:
        service.cleanup()
    throughput = len(raw.latencies_us) / max(raw.finished - raw.started, 1e-9)
    summary = summarize(list(raw.latencies_us), throughput)
    # The CPU count includes the warm-up requests (the processes' counters cannot be split).
    done = len(raw.latencies_us) + min(requests, 1000)
    return {"row": f"wasm-core {workers} worker{'s' if workers > 1 else ''} in flight",
            "mode": "inflight", "concurrency": concurrency, "errors": dict(raw.errors),
            "cpu_s": cpu_s, "per_cpu_s": done / max(cpu_s, 1e-9), **summary.as_dict()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    payload = make_input(args.size)
    results: dict[str, Any] = {"machine": machine_info(), "payload_bytes": len(payload),
                               "plugin": str(EXTISM_PLUGIN.name), "rows": []}
    if rows.extism is None:
        results["skipped"] = rows.EXTISM_MISSING
    else:
        results["rows"].append(serial_row("extism fresh plugin", rows.ExtismFresh(), payload,
                                          args.iterations))
        results["rows"].append(serial_row("extism reused plugin", rows.ExtismReused(),
                                          payload, args.iterations))
    results["rows"].append(serial_row("wasm-core sandbox", SandboxRow(), payload,
                                      args.iterations))
    for workers in args.workers:
        results["rows"].append(service_row(workers, payload, args.requests, args.concurrency))
    return results


def print_results(results: dict[str, Any]) -> None:
    m = results["machine"]
    print(f"{results['plugin']}, {results['payload_bytes']}-byte input; {m['nproc']} CPUs, "
          f"wasmtime {m['wasmtime']}, extism {m['extism']}")
    if "skipped" in results:
        print(results["skipped"])
    # exec/s is executions over elapsed time (for serial rows 1 / mean latency, which a noisy
    # machine's stalls drag down); 1/median is what one core does between stalls.
    print(f"{'row':<30} {'exec/s':>9} {'1/median':>9} {'exec/CPU-s':>11} {'median us':>10} "
          f"{'p99 us':>9}")
    for row in results["rows"]:
        at_median = 1e6 / row["median_us"] if row["mode"] == "serial" else float("nan")
        print(f"{row['row']:<30} {row['throughput']:>9.0f} {at_median:>9.0f} "
              f"{row['per_cpu_s']:>11.0f} {row['median_us']:>10.1f} {row['p99_us']:>9.1f}"
              + (f"  errors {row['errors']}" if row.get("errors") else ""))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts (a smoke run)")
    parser.add_argument("--size", type=int, default=100, help="input bytes (default 100)")
    parser.add_argument("--iterations", type=int, default=20_000, help="serial rows' calls")
    parser.add_argument("--requests", type=int, default=20_000, help="service rows' requests")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight")
    parser.add_argument("--workers", default="1,2", help="service rows: worker counts")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    args.workers = [int(w) for w in str(args.workers).split(",") if w]
    if args.quick:  # small counts, unless given
        given = set(argv if argv is not None else sys.argv[1:])
        if "--iterations" not in given:
            args.iterations = 500
        if "--requests" not in given:
            args.requests = 1000
    results = run(args)
    print_results(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
