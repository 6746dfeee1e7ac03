"""CURVE against plain tcp: what authentication costs, measured in the same run.

Two services on tcp://127.0.0.1 (uppercase.wasm, 100-byte input, the same workers and
limits): one in the clear (`server.allow_unauthenticated_tcp`), one with CURVE and a tenant
key from the key store. Both run for the whole benchmark; each round measures one, then the
other, in alternating order, so a slow spell of a noisy machine hits both:
  (a) round trip of `Client.execute`, one at a time (median, p99);
  (b) executions/s with many in flight (`AsyncClient`, from 1 and from 2 client processes),
      and the CPU time each request cost the supervisor process (its loop and its ZeroMQ I/O
      thread, where CURVE's encryption and the key check run) and, with one client process,
      the client (the same process as this script).
Prints every round, and the range of the CURVE / plain ratios over the rounds. On a noisy
machine the CPU per request is the steadier figure: it does not depend on who else runs.
  (c) the supervisor's receive step alone, per message, on a CURVE socket: the message as
      bytes (`recv_multipart`, no identity) against what `_drain_front_authenticated` does
      (first frame as a Frame for its User-Id, the rest as bytes, the key looked up).

    python -m bench.bench_curve [--rounds 5] [--workers N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import psutil
import zmq

if __package__ in (None, ""):  # `python bench/bench_curve.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    PLUGIN,
    endpoint_for,
    expected_output,
    machine_info,
    make_input,
    measure_serial,
    service_config,
    summarize,
)
from wasmcore.client import loadgen
from wasmcore.client.launcher import RunningService, start_service
from wasmcore.protocol.credentials import apply_to_client
from wasmcore.protocol.zmqopts import NOBLOCK
from wasmcore.supervisor.auth import FrontAuth
from wasmcore.supervisor.keystore import KeyStore

GOAL_THROUGHPUT_RATIO = 0.90  # CURVE at most 10% below plain tcp


def start(workers: int, curve: bool) -> tuple[RunningService, str]:
    """A service on a fresh tcp port, and the uppercase binary loaded in it."""
    workdir = Path(tempfile.mkdtemp(prefix="wcb", dir="/tmp"))
    config = service_config()
    credentials = None
    if curve:
        config["server"] = {**config["server"], "allow_unauthenticated_tcp": False}
        _, path = KeyStore(workdir / "data").add("bench")
        credentials = str(path)
    service = start_service(workers=workers, config=config, endpoint=endpoint_for("tcp", "s"),
                            workdir=workdir, credentials=credentials)
    service.owns_workdir = True  # removed with the service
    with service.client() as client:
        binary_id = client.load(PLUGIN).binary_id
    return service, binary_id


def serial(service: RunningService, binary_id: str, payload: bytes,
           iterations: int) -> dict[str, float]:
    with service.client() as client:
        assert client.execute(binary_id, payload).output == expected_output(payload)
        return summarize(measure_serial(lambda data: client.execute(binary_id, data), payload,
                                        iterations, warmup=min(300, iterations))).as_dict()


def _cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def inflight(service: RunningService, binary_id: str, payload: bytes, requests: int,
             concurrency: int, processes: int) -> dict[str, Any]:
    warmup = min(1000, requests)
    supervisor = psutil.Process(service.pid)
    before, own_before = _cpu_s(supervisor), _own_cpu_s()
    raw = loadgen.run_processes(service.endpoint, None, binary_id, payload, requests,
                                concurrency, processes, warmup=warmup,
                                credentials=service.credentials)
    served = requests + warmup * processes  # every process warms up with its own
    rep = loadgen.report(raw, requests, concurrency, processes, len(payload))
    summary = summarize(list(raw.latencies_us), rep["throughput_per_s"]).as_dict()
    cpu = {"supervisor_cpu_us": (_cpu_s(supervisor) - before) / served * 1e6}
    if processes == 1:  # the client ran in this process
        cpu["client_cpu_us"] = (_own_cpu_s() - own_before) / served * 1e6
    return {**summary, **cpu, "errors_by_code": rep["errors_by_code"]}


def measure(service: RunningService, binary_id: str, payload: bytes,
            args: argparse.Namespace) -> dict[str, Any]:
    row: dict[str, Any] = {"serial": serial(service, binary_id, payload, args.iterations)}
    for procs in args.processes:
        row[f"inflight_{procs}p"] = inflight(service, binary_id, payload, args.requests,
                                             args.concurrency, procs)
    return row


def receive_cost(messages: int = 50_000, repeats: int = 5) -> dict[str, list[float]]:
    """(c): nanoseconds per message to receive `messages` queued 60-byte requests, each way,
    `repeats` times alternately."""
    import time

    workdir = Path(tempfile.mkdtemp(prefix="wcb", dir="/tmp"))
    ctx = zmq.Context()
    keys = KeyStore(workdir)
    credentials, _ = keys.add("bench")
    auth = FrontAuth(ctx, keys)
    front = ctx.socket(zmq.ROUTER)
    client = ctx.socket(zmq.DEALER)
    results: dict[str, list[float]] = {"bytes": [], "with_user_id": []}
    try:
        front.setsockopt(zmq.RCVHWM, 0)
        auth.start(front)
        port = front.bind_to_random_port("tcp://127.0.0.1")
        client.setsockopt(zmq.SNDHWM, 0)
        apply_to_client(client, credentials)
        client.connect(f"tcp://127.0.0.1:{port}")
        header = b"h" * 60

        def fill() -> None:
            for _ in range(messages):
                client.send(header)
            while not front.poll(1000):
                pass
            time.sleep(0.5)  # let the I/O thread decrypt them all

        def as_bytes() -> None:
            recv = front.recv_multipart
            for _ in range(messages):
                recv(NOBLOCK)

        def with_user_id() -> None:
            recv, recv_rest, identity = front.recv, front.recv_multipart, auth.identity
            for _ in range(messages):
                first = recv(NOBLOCK, copy=False)
                frames = recv_rest(NOBLOCK) if first.more else []
                frames.insert(0, first.bytes)
                assert identity(first.get("User-Id")) is not None

        for _ in range(repeats):
            for name, drain in (("bytes", as_bytes), ("with_user_id", with_user_id)):
                fill()
                started = time.perf_counter_ns()
                drain()
                results[name].append((time.perf_counter_ns() - started) / messages)
    finally:
        client.close(0)
        front.close(0)
        auth.close()
        ctx.term()
        shutil.rmtree(workdir, ignore_errors=True)
    return results


def run(args: argparse.Namespace) -> dict[str, Any]:
    payload = make_input(100)
    services = {name: start(args.workers, curve=name == "curve") for name in ("plain", "curve")}
    rounds: list[dict[str, Any]] = []
    try:
        for index in range(args.rounds):
            order = ["plain", "curve"] if index % 2 == 0 else ["curve", "plain"]
            rounds.append({name: measure(*services[name], payload, args) for name in order})
            print_round(index, rounds[-1], args.processes)
    finally:
        for service, _ in services.values():
            service.cleanup()
            shutil.rmtree(service.workdir, ignore_errors=True)
    return {"machine": machine_info(), "workers": args.workers, "payload_bytes": len(payload),
            "concurrency": args.concurrency, "rounds": rounds, "receive_ns": receive_cost()}


def ratios(rounds: list[dict[str, Any]], key: str, field: str) -> list[float]:
    return [r["curve"][key][field] / r["plain"][key][field] for r in rounds]


def print_round(index: int, row: dict[str, Any], processes: list[int]) -> None:
    parts = []
    for name in ("plain", "curve"):
        s = row[name]["serial"]
        flights = "  ".join(
            f"{procs}p {row[name][f'inflight_{procs}p']['throughput']:>7,.0f}/s "
            f"({row[name][f'inflight_{procs}p']['supervisor_cpu_us']:.1f} us cpu)"
            for procs in processes)
        parts.append(f"{name} rt {s['median_us']:>4.0f}/{s['p99_us']:>5.0f} us  {flights}")
    print(f"round {index + 1}: " + "   |   ".join(parts), flush=True)


def print_summary(results: dict[str, Any], processes: list[int]) -> None:
    m = results["machine"]
    rounds = results["rounds"]
    print(f"\nuppercase.wasm, {results['payload_bytes']}-byte input, {results['workers']} "
          f"workers, concurrency {results['concurrency']}; nproc {m['nproc']}, python "
          f"{m['python']}, pyzmq {m['pyzmq']}; {len(rounds)} interleaved rounds")
    print(f"{'what':<38}{'plain tcp':>18}{'CURVE tcp':>18}{'CURVE/plain':>26}")

    def line(label: str, key: str, field: str, fmt: str) -> None:
        plain = [r["plain"][key][field] for r in rounds]
        curve = [r["curve"][key][field] for r in rounds]
        rs = ratios(rounds, key, field)
        span = lambda xs: f"{format(min(xs), fmt)}..{format(max(xs), fmt)}"  # noqa: E731
        print(f"{label:<38}{span(plain):>18}{span(curve):>18}"
              f"{f'{min(rs):.2f}..{max(rs):.2f} (median {statistics.median(rs):.2f})':>26}")

    line("round trip median (us)", "serial", "median_us", ".0f")
    line("round trip p99 (us)", "serial", "p99_us", ".0f")
    for procs in processes:
        line(f"executions/s, {procs} client process(es)", f"inflight_{procs}p", "throughput",
             ",.0f")
        line(f"  supervisor CPU us/request, {procs}p", f"inflight_{procs}p",
             "supervisor_cpu_us", ".1f")
    if 1 in processes:
        line("  client CPU us/request, 1p", "inflight_1p", "client_cpu_us", ".1f")
    best = {name: max(max(r[name][f"inflight_{procs}p"]["throughput"] for procs in processes)
                      for r in rounds) for name in ("plain", "curve")}
    ratio = best["curve"] / best["plain"]
    verdict = "meets" if ratio >= GOAL_THROUGHPUT_RATIO else "MISSES"
    print(f"best executions/s: plain {best['plain']:,.0f}, CURVE {best['curve']:,.0f} "
          f"({ratio:.2f}); goal CURVE >= {GOAL_THROUGHPUT_RATIO:.2f} x plain: {verdict}")
    receive = results["receive_ns"]
    print("(c) receive step per message (ns), min / median of "
          f"{len(receive['bytes'])}: bytes {min(receive['bytes']):.0f} / "
          f"{statistics.median(receive['bytes']):.0f}, first frame + User-Id + key lookup "
          f"{min(receive['with_user_id']):.0f} / {statistics.median(receive['with_user_id']):.0f}")
    errors = {f"{name} round {i + 1}": r[name][key]["errors_by_code"]
              for i, r in enumerate(rounds) for name in ("plain", "curve")
              for key in r[name] if key.startswith("inflight") and r[name][key]["errors_by_code"]}
    if errors:
        print(f"errors: {errors}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("-n", "--iterations", type=int, default=2000,
                        help="one-at-a-time round trips per round (default 2000)")
    parser.add_argument("--requests", type=int, default=20_000,
                        help="requests per in-flight measurement (default 20000)")
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--processes", type=lambda s: [int(x) for x in s.split(",")],
                        default=[1, 2], help="client processes (default 1,2)")
    parser.add_argument("--quick", action="store_true", help="small counts (a smoke run)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.iterations, args.requests, args.processes = 2, 200, 2000, [1]
    results = run(args)
    print_summary(results, args.processes)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
