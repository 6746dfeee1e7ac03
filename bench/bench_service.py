"""Service end to end: execute round trip and throughput, against a bare pyzmq echo.

In one run, on ipc:// and on tcp://127.0.0.1:<free port>:
  (a) round trip of `Client.execute` (uppercase.wasm, 100-byte input), one at a time;
  (b) the same payload through a bare DEALER-ROUTER echo server in its own process;
  (c) executions/s with many in flight (`AsyncClient`), from 1 and from 2 client processes,
      and the echo's own in-flight ceiling with the same client shape.

    python -m bench.bench_service [--quick] [--workers N] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/bench_service.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    BENCH_LIMITS_NOTE,
    PLUGIN,
    Summary,
    endpoint_for,
    expected_output,
    machine_info,
    make_input,
    measure_serial,
    service_config,
    summarize,
)
from bench.echo import AsyncEcho, BlockingEcho, EchoServer
from wasmcore.client import loadgen
from wasmcore.client.launcher import RunningService, start_service

TARGET_RATIO = 2.5  # issue 16: one-at-a-time median at most 2.5x the echo (p99 3x)
TARGET_THROUGHPUT = 15_000


def echo_serial(endpoint: str, payload: bytes, iterations: int) -> Summary:
    with BlockingEcho(endpoint) as client:
        assert client.call(payload) == payload
        return summarize(measure_serial(client.call, payload, iterations,
                                        warmup=min(500, iterations)))


def echo_inflight(endpoint: str, payload: bytes, requests: int, concurrency: int) -> Summary:
    async def run() -> loadgen.RawLoad:
        client = AsyncEcho(endpoint)
        try:
            await loadgen.drive(lambda: client.call(payload), min(1000, requests), concurrency)
            return await loadgen.drive(lambda: client.call(payload), requests, concurrency)
        finally:
            await client.close()

    raw = asyncio.run(run())
    return summarize(list(raw.latencies_us), len(raw.latencies_us) / (raw.finished - raw.started))


def start_bench_service(workers: int, endpoint: str | None) -> tuple[RunningService, str]:
    service = start_service(workers=workers, config=service_config(), endpoint=endpoint)
    with service.client() as client:
        binary_id = client.load(PLUGIN).binary_id
    return service, binary_id


def service_serial(service: RunningService, binary_id: str, payload: bytes,
                   iterations: int, direct: bool = True) -> Summary:
    """One at a time with the blocking client: on a direct lane (the default) or through
    the supervisor."""
    with service.client(direct=direct) as client:
        assert client.execute(binary_id, payload).output == expected_output(payload)
        return summarize(measure_serial(lambda data: client.execute(binary_id, data), payload,
                                        iterations, warmup=min(500, iterations)))


def service_inflight(service: RunningService, binary_id: str, payload: bytes, requests: int,
                     concurrency: int, processes: int) -> tuple[Summary, dict[str, Any]]:
    raw = loadgen.run_processes(service.endpoint, "default", binary_id, payload, requests,
                                concurrency, processes, warmup=min(1000, requests))
    rep = loadgen.report(raw, requests, concurrency, processes, len(payload))
    return summarize(list(raw.latencies_us), rep["throughput_per_s"]), rep


def run(args: argparse.Namespace) -> dict[str, Any]:
    payload = make_input(100)
    results: dict[str, Any] = {"machine": machine_info(), "workers": args.workers,
                               "payload_bytes": len(payload), "note": BENCH_LIMITS_NOTE,
                               "serial": {}, "inflight": []}
    for transport in args.transports:
        with EchoServer(endpoint_for(transport, "echo")) as echo:
            e_serial = echo_serial(echo.endpoint, payload, args.iterations)
            e_inflight = {c: echo_inflight(echo.endpoint, payload, args.requests, c)
                          for c in args.concurrency}
        endpoint = endpoint_for(transport, "s") if transport == "tcp" else None
        service, binary_id = start_bench_service(args.workers, endpoint)
        try:
            s_serial = service_serial(service, binary_id, payload, args.iterations)
            s_relayed = service_serial(service, binary_id, payload, args.iterations,
                                       direct=False)
            results["serial"][transport] = {
                "echo": e_serial.as_dict(), "service": s_serial.as_dict(),
                "relayed": s_relayed.as_dict(),
                "ratio_median": s_serial.median_us / e_serial.median_us,
                "ratio_p99": s_serial.p99_us / e_serial.p99_us,
                "relayed_ratio_median": s_relayed.median_us / e_serial.median_us}
            for c in args.concurrency:
                for procs in args.processes:
                    summary, rep = service_inflight(service, binary_id, payload, args.requests,
                                                    c, procs)
                    results["inflight"].append({
                        "transport": transport, "concurrency": c, "processes": procs,
                        "service": summary.as_dict(), "echo": e_inflight[c].as_dict(),
                        "errors_by_code": rep["errors_by_code"],
                    })
        finally:
            service.cleanup()
    return results


def print_results(results: dict[str, Any]) -> None:
    m = results["machine"]
    print(f"uppercase.wasm, {results['payload_bytes']}-byte input; {results['workers']} workers; "
          f"nproc {m['nproc']}, python {m['python']}, wasmtime {m['wasmtime']}, "
          f"pyzmq {m['pyzmq']}")
    print(results["note"])
    print("\n(a)/(b) round trip, one request at a time (us)")
    print("service: a direct lane where the server offers one (ipc); relayed: through the "
          "supervisor (Client(direct=False))")
    print(f"{'transport':<10}{'what':<10}{'median':>9}{'p90':>9}{'p99':>9}   median/echo")
    for transport, row in results["serial"].items():
        for what in ("echo", "service", "relayed"):
            s = row[what]
            ratio = (f"{s['median_us'] / row['echo']['median_us']:.2f}x (p99 "
                     f"{s['p99_us'] / row['echo']['p99_us']:.2f}x)" if what != "echo" else "")
            print(f"{transport:<10}{what:<10}{s['median_us']:>9.0f}{s['p90_us']:>9.0f}"
                  f"{s['p99_us']:>9.0f}   {ratio}")
        verdict = "meets" if row["ratio_median"] <= TARGET_RATIO else "MISSES"
        print(f"{'':<10}target median <= {TARGET_RATIO:.1f}x echo: {verdict}")
    print("\n(c) many in flight (AsyncClient); executions/s and round trip (us)")
    print(f"{'transport':<10}{'conc':>5}{'procs':>6}{'exec/s':>10}{'median':>9}{'p99':>9}"
          f"{'echo msg/s':>12}{'svc/echo':>9}")
    best = 0.0
    for row in results["inflight"]:
        s, e = row["service"], row["echo"]
        best = max(best, s["throughput"])
        errors = f"  errors {row['errors_by_code']}" if row["errors_by_code"] else ""
        print(f"{row['transport']:<10}{row['concurrency']:>5}{row['processes']:>6}"
              f"{s['throughput']:>10,.0f}{s['median_us']:>9.0f}{s['p99_us']:>9.0f}"
              f"{e['throughput']:>12,.0f}{s['throughput'] / e['throughput']:>8.2f}x{errors}")
    verdict = "meets" if best >= TARGET_THROUGHPUT else "MISSES"
    print(f"best {best:,.0f} executions/s; target >= {TARGET_THROUGHPUT:,}: {verdict}")
    print("(echo msg/s: one client process with the same asyncio shape, 1 echo process)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("-n", "--iterations", type=int, default=5000,
                        help="one-at-a-time round trips per path (default 5000)")
    parser.add_argument("--requests", type=int, default=50_000,
                        help="requests per in-flight measurement (default 50000)")
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")],
                        default=[64, 256, 512])
    parser.add_argument("--processes", type=lambda s: [int(x) for x in s.split(",")],
                        default=[1, 2], help="client processes (default 1,2)")
    parser.add_argument("--transports", type=lambda s: s.split(","), default=["ipc", "tcp"])
    parser.add_argument("--quick", action="store_true", help="small counts (a smoke run)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.iterations, args.requests, args.concurrency = 300, 2000, [64]
    results = run(args)
    print_results(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
