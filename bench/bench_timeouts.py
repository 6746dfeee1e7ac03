"""How precisely short timeouts stop a compute-bound plugin, through the real service.

    python bench/bench_timeouts.py [--rounds N] [--tick-ms T ...] [--in-process]

For each epoch tick period (pool.epoch_tick_ms) and each timeout, runs plugins/hostile/loop.wat
(a spin loop, no fuel cap) N times and reports when it was stopped: the worker's own
`wall_time_us` of the TIMEOUT (the store's life, what the tick resolution decides) and the
client's round trip. Epoch interruption stops a plugin at the first tick at or after its
deadline, so the stop lands in [timeout, timeout + one tick] (docs/operations.md, section 8).

--in-process: the same in one Sandbox, without the service, alternating round by round between
the clock-checked deadline of short timeouts and the tick count alone (what every timeout used
before), so both see the same machine load.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from wasmcore.client.launcher import start_service  # noqa: E402
from wasmcore.protocol import errors  # noqa: E402

LOOP = ROOT / "plugins" / "hostile" / "loop.wat"
TIMEOUTS_MS = (1, 5, 10, 20, 50, 100, 1000)


def measure(tick_ms: float, rounds: int) -> list[tuple[int, list[float], list[float]]]:
    svc = start_service(workers=1, config={"server": {"log_level": "warning"},
                                           "pool": {"epoch_tick_ms": tick_ms}})
    rows = []
    try:
        with svc.client() as client:
            loop = client.load(LOOP).binary_id
            for timeout_ms in TIMEOUTS_MS:
                worker_ms: list[float] = []
                client_ms: list[float] = []
                for _ in range(rounds):
                    started = time.perf_counter()
                    try:
                        client.execute(loop, b"", timeout_ms=timeout_ms)
                    except errors.Timeout as stopped:
                        client_ms.append((time.perf_counter() - started) * 1000)
                        worker_ms.append(stopped.details["wall_time_us"] / 1000)
                    else:
                        raise AssertionError("the loop returned")
                rows.append((timeout_ms, worker_ms, client_ms))
    finally:
        svc.cleanup()
    return rows


def measure_in_process(tick_ms: float, rounds: int) -> None:
    from wasmcore.protocol.limits import Limits
    from wasmcore.protocol.settings import SandboxConfig
    from wasmcore.sandbox_worker import runtime

    sandbox = runtime.Sandbox(SandboxConfig(epoch_tick_ms=tick_ms))
    module = sandbox.compile(LOOP.read_bytes())
    precise_below = runtime._PRECISE_BELOW_TICKS
    try:
        for timeout_ms in TIMEOUTS_MS:
            stops: dict[str, list[float]] = {"clock": [], "ticks": []}
            for _ in range(rounds):
                for mode in stops:
                    runtime._PRECISE_BELOW_TICKS = precise_below if mode == "clock" else 0
                    sandbox._precise_below_ms = runtime._PRECISE_BELOW_TICKS * tick_ms
                    try:
                        sandbox.execute(module, b"", limits=Limits(timeout_ms=timeout_ms))
                    except errors.Timeout as stopped:
                        stops[mode].append(stopped.details["wall_time_us"] / 1000)
            line = f"{tick_ms:>6g} {timeout_ms:>8}"
            for mode, values in stops.items():
                line += (f"   {mode}: {min(values):7.1f} / {statistics.median(values):7.1f} / "
                         f"{max(values):7.1f}")
            print(line)
    finally:
        runtime._PRECISE_BELOW_TICKS = precise_below
        sandbox.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--tick-ms", type=float, nargs="+", default=[10.0, 1.0])
    parser.add_argument("--in-process", action="store_true")
    args = parser.parse_args()
    if args.in_process:
        print(f"{'tick':>6} {'timeout':>8}   stop ms (min / median / max), clock-checked "
              f"deadline vs tick count only")
        for tick_ms in args.tick_ms:
            measure_in_process(tick_ms, args.rounds)
        return
    print(f"{'tick':>6} {'timeout':>8}   worker stop ms: min / median / max"
          f"   client round trip ms: median / max")
    for tick_ms in args.tick_ms:
        for timeout_ms, worker, client in measure(tick_ms, args.rounds):
            print(f"{tick_ms:>6g} {timeout_ms:>8}   {min(worker):8.1f} / "
                  f"{statistics.median(worker):8.1f} / {max(worker):8.1f}"
                  f"   {statistics.median(client):8.1f} / {max(client):8.1f}")


if __name__ == "__main__":
    main()
