"""CPU per request, by process and thread, while requests go one at a time (no probe).

When each request waits for the previous one, every process sleeps between its steps; the
round trip is then the sum of each step's CPU time plus the wake-ups between them. This sums
user + system time of the supervisor, its workers and this client (each thread apart: the
main thread, ZeroMQ's I/O thread) over N sequential executes, and the voluntary context
switches per request; then the same for the bare echo (bench/echo.py) and its client.

    python -m bench.serial_cpu [-n 4000]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python bench/serial_cpu.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil

from bench.common import PLUGIN, make_input, service_config
from bench.echo import BlockingEcho, EchoServer
from wasmcore.client.launcher import start_service


def cpu_by_thread(process: psutil.Process) -> dict[int, float]:
    return {t.id: t.user_time + t.system_time for t in process.threads()}


def echo_cpu(n: int, payload: bytes) -> None:
    """The same for the bare echo: its client (this process) and its server."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="wc-echo-") as tmp:
        with EchoServer(f"ipc://{tmp}/e.sock") as echo, BlockingEcho(echo.endpoint) as client:
            for _ in range(500):
                client.call(payload)
            processes = {"echo server": psutil.Process(echo.process.pid),
                         "echo client": psutil.Process()}
            before = {name: cpu_by_thread(p) for name, p in processes.items()}
            started = time.perf_counter()
            for _ in range(n):
                client.call(payload)
            wall = time.perf_counter() - started
            after = {name: cpu_by_thread(p) for name, p in processes.items()}
    report(processes, before, after, {}, n, wall)


def report(processes: dict[str, psutil.Process], before: dict[str, dict[int, float]],
           after: dict[str, dict[int, float]], switched: dict[str, int], n: int,
           wall: float) -> None:
    total = 0.0
    for name in processes:
        per_thread = sorted(((after[name][t] - before[name].get(t, 0.0)) / n * 1e6
                             for t in after[name]), reverse=True)
        spent = sum(per_thread)
        total += spent
        if spent < 1:
            continue  # an idle worker
        threads = " ".join(f"{x:.1f}" for x in per_thread if x >= 0.5)
        switches = f"{switched[name] / n:.2f}" if name in switched else ""
        print(f"{name:<16}{spent:>15.1f}   {threads:<24} {switches}")
    print(f"{'total':<16}{total:>15.1f}   (mean round trip {wall / n * 1e6:.0f} us)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--iterations", type=int, default=4000)
    args = parser.parse_args(argv)
    n = args.iterations
    payload = make_input(100)
    print(f"load average {os.getloadavg()[0]:.2f}; {n} calls one at a time")
    print(f"{'process':<16}{'CPU us/request':>15}   by thread (us/request)   voluntary switches")
    echo_cpu(n, payload)
    service = start_service(workers=2, config=service_config())
    try:
        with service.client() as client:
            binary_id = client.load(PLUGIN).binary_id
            for _ in range(500):
                client.execute(binary_id, payload)
            supervisor = psutil.Process(service.process.pid)
            processes = {"supervisor": supervisor, "client": psutil.Process()}
            for child in supervisor.children():
                processes[f"worker {child.pid}"] = child
            before = {name: cpu_by_thread(p) for name, p in processes.items()}
            switches = {name: p.num_ctx_switches().voluntary for name, p in processes.items()}
            started = time.perf_counter()
            for _ in range(n):
                client.execute(binary_id, payload)
            wall = time.perf_counter() - started
            after = {name: cpu_by_thread(p) for name, p in processes.items()}
            switched = {name: p.num_ctx_switches().voluntary - switches[name]
                        for name, p in processes.items()}
    finally:
        service.cleanup()
    report(processes, before, after, switched, n, wall)


if __name__ == "__main__":
    main()
