"""A large payload end to end against the in-process fast path, rows interleaved, with spread.

    python bench/bench_large.py [--mib 16] [--rounds 6] [--runs 8]

Rows: `Sandbox.execute` in a process of its own (its engine's epoch timer would otherwise be
charged to the other rows' CPU); the service through `Client()` (output copied into bytes) and
`Client(zero_copy=True)` (output as a view of the mapped segment). Same plugin (uppercase),
same input, same raised limits.

The machine this runs on is shared and its load changes from second to second, so the rows
are interleaved: every round runs each row for `--runs` calls, in an order that rotates from
round to round, and each round's ratio compares rows measured within the same second or so.
Printed per row: the min / median / max of the per-round medians, the worst round's ratio to
in-process, the calling process's CPU and page faults per call (`time.process_time`,
`ru_minflt`: less sensitive to the other processes' load than wall time), the worker's own
wall time (the reply's metering) and, for service rows, the segments the client created
during the timed calls (0 when it reuses its segments, as it should).
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import statistics
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from wasmcore.client.core import Client  # noqa: E402
from wasmcore.client.launcher import start_service  # noqa: E402
from wasmcore.protocol import shm  # noqa: E402
from wasmcore.protocol.limits import Limits  # noqa: E402
from wasmcore.sandbox_worker.runtime import Sandbox, SandboxConfig  # noqa: E402

MiB = 1024 * 1024
UPPERCASE = ROOT / "plugins" / "uppercase.wasm"
LIMITS = Limits(memory_bytes=256 * MiB, output_bytes=64 * MiB, fuel=10**12, timeout_ms=60_000)


class SegmentCount:
    """Counts the segments this process creates (`shm.write`), to show reuse."""

    def __init__(self) -> None:
        self.created = 0
        self._write = shm.write
        shm.write = self._counting  # type: ignore[assignment]

    def _counting(self, *args: Any, **kwargs: Any) -> shm.ShmRef:
        self.created += 1
        return self._write(*args, **kwargs)


# One call: wall s, CPU ms, page faults, the reply's own wall ms (metering; 0 if none)
Sample = tuple[float, float, int, float]


def timed_calls(call: Callable[[], Any], runs: int) -> list[Sample]:
    samples = []
    for _ in range(runs):
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        wall, cpu = time.perf_counter(), time.process_time()
        result = call()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        metering = getattr(result, "metering", None)
        samples.append((wall, cpu * 1000,
                        resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults,
                        metering.wall_time_us / 1000 if metering is not None else 0.0))
        del result  # a zero-copy view goes back before the next call
    return samples


def in_process_main(mib: int, conn: Connection) -> None:
    """The in-process row, in a process of its own: its engine's epoch timer would otherwise
    charge its ticks to the client rows' CPU."""
    data = b"x" * (mib * MiB)
    sandbox = Sandbox(SandboxConfig(default_limits=LIMITS))
    module = sandbox.compile(UPPERCASE.read_bytes())

    def call() -> Any:
        return sandbox.execute(module, data, limits=LIMITS)

    while (runs := conn.recv()) > 0:
        conn.send(timed_calls(call, runs))
    sandbox.close()


class Row:
    def __init__(self, label: str, call: Callable[[int], list[Sample]]) -> None:
        self.label = label
        self.call = call
        self.round_ms: list[float] = []  # median of each round
        self.cpu_ms: list[float] = []  # per call
        self.faults: list[int] = []  # per call
        self.worker_ms: list[float] = []  # per call, the reply's metering
        self.created = 0

    def run_round(self, runs: int, segments: SegmentCount) -> None:
        before = segments.created
        samples = self.call(runs)
        self.created += segments.created - before
        self.round_ms.append(statistics.median(s[0] for s in samples) * 1000)
        self.cpu_ms.extend(s[1] for s in samples)
        self.faults.extend(s[2] for s in samples)
        self.worker_ms.extend(s[3] for s in samples)


def spread(values: list[float]) -> str:
    return f"{min(values):6.1f} {statistics.median(values):6.1f} {max(values):6.1f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--runs", type=int, default=8, help="calls per row per round")
    args = parser.parse_args()
    data = b"x" * (args.mib * MiB)
    segments = SegmentCount()
    here, there = multiprocessing.get_context("spawn").Pipe()
    in_process = multiprocessing.get_context("spawn").Process(
        target=in_process_main, args=(args.mib, there), daemon=True)
    in_process.start()
    svc = start_service(workers=2, config={
        "server": {"log_level": "warning"},
        "limits": {"memory_mb": 256, "output_bytes": 64 * MiB, "fuel": 10**12,
                   "timeout_ms": 60_000},
    })
    copying = Client(svc.endpoint)
    zero_copy = Client(svc.endpoint, zero_copy=True)

    def remote(runs: int) -> list[Sample]:
        here.send(runs)
        return here.recv()

    try:
        binary = copying.load(UPPERCASE).binary_id
        for client in (copying, zero_copy):
            out = client.execute(binary, data)
            assert len(out.output) == len(data) and bytes(out.output[:1]) == b"X"
            del out
        rows = [Row("in-process fast path", remote),
                Row("service, Client()",
                    lambda n: timed_calls(lambda: copying.execute(binary, data), n)),
                Row("service, Client(zero_copy=True)",
                    lambda n: timed_calls(lambda: zero_copy.execute(binary, data), n))]
        for row in rows:  # warm: compile caches, both workers, allocator thresholds
            row.call(4)
        for r in range(args.rounds):
            for row in rows[r % 3:] + rows[:r % 3]:
                row.run_round(args.runs, segments)
    finally:
        here.send(0)
        in_process.join(30)
        copying.close()
        zero_copy.close()
        svc.cleanup()
    base = rows[0]
    print(f"{args.mib} MiB uppercase; {args.rounds} rounds x {args.runs} calls per row, rows "
          "interleaved (rotating order); ms")
    print(f"{'row':32} {'round medians min/med/max':>26} {'ratio med':>9} {'worst':>6} "
          f"{'cpu/call':>8} {'faults':>6} {'worker':>7} {'new segs':>8}")
    for row in rows:
        ratios = [m / b for m, b in zip(row.round_ms, base.round_ms, strict=True)]
        worker = f"{statistics.median(row.worker_ms):7.1f}" if row.worker_ms else f"{'-':>7}"
        segs = f"{row.created:8d}" if row is not base else f"{'-':>8}"
        print(f"{row.label:32} {spread(row.round_ms):>26} {statistics.median(ratios):8.2f}x "
              f"{max(ratios):5.2f}x {statistics.median(row.cpu_ms):8.1f} "
              f"{statistics.median(row.faults):6.0f} {worker} {segs}")


if __name__ == "__main__":
    main()
