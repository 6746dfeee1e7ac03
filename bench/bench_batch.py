"""Executions per second with execute_batch: many inputs per request, one reply each.

    python bench/bench_batch.py [--seconds 3] [--concurrency 16]

Same plugin (uppercase) and 100-byte inputs as the other service benchmarks; batch size 1 is
the plain in-flight figure for comparison, measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from wasmcore.client.core import AsyncClient  # noqa: E402
from wasmcore.client.launcher import start_service  # noqa: E402


async def measure(endpoint: str, binary_id: str, batch: int, concurrency: int,
                  seconds: float) -> float:
    data = b"x" * 100
    async with AsyncClient(endpoint) as client:
        stop = time.perf_counter() + seconds
        done = 0

        async def loop() -> None:
            nonlocal done
            while time.perf_counter() < stop:
                if batch == 1:
                    await client.execute(binary_id, data)
                else:
                    results = await client.execute_batch(binary_id, [data] * batch)
                    assert len(results) == batch
                done += batch

        started = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    svc = start_service(workers=2, config={"server": {"log_level": "warning"}})
    try:
        with svc.client() as c:
            binary = c.load(ROOT / "plugins" / "uppercase.wasm").binary_id
        print(f"uppercase, 100 B inputs, 2 workers, {args.concurrency} requests in flight")
        for batch, concurrency in ((1, 512), (16, args.concurrency), (64, args.concurrency),
                                   (256, args.concurrency)):
            rate = asyncio.run(measure(svc.endpoint, binary, batch, concurrency, args.seconds))
            print(f"batch {batch:>4} (in flight {concurrency:>3}): {rate:>9,.0f} executions/s")
    finally:
        svc.cleanup()


if __name__ == "__main__":
    main()
