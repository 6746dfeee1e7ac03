"""Load generator behind `wasm-client bench`: many executes in flight on one AsyncClient.

`concurrency` coroutines share one connection; each sends its next request as soon as its
previous reply arrives, so exactly `concurrency` requests are in flight (a semaphore over
`requests` tasks would do the same, but would allocate every task up front). Per-request
latency is measured around `AsyncClient.execute`, so it includes client-side queueing.

`run_processes` splits the same load over several client processes: one Python process
driving asyncio can itself be the bottleneck (it decodes every reply and runs every
future), so the server's capacity only shows with more than one.
"""

from __future__ import annotations

import asyncio
import collections
import multiprocessing
import statistics
import time
from array import array
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from wasmcore.client.core import AsyncClient
from wasmcore.protocol.errors import WasmCoreError


@dataclass(slots=True)
class RawLoad:
    """What one driver collected; mergeable across processes."""

    latencies_us: array = field(default_factory=lambda: array("d"))
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    fuel: array = field(default_factory=lambda: array("q"))
    wall_us: array = field(default_factory=lambda: array("q"))
    peak_memory: array = field(default_factory=lambda: array("q"))
    started: float = 0.0  # time.monotonic(), comparable across processes on one host
    finished: float = 0.0

    def merge(self, other: RawLoad) -> None:
        self.latencies_us.extend(other.latencies_us)
        self.errors.update(other.errors)
        self.fuel.extend(other.fuel)
        self.wall_us.extend(other.wall_us)
        self.peak_memory.extend(other.peak_memory)
        self.started = min(self.started, other.started) if self.started else other.started
        self.finished = max(self.finished, other.finished)


async def drive(call: Callable[[], Awaitable[Any]], requests: int, concurrency: int,
                on_result: Callable[[Any], None] | None = None,
                progress: Callable[[int], None] | None = None) -> RawLoad:
    """Run `call` `requests` times with `concurrency` in flight; WasmCoreErrors are counted
    by code (and not retried), anything else propagates."""
    raw = RawLoad()
    remaining = requests
    clock = time.perf_counter

    async def lane() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            start = clock()
            try:
                result = await call()
            except WasmCoreError as exc:
                raw.errors[exc.code] += 1
            else:
                raw.latencies_us.append((clock() - start) * 1e6)
                if on_result is not None:
                    on_result(result)
            if progress is not None:
                progress(1)

    raw.started = time.monotonic()
    await asyncio.gather(*(lane() for _ in range(max(1, min(concurrency, requests)))))
    raw.finished = time.monotonic()
    return raw


async def execute_load(endpoint: str | None, tenant: str | None, binary_id: str,
                       payload: bytes, requests: int, concurrency: int, timeout_s: float = 30.0,
                       warmup: int = 0, credentials: str | None = None) -> RawLoad:
    async with AsyncClient(endpoint, tenant=tenant, timeout_s=timeout_s,
                           credentials=credentials) as client:
        if warmup:
            await drive(lambda: client.execute(binary_id, payload), warmup, concurrency)
        return await _metered_load(client, binary_id, payload, requests, concurrency)


async def _metered_load(client: AsyncClient, binary_id: str, payload: bytes, requests: int,
                        concurrency: int) -> RawLoad:
    """`requests` executes, each result's metering kept beside the latencies."""
    metered = RawLoad()

    def record(result: Any) -> None:
        m = result.metering
        metered.fuel.append(m.fuel_consumed)
        metered.wall_us.append(m.wall_time_us)
        metered.peak_memory.append(m.peak_memory_bytes)

    raw = await drive(lambda: client.execute(binary_id, payload), requests, concurrency,
                      on_result=record)
    raw.fuel, raw.wall_us, raw.peak_memory = metered.fuel, metered.wall_us, metered.peak_memory
    return raw


def _process_main(args: tuple[Any, ...], ready: Any, go: Any, out: Any) -> None:
    (endpoint, tenant, binary_id, payload, requests, concurrency, timeout_s, warmup,
     credentials) = args

    async def main() -> RawLoad:
        # Connect and warm up before the common start, so every process starts together.
        async with AsyncClient(endpoint, tenant=tenant, timeout_s=timeout_s,
                               credentials=credentials) as client:
            if warmup:
                await drive(lambda: client.execute(binary_id, payload), warmup, concurrency)
            ready.set()
            while not go.wait(0):  # bounded by the parent's timeout below
                await asyncio.sleep(0.001)
            return await _metered_load(client, binary_id, payload, requests, concurrency)

    try:
        out.send(asyncio.run(main()))
    except BaseException as exc:  # the parent must hear about it, not wait forever
        ready.set()
        out.send(exc)


