"""The client's own cost in the ways people drive it: CPU per request, pattern by pattern.

    python -m bench.bench_client_patterns [--requests 20000] [--rounds 3] [--threads 16]

One service (2 workers, ipc, uppercase.wasm, 110-byte input); the same `--requests` executes
driven by each pattern in turn, the patterns interleaved over `--rounds` rounds (rotating
order) so that they share the machine's load:

  lanes      `--concurrency` coroutines, each sending its next execute when its reply is in
             (`loadgen.drive`: bench_service's best row)
  semaphore  one coroutine per request, all gathered, bounded by asyncio.Semaphore(concurrency)
  waves      asyncio.gather over `concurrency` executes, one wave after another
  execute_many  `AsyncClient.execute_many(binary_id, inputs, concurrency=...)`: lanes inside
  threads    a ThreadPoolExecutor of `--threads` threads, each with its own blocking Client

Printed per pattern: executions/s (wall: depressed and noisy on a shared machine), this
process's CPU per request (psutil user+system over all its threads: the client's own cost,
including ZeroMQ's I/O thread) and the service's CPU per request (supervisor + workers).
Min / median / max over the rounds.

`--baseline-core FILE` adds an A/B: every async pattern runs a second time, interleaved, with
the `AsyncClient` of another version of client/core.py (the rest of the client is this
checkout's), e.g. `git show 4cece87:client/core.py > /tmp/core_main.py` (before issue 16).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil

from bench.common import PLUGIN, expected_output, make_input, service_config
from wasmcore.client import loadgen
from wasmcore.client.core import AsyncClient, Client
from wasmcore.client.launcher import RunningService, start_service


async def lanes(client: AsyncClient, binary_id: str, payload: bytes, requests: int,
                concurrency: int) -> None:
    await loadgen.drive(lambda: client.execute(binary_id, payload), requests, concurrency)


async def semaphore(client: AsyncClient, binary_id: str, payload: bytes, requests: int,
                    concurrency: int) -> None:
    bound = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with bound:
            await client.execute(binary_id, payload)

    await asyncio.gather(*(one() for _ in range(requests)))


async def waves(client: AsyncClient, binary_id: str, payload: bytes, requests: int,
                concurrency: int) -> None:
    for start in range(0, requests, concurrency):
        size = min(concurrency, requests - start)
        await asyncio.gather(*(client.execute(binary_id, payload) for _ in range(size)))


async def execute_many(client: AsyncClient, binary_id: str, payload: bytes, requests: int,
                       concurrency: int) -> None:
    await client.execute_many(binary_id, [payload] * requests, concurrency=concurrency)


ASYNC_PATTERNS = {"lanes": lanes, "semaphore": semaphore, "waves": waves,
                  "execute_many": execute_many}


class Meter:
    """CPU of this process and of the service's processes, and wall time, around a run."""

    def __init__(self, supervisor: psutil.Process) -> None:
        self.me = psutil.Process()
        self.supervisor = supervisor
        self.rows: dict[str, list[tuple[float, float, float]]] = {}
        self.replaced = 0  # service processes gone during a run (their CPU is not counted)
        self._service: list[psutil.Process] = []
        self._start = (0.0, 0.0, 0.0)

    @staticmethod
    def _cpu(process: psutil.Process) -> float:
        times = process.cpu_times()
        return times.user + times.system

    def _service_cpu(self) -> float:
        total = 0.0
        for process in self._service:
            try:
                total += self._cpu(process)
            except psutil.NoSuchProcess:
                self.replaced += 1  # a worker replaced (heartbeats late under load)
        return total

    def _now(self) -> tuple[float, float, float]:
        return time.perf_counter(), self._cpu(self.me), self._service_cpu()

    def start(self) -> None:
        self._service = [self.supervisor, *self.supervisor.children(recursive=True)]
        self._start = self._now()

    def stop(self, name: str, requests: int) -> None:
        replaced = self.replaced
        wall, mine, theirs = (b - a for a, b in zip(self._start, self._now(), strict=True))
        if self.replaced > replaced:
            theirs = float("nan")  # part of it left with the process
        self.rows.setdefault(name, []).append(
            (requests / wall, mine / requests * 1e6, theirs / requests * 1e6))


