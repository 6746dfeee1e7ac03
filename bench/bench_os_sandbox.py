"""What the OS sandbox under wasm costs: the same service with `[sandbox] enabled = true` and
`false`, alternating, in one run.

    python bench/bench_os_sandbox.py [--rounds 3] [--iterations 3000] [--requests 20000]

Per configuration and round:
- worker start: SIGKILL an idle worker -> the pool is back at size (a fresh worker booted,
  set its sandbox up and said Ready);
- round trip of `Client.execute` (uppercase.wasm, 100 bytes), one at a time: median, p99;
- executions/s with 64 in flight (`AsyncClient`), one client process.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python bench/bench_os_sandbox.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import PLUGIN, machine_info, make_input, measure_serial, summarize
from wasmcore.client import loadgen
from wasmcore.client.launcher import RunningService, start_service


def _live(svc: RunningService) -> list[int]:
    with svc.client() as client:
        return [w.pid for w in client.stats().workers if w.state in ("idle", "busy")]


def restart_ms(svc: RunningService) -> float:
    victim = _live(svc)[0]
    started = time.perf_counter()
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        live = _live(svc)
        if len(live) == 2 and victim not in live:
            return (time.perf_counter() - started) * 1000
        time.sleep(0.002)
    raise RuntimeError("pool not back at size within 30 s")


def measure(enabled: bool, iterations: int, requests: int) -> dict[str, float]:
    svc = start_service(workers=2, config={"server": {"log_level": "warning"},
                                           "sandbox": {"enabled": enabled}})
    try:
        with svc.client() as client:
            protections = client.stats().workers[0].protections
            assert ("seccomp" in protections) == enabled, protections
            binary = client.load(PLUGIN).binary_id
            payload = make_input(100)
            samples = measure_serial(lambda data: client.execute(binary, data), payload,
                                     iterations, warmup=500)
        serial = summarize(samples)
        raw = asyncio.run(loadgen.execute_load(svc.endpoint, "default", binary, payload,
                                               requests, 64, warmup=1000))
        throughput = loadgen.report(raw, requests, 64)["throughput_per_s"]
        starts = [restart_ms(svc) for _ in range(3)]
        return {"start_ms": statistics.median(starts), "rtt_median_us": serial.median_us,
                "rtt_p99_us": serial.p99_us, "throughput": throughput}
    finally:
        svc.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=3000)
    parser.add_argument("--requests", type=int, default=20_000)
    args = parser.parse_args()
    info = machine_info()
    print(f"nproc={info['nproc']} python={info['python']} wasmtime={info['wasmtime']} "
          f"root={os.geteuid() == 0}")
    print(f"{'sandbox':8} {'round':>5} {'worker start ms':>16} {'rtt median us':>14} "
          f"{'rtt p99 us':>11} {'exec/s (64 in flight)':>22}")
    for round_ in range(1, args.rounds + 1):
        for enabled in (True, False):
            r = measure(enabled, args.iterations, args.requests)
            print(f"{'on' if enabled else 'off':8} {round_:>5} {r['start_ms']:>16.1f} "
                  f"{r['rtt_median_us']:>14.1f} {r['rtt_p99_us']:>11.1f} "
                  f"{r['throughput']:>22.0f}", flush=True)


if __name__ == "__main__":
    main()