def run_processes(endpoint: str | None, tenant: str | None, binary_id: str, payload: bytes,
                  requests: int, concurrency: int, processes: int, timeout_s: float = 30.0,
                  warmup: int = 0, credentials: str | None = None) -> RawLoad:
    """The same load split over `processes` client processes (spawned, each its own
    AsyncClient); throughput counts from the first start to the last finish. `credentials`:
    a credentials file path, for a server that requires keys."""
    if processes <= 1:
        return asyncio.run(execute_load(endpoint, tenant, binary_id, payload, requests,
                                        concurrency, timeout_s, warmup, credentials))
    ctx = multiprocessing.get_context("spawn")
    go = ctx.Event()
    children = []
    for index in range(processes):
        share = requests // processes + (1 if index < requests % processes else 0)
        lanes = max(1, concurrency // processes)
        ready = ctx.Event()
        parent_end, child_end = ctx.Pipe(duplex=False)
        args = (endpoint, tenant, binary_id, payload, share, lanes, timeout_s, warmup,
                credentials)
        proc = ctx.Process(target=_process_main, args=(args, ready, go, child_end), daemon=True)
        proc.start()
        child_end.close()
        children.append((proc, ready, parent_end))
    try:
        for _, ready, _ in children:
            if not ready.wait(60):
                raise TimeoutError("a load process did not connect within 60 s")
        go.set()
        merged = RawLoad()
        # Bounded: every request has its own client timeout; allow them all in sequence.
        budget = 60 + timeout_s * max(1, requests // max(1, concurrency))
        for proc, _, conn in children:
            if not conn.poll(budget):
                raise TimeoutError(f"load process {proc.pid} did not report")
            result = conn.recv()
            if isinstance(result, BaseException):
                raise result
            merged.merge(result)
        return merged
    finally:
        for proc, _, conn in children:
            conn.close()
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)


# ---------------------------------------------------------------- reporting


def _pct(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def _distribution(values: array) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "mean": statistics.fmean(ordered) if ordered else 0.0,
        "p50": _pct(ordered, 0.5),
        "p99": _pct(ordered, 0.99),
    }


def report(raw: RawLoad, requests: int, concurrency: int, processes: int = 1,
           input_bytes: int = 0) -> dict[str, Any]:
    """The figures `wasm-client bench` prints: counts, throughput, latency, metering."""
    ordered = sorted(raw.latencies_us)
    elapsed = max(raw.finished - raw.started, 1e-9)
    ok = len(ordered)
    return {
        "requests": requests,
        "concurrency": concurrency,
        "processes": processes,
        "input_bytes": input_bytes,
        "ok": ok,
        "errors": sum(raw.errors.values()),
        "errors_by_code": dict(raw.errors),
        "elapsed_s": elapsed,
        "throughput_per_s": ok / elapsed,
        "latency_us": {
            "p50": _pct(ordered, 0.5),
            "p90": _pct(ordered, 0.9),
            "p99": _pct(ordered, 0.99),
            "max": ordered[-1] if ordered else 0.0,
            "mean": statistics.fmean(ordered) if ordered else 0.0,
        },
        "metering": {
            "fuel": _distribution(raw.fuel),
            "wasm_wall_time_us": _distribution(raw.wall_us),
            "peak_memory_bytes": _distribution(raw.peak_memory),
        },
    }


def format_report(rep: dict[str, Any]) -> str:
    lat = rep["latency_us"]
    lines = [
        f"requests     {rep['requests']}  (concurrency {rep['concurrency']}, "
        f"{rep['processes']} client process(es), input {rep['input_bytes']} bytes)",
        f"ok           {rep['ok']}",
        f"errors       {rep['errors']}"
        + ("  (" + ", ".join(f"{k}={v}" for k, v in sorted(rep["errors_by_code"].items()))
           + ")" if rep["errors_by_code"] else ""),
        f"elapsed      {rep['elapsed_s']:.3f} s",
        f"throughput   {rep['throughput_per_s']:,.0f} executions/s",
        "",
        f"{'latency (us)':<22}{'p50':>10}{'p90':>10}{'p99':>10}{'max':>10}",
        f"{'round trip':<22}{lat['p50']:>10.0f}{lat['p90']:>10.0f}{lat['p99']:>10.0f}"
        f"{lat['max']:>10.0f}",
        "",
        f"{'metering per execution':<22}{'mean':>12}{'p50':>12}{'p99':>12}",
    ]
    for label, key in (("fuel", "fuel"), ("wasm wall time (us)", "wasm_wall_time_us"),
                       ("peak memory (bytes)", "peak_memory_bytes")):
        d = rep["metering"][key]
        lines.append(f"{label:<22}{d['mean']:>12,.0f}{d['p50']:>12,.0f}{d['p99']:>12,.0f}")
    return "\n".join(lines)