def run_async(pattern: str, service: RunningService, binary_id: str, payload: bytes,
              requests: int, concurrency: int, meter: Meter,
              client_class: type[AsyncClient] = AsyncClient) -> None:
    name, _, _ = pattern.partition(" ")
    drive = ASYNC_PATTERNS[name]

    async def main() -> None:
        async with client_class(service.endpoint) as client:
            check = await client.execute(binary_id, payload)
            assert check.output == expected_output(payload)
            await drive(client, binary_id, payload, min(2000, requests), concurrency)  # warm
            meter.start()
            await drive(client, binary_id, payload, requests, concurrency)
            meter.stop(pattern, requests)

    asyncio.run(main())


def run_threads(service: RunningService, binary_id: str, payload: bytes, requests: int,
                threads: int, meter: Meter) -> None:
    local = threading.local()
    clients: list[Client] = []
    lock = threading.Lock()

    def call(_: int) -> None:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = Client(service.endpoint)
            with lock:
                clients.append(client)
        client.execute(binary_id, payload)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(call, range(min(2000, requests))))  # warm: every thread's client
        meter.start()
        list(pool.map(call, range(requests), chunksize=16))
        meter.stop("threads", requests)
    for client in clients:
        client.close()


def spread(values: list[float], fmt: str) -> str:
    values = [v for v in values if v == v] or [float("nan")]  # without NaNs
    return " / ".join(format(v, fmt) for v in (min(values), statistics.median(values),
                                                max(values)))


def load_baseline(path: str) -> type[AsyncClient]:
    spec = importlib.util.spec_from_file_location("wasmcore.client._baseline_core", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.AsyncClient


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=512)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--patterns", default="lanes,semaphore,waves,execute_many,threads")
    parser.add_argument("--baseline-core", help="another client/core.py to A/B against")
    args = parser.parse_args()
    payload = make_input(110)
    patterns = args.patterns.split(",")
    baseline = load_baseline(args.baseline_core) if args.baseline_core else None
    if baseline is not None:
        patterns = [q for name in patterns
                    for q in ([name] if name in ("threads", "execute_many")
                              else [name, f"{name} (baseline)"])]
    service = start_service(workers=2, config=service_config())
    try:
        with service.client() as client:
            binary_id = client.load(PLUGIN).binary_id
        meter = Meter(psutil.Process(service.pid))
        for r in range(args.rounds):
            k = r % len(patterns)
            for name in patterns[k:] + patterns[:k]:
                if name == "threads":
                    run_threads(service, binary_id, payload, args.requests, args.threads,
                                meter)
                else:
                    run_async(name, service, binary_id, payload, args.requests,
                              args.concurrency, meter,
                              baseline if name.endswith("(baseline)") else AsyncClient)
    finally:
        service.cleanup()
    print(f"{args.requests:,} executes per run, 110 B uppercase, 2 workers, ipc, "
          f"{args.concurrency} in flight ({args.threads} threads for `threads`), "
          f"{args.rounds} rounds interleaved; min / median / max over rounds")
    print(f"{'pattern':20} {'executions/s':>26} {'client CPU us/req':>22} "
          f"{'service CPU us/req':>22}")
    for name in patterns:
        rows = meter.rows[name]
        print(f"{name:20} {spread([r[0] for r in rows], '7,.0f'):>26} "
              f"{spread([r[1] for r in rows], '5.1f'):>22} "
              f"{spread([r[2] for r in rows], '5.1f'):>22}")
    if meter.replaced:
        print(f"({meter.replaced} service processes exited during runs: their CPU is missing)")


if __name__ == "__main__":
    main()
