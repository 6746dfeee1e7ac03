"""One request at a time from asyncio: `AsyncClient` on a direct lane against the same client
through the supervisor (`direct=False`) and the bare ZeroMQ echo driven the same way.

    python -m bench.bench_async_serial [-n 3000] [--rounds 4] [--workers 2]

One service (uppercase.wasm, 100-byte input, ipc, default pool: leases of 1,000 executes or
1 s) and one echo process (bench/echo.py). Each round runs every row for `-n` round trips,
each awaited before the next is sent (a web handler at low load), rows in a rotating order
so that they share the machine's load:

  async echo       `AsyncEcho.call` (zmq.asyncio, what the async rows are measured against)
  async direct     `await AsyncClient.execute` (direct lanes, the default on ipc)
  async relayed    `await AsyncClient(direct=False).execute` (through the supervisor)
  blocking echo    `BlockingEcho.call`, for the blocking row
  blocking direct  `Client.execute` (direct lanes), for reference

Printed: median and p99 (us) per row, min / median / max over the rounds, and each
service row's median over its echo's median of the same round.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    PLUGIN,
    Summary,
    endpoint_for,
    expected_output,
    make_input,
    measure_serial,
    service_config,
    summarize,
)
from bench.echo import AsyncEcho, BlockingEcho, EchoServer
from wasmcore.client import AsyncClient, Client
from wasmcore.client.launcher import RunningService, start_service

ROWS = ("async echo", "async direct", "async relayed", "blocking echo", "blocking direct")
ECHO_OF = {"async direct": "async echo", "async relayed": "async echo",
           "blocking direct": "blocking echo"}


async def _serial(call: Callable[[bytes], Awaitable[Any]], payload: bytes,
                  iterations: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        await call(payload)
    clock = time.perf_counter_ns
    samples: list[float] = []
    for _ in range(iterations):
        start = clock()
        await call(payload)
        samples.append((clock() - start) / 1000.0)
    return samples


def run_row(row: str, service: RunningService, binary_id: str, echo: str, payload: bytes,
            iterations: int) -> Summary:
    warmup = min(500, iterations)
    if row.startswith("blocking"):
        if row == "blocking echo":
            with BlockingEcho(echo) as client:
                return summarize(measure_serial(client.call, payload, iterations, warmup))
        with Client(service.endpoint) as client:
            assert client.execute(binary_id, payload).output == expected_output(payload)
            return summarize(measure_serial(lambda data: client.execute(binary_id, data),
                                            payload, iterations, warmup))

    async def run() -> list[float]:
        if row == "async echo":
            echo_client = AsyncEcho(echo)
            try:
                return await _serial(echo_client.call, payload, iterations, warmup)
            finally:
                await echo_client.close()
        async with AsyncClient(service.endpoint, direct=row == "async direct") as client:
            result = await client.execute(binary_id, payload)
            assert result.output == expected_output(payload)
            return await _serial(lambda data: client.execute(binary_id, data), payload,
                                 iterations, warmup)

    return summarize(asyncio.run(run()))


def spread(values: list[float], fmt: str) -> str:
    return " / ".join(format(v, fmt) for v in (min(values), statistics.median(values),
                                                max(values)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--iterations", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    payload = make_input(100)
    results: dict[str, list[Summary]] = {row: [] for row in ROWS}
    ratios: dict[str, list[float]] = {row: [] for row in ECHO_OF}
    with EchoServer(endpoint_for("ipc", "echo")) as echo:
        service = start_service(workers=args.workers, config=service_config())
        try:
            with service.client() as client:
                binary_id = client.load(PLUGIN).binary_id
            for r in range(args.rounds):
                k = r % len(ROWS)
                summaries = {row: run_row(row, service, binary_id, echo.endpoint, payload,
                                          args.iterations)
                             for row in ROWS[k:] + ROWS[:k]}
                for row, summary in summaries.items():
                    results[row].append(summary)
                for row, echo_row in ECHO_OF.items():
                    ratios[row].append(summaries[row].median_us
                                       / summaries[echo_row].median_us)
        finally:
            service.cleanup()
    print(f"one request at a time, {args.iterations:,} round trips per row per round, "
          f"{args.rounds} rounds interleaved, 100 B uppercase, {args.workers} workers, ipc; "
          "min / median / max over the rounds")
    print(f"{'row':16} {'median us':>22} {'p99 us':>22} {'median / its echo':>22}")
    for row in ROWS:
        medians = [s.median_us for s in results[row]]
        p99s = [s.p99_us for s in results[row]]
        ratio = spread(ratios[row], ".2f") if row in ratios else ""
        print(f"{row:16} {spread(medians, '.0f'):>22} {spread(p99s, '.0f'):>22} {ratio:>22}")


if __name__ == "__main__":
    main()
