"""Fair share by weight: the throughput ratio of two flooding tenants of weights 1 and 3.

    python bench/bench_weights.py [--in-flight 200] [--job-ms 3] [--seconds 10] [--runs 3]

Tenants `light` ([tenants.light] weight 1) and `heavy` (weight 3) each keep `--in-flight`
executions in flight from an AsyncClient in a process of its own; each execution is
plugins/hostile/loop.wat stopped by a fuel cap after about `--job-ms` (it ends OUT_OF_FUEL).
2 workers. After both are saturated, the jobs each completes in `--seconds` are counted;
the goal (issue 12): heavy/light within 20% of 3.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_fairness import calibrate_fuel, flood  # noqa: E402
from bench.common import machine_info  # noqa: E402
from wasmcore.client.core import Client  # noqa: E402
from wasmcore.client.launcher import start_service  # noqa: E402

PLUGINS = ROOT / "plugins"
WEIGHTS = {"light": 1, "heavy": 3}


def one_run(args: argparse.Namespace) -> tuple[dict[str, float], float]:
    config: dict[str, Any] = {
        "server": {"log_level": "warning"},
        "limits": {"fuel": 10**13},
        "tenants": {name: {"weight": weight} for name, weight in WEIGHTS.items()},
    }
    svc = start_service(workers=2, config=config)
    spawn = multiprocessing.get_context("spawn")
    stop = spawn.Event()
    counters = {name: spawn.Value("q", 0) for name in WEIGHTS}
    flooders = []
    try:
        loops = {}
        for name in WEIGHTS:
            with Client(svc.endpoint, tenant=name) as client:
                loops[name] = client.load(PLUGINS / "hostile" / "loop.wat").binary_id
        with Client(svc.endpoint, tenant="light") as client:
            fuel, job_ms = calibrate_fuel(client, loops["light"], args.job_ms)
        for name in WEIGHTS:
            flooder = spawn.Process(target=flood, args=(svc.endpoint, name, loops[name], fuel,
                                                        args.in_flight, stop, counters[name]))
            flooder.start()
            flooders.append(flooder)
        with Client(svc.endpoint) as watcher:
            deadline = time.monotonic() + 60
            while watcher.stats().queue_depth < args.in_flight:  # both have plenty queued
                if time.monotonic() > deadline:
                    raise RuntimeError("the floods never filled the queue")
                time.sleep(0.05)
        time.sleep(1.0)  # past the start-up burst
        before = {name: counter.value for name, counter in counters.items()}
        started = time.perf_counter()
        time.sleep(args.seconds)
        elapsed = time.perf_counter() - started
        rates = {name: (counters[name].value - before[name]) / elapsed for name in WEIGHTS}
    finally:
        stop.set()
        for flooder in flooders:
            flooder.join(30)
        svc.cleanup()
    return rates, job_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--in-flight", type=int, default=200)
    parser.add_argument("--job-ms", type=float, default=3.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    info = machine_info()
    print(f"machine: {info['nproc']} cores, Python {info['python']}, "
          f"wasmtime {info['wasmtime']}; 2 workers; {args.in_flight} in flight per tenant")
    goal = WEIGHTS["heavy"] / WEIGHTS["light"]
    for run in range(1, args.runs + 1):
        rates, job_ms = one_run(args)
        ratio = rates["heavy"] / rates["light"] if rates["light"] else float("inf")
        verdict = "met" if abs(ratio - goal) <= 0.2 * goal else "NOT met"
        print(f"run {run}: job {job_ms:.2f} ms; light (weight 1) {rates['light']:.0f} jobs/s, "
              f"heavy (weight 3) {rates['heavy']:.0f} jobs/s; ratio {ratio:.2f} "
              f"(goal {goal:.0f} within 20%: {verdict})", flush=True)


if __name__ == "__main__":
    main()
