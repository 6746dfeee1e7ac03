"""Side-by-side benchmark suite: every way of running uppercase.wasm, one table.

    python -m bench.suite                 # all rows, 100 B / 64 KiB / 1 MiB / 16 MiB
    python -m bench.suite --quick         # small counts
    python -m bench.suite --sizes 100,64K --workers-max 1 --out /tmp/r

Prints median / p90 / p99 latency and throughput per row and payload; writes the raw
results to <out>/<timestamp>.json and PNG plots beside it (default out: bench/results/).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/suite.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import rows as in_process
from bench.bench_service import start_bench_service
from bench.common import (
    BENCH_LIMITS_NOTE,
    KiB,
    MiB,
    Summary,
    endpoint_for,
    expected_output,
    machine_info,
    make_input,
    measure_serial,
    parse_size,
    size_label,
    summarize,
)
from bench.echo import AsyncEcho, BlockingEcho, EchoServer
from wasmcore.client import loadgen

DEFAULT_SIZES = [100, 64 * KiB, MiB, 16 * MiB]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
TRANSPORTS = ("ipc", "tcp")


def row_names(has_extism: bool) -> list[str]:
    """Every row a full run produces, in table order."""
    names = [n for n in in_process.IN_PROCESS if has_extism or n not in in_process.EXTISM_ROWS]
    for t in TRANSPORTS:
        names += [f"zmq echo {t}", f"zmq echo {t} in flight"]
    for t in TRANSPORTS:
        names += [f"wasm-core {t}", f"wasm-core {t} in flight"]
    return names


class Plan:
    """Counts per payload size: fewer repetitions for bigger payloads, same total bytes order."""

    def __init__(self, iterations: int, requests: int, concurrency: int) -> None:
        self.iterations = iterations
        self.requests = requests
        self.concurrency = concurrency

    def serial(self, size: int) -> int:
        return max(3, int(self.iterations * min(1.0, (16 * KiB / size) ** 0.5)))

    def inflight(self, size: int) -> tuple[int, int]:
        requests = max(8, int(self.requests * min(1.0, (16 * KiB / size) ** 0.5)))
        # Cap the bytes in flight (each one is in the client, the supervisor and a worker).
        concurrency = max(2, min(self.concurrency, (256 * MiB) // size))
        return requests, concurrency


class Progress:
    """tqdm if installed, else silent; counts executions."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar: Any = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="exec", dynamic_ncols=True, leave=False)
            except ImportError:
                pass

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def describe(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _record(rows: list[dict[str, Any]], name: str, size: int, summary: Summary,
            samples: list[float], **extra: Any) -> None:
    rows.append({"row": name, "size": size, **summary.as_dict(), **extra,
                 "samples_us": [round(s, 2) for s in samples]})


def _serial(rows: list[dict[str, Any]], name: str, fn: Callable[[bytes], bytes], size: int,
            plan: Plan, bar: Progress) -> None:
    data = make_input(size)
    if fn(data) != expected_output(data):
        raise AssertionError(f"{name}: wrong output at {size} bytes")
    bar.describe(f"{name} {size_label(size)}")
    n = plan.serial(size)
    samples = measure_serial(fn, data, n, warmup=min(50, n), progress=bar.update)
    _record(rows, name, size, summarize(samples), samples, mode="serial")


def _inflight(rows: list[dict[str, Any]], name: str, raw: loadgen.RawLoad, size: int,
              concurrency: int, processes: int = 1) -> None:
    samples = list(raw.latencies_us)
    throughput = len(samples) / max(raw.finished - raw.started, 1e-9)
    _record(rows, name, size, summarize(samples, throughput), samples, mode="inflight",
            concurrency=concurrency, processes=processes, errors=dict(raw.errors))


def run_in_process(rows: list[dict[str, Any]], sizes: list[int], plan: Plan, bar: Progress,
                   skipped: dict[str, str]) -> None:
    for name, factory in in_process.IN_PROCESS.items():
        if name in in_process.EXTISM_ROWS and in_process.extism is None:
            skipped[name] = in_process.EXTISM_MISSING
            continue
        runner = factory()
        try:
            for size in sizes:
                _serial(rows, name, runner, size, plan, bar)
        finally:
            runner.close()


def run_echo(rows: list[dict[str, Any]], transport: str, sizes: list[int], plan: Plan,
             bar: Progress) -> None:
    with EchoServer(endpoint_for(transport, "echo")) as server:
        with BlockingEcho(server.endpoint) as client:
            for size in sizes:
                bar.describe(f"zmq echo {transport} {size_label(size)}")
                n = plan.serial(size)
                samples = measure_serial(client.call, make_input(size), n, warmup=min(50, n),
                                         progress=bar.update)
                _record(rows, f"zmq echo {transport}", size, summarize(samples), samples,
                        mode="serial")
        for size in sizes:
            requests, concurrency = plan.inflight(size)
            bar.describe(f"zmq echo {transport} in flight {size_label(size)}")
            raw = asyncio.run(_echo_inflight(server.endpoint, make_input(size), requests,
                                             concurrency, bar))
            _inflight(rows, f"zmq echo {transport} in flight", raw, size, concurrency)


async def _echo_inflight(endpoint: str, data: bytes, requests: int, concurrency: int,
                         bar: Progress) -> loadgen.RawLoad:
    client = AsyncEcho(endpoint)
    try:
        await loadgen.drive(lambda: client.call(data), min(requests, 200), concurrency)
        return await loadgen.drive(lambda: client.call(data), requests, concurrency,
                                   progress=bar.update)
    finally:
        await client.close()


def run_service(rows: list[dict[str, Any]], transport: str, sizes: list[int], plan: Plan,
                workers: int, bar: Progress) -> None:
    endpoint = endpoint_for(transport, "s") if transport == "tcp" else None
    service, binary_id = start_bench_service(workers, endpoint)
    try:
        with service.client(timeout_s=120) as client:
            for size in sizes:
                _serial(rows, f"wasm-core {transport}",
                        lambda data: client.execute(binary_id, data).output, size, plan, bar)
        for size in sizes:
            requests, concurrency = plan.inflight(size)
            bar.describe(f"wasm-core {transport} in flight {size_label(size)}")
            raw = asyncio.run(_service_inflight(service.endpoint, binary_id, make_input(size),
                                                requests, concurrency, bar))
            _inflight(rows, f"wasm-core {transport} in flight", raw, size, concurrency)
    finally:
        service.cleanup()


async def _service_inflight(endpoint: str, binary_id: str, data: bytes, requests: int,
                            concurrency: int, bar: Progress) -> loadgen.RawLoad:
    from wasmcore.client.core import AsyncClient

    async with AsyncClient(endpoint, timeout_s=120) as client:
        def call() -> Any:
            return client.execute(binary_id, data)

        await loadgen.drive(call, min(requests, 200), concurrency)
        return await loadgen.drive(call, requests, concurrency, progress=bar.update)


def run_scaling(max_workers: int, size: int, plan: Plan, processes: list[int],
                bar: Progress) -> list[dict[str, Any]]:
    """Executions/s with many in flight for 1..max_workers workers (ipc)."""
    points: list[dict[str, Any]] = []
    requests, concurrency = plan.inflight(size)
    for workers in range(1, max_workers + 1):
        service, binary_id = start_bench_service(workers, None)
        try:
            for procs in processes:
                bar.describe(f"scaling {workers} workers, {procs} client(s)")
                raw = loadgen.run_processes(service.endpoint, "default", binary_id,
                                            make_input(size), requests, concurrency, procs,
                                            warmup=min(requests, 200))
                bar.update(requests)
                points.append({"workers": workers, "processes": procs, "size": size,
                               "concurrency": concurrency, "requests": requests,
                               "throughput": len(raw.latencies_us)
                               / max(raw.finished - raw.started, 1e-9),
                               "errors": dict(raw.errors)})
        finally:
            service.cleanup()
    return points


def print_table(results: dict[str, Any]) -> None:
    m = results["machine"]
    print(f"\nuppercase.wasm; nproc {m['nproc']}, python {m['python']}, wasmtime "
          f"{m['wasmtime']}, extism {m['extism']}, service workers {results['workers']}")
    print(results["note"])
    header = f"{'row':<30}{'payload':>9}{'median us':>11}{'p90 us':>11}{'p99 us':>11}" \
             f"{'ops/s':>10}{'MB/s':>9}"
    print(header)
    print("-" * len(header))
    for size in results["sizes"]:
        for r in (r for r in results["rows"] if r["size"] == size):
            name = r["row"] + (f" (c={r['concurrency']})" if r.get("mode") == "inflight" else "")
            mbps = r["throughput"] * size / 1e6
            errs = f"  errors {r['errors']}" if r.get("errors") else ""
            print(f"{name:<30}{size_label(size):>9}{r['median_us']:>11.1f}{r['p90_us']:>11.1f}"
                  f"{r['p99_us']:>11.1f}{r['throughput']:>10,.0f}{mbps:>9.1f}{errs}")
        print()
    if results["workers_scaling"]:
        print("throughput vs workers (ipc, in flight, "
              f"{size_label(results['workers_scaling'][0]['size'])}):")
        for s in results["workers_scaling"]:
            print(f"  {s['workers']} worker(s), {s['processes']} client process(es): "
                  f"{s['throughput']:,.0f} executions/s")
    for name, why in results["skipped"].items():
        print(f"skipped {name}: {why}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=lambda s: [parse_size(x) for x in s.split(",")],
                        default=DEFAULT_SIZES, help="payload sizes, e.g. 100,64K,1M,16M")
    parser.add_argument("--quick", action="store_true", help="small counts (about a minute)")
    parser.add_argument("-n", "--iterations", type=int, default=None,
                        help="one-at-a-time executions at <= 16 KiB (fewer above)")
    parser.add_argument("--requests", type=int, default=None,
                        help="requests per in-flight measurement at <= 16 KiB (fewer above)")
    parser.add_argument("--concurrency", type=int, default=512)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2,
                        help="service workers for the rows (default: nproc)")
    parser.add_argument("--workers-max", type=int, default=os.cpu_count() or 2,
                        help="throughput-vs-workers goes 1..this (0: skip)")
    parser.add_argument("--scaling-processes", type=lambda s: [int(x) for x in s.split(",")],
                        default=None, help="client processes for the scaling runs (1,2)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    iterations = args.iterations or (100 if args.quick else 2000)
    requests = args.requests or (400 if args.quick else 20_000)
    processes = args.scaling_processes or ([1] if args.quick else [1, 2])
    plan = Plan(iterations, requests, args.concurrency)
    sizes = sorted(set(args.sizes))

    total = (len(in_process.IN_PROCESS) + 2 * len(TRANSPORTS)) * sum(map(plan.serial, sizes))
    total += 2 * len(TRANSPORTS) * sum(plan.inflight(s)[0] for s in sizes)
    total += args.workers_max * len(processes) * plan.inflight(sizes[0])[0]
    bar = Progress(total, enabled=not args.no_progress)
    rows: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    started = time.time()
    try:
        run_in_process(rows, sizes, plan, bar, skipped)
        for transport in TRANSPORTS:
            run_echo(rows, transport, sizes, plan, bar)
        for transport in TRANSPORTS:
            run_service(rows, transport, sizes, plan, args.workers, bar)
        scaling = run_scaling(args.workers_max, sizes[0], plan, processes, bar)
    finally:
        bar.close()
    order = {name: i for i, name in enumerate(row_names(True))}
    rows.sort(key=lambda r: (r["size"], order.get(r["row"], 99)))
    results = {
        "started": started, "elapsed_s": time.time() - started, "machine": machine_info(),
        "note": BENCH_LIMITS_NOTE, "workers": args.workers, "sizes": sizes,
        "plan": {"iterations": iterations, "requests": requests,
                 "concurrency": args.concurrency},
        "rows": rows, "skipped": skipped, "workers_scaling": scaling,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = time.strftime("%Y%m%d-%H%M%S", time.localtime(started))
    json_path = args.out / f"{stem}.json"
    json_path.write_text(json.dumps(results))
    print_table(results)
    print(f"raw results: {json_path}")
    if not args.no_plots:
        from bench.plots import draw  # matplotlib is only needed here

        for path in draw(results, args.out, stem):
            print(f"plot: {path}")
    results["json_path"] = str(json_path)
    return results


if __name__ == "__main__":
    main()
