"""Where the time goes under load: CPU per request by process and thread, and a sampling
profile of the supervisor's and one worker's hot loop.

    python -m bench.profile_service [--seconds 5] [--concurrency 512] [--top 15]
    python -m bench.profile_service --no-profile --batch 64 --concurrency 16  # per execution

Starts the service (2 workers, uppercase, 100-byte inputs), keeps `concurrency` executes in
flight from one AsyncClient in this process, and meanwhile runs py-spy (`pip install py-spy`;
it attaches with ptrace, so it needs the same user and a permissive ptrace_scope, or root) on
the supervisor and on one worker. Prints, per process, user+system CPU per request split by
thread (psutil), then each profile's top functions by own samples and by inclusive samples.
Idle samples (a thread blocked in poll or a condition wait) are counted too: they show how much
of the wall time a loop spends waiting.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from wasmcore.client import loadgen  # noqa: E402
from wasmcore.client.core import AsyncClient  # noqa: E402
from wasmcore.client.launcher import start_service  # noqa: E402

PLUGIN = ROOT / "plugins" / "uppercase.wasm"


def thread_times(process: psutil.Process) -> dict[int, float]:
    return {t.id: t.user_time + t.system_time for t in process.threads()}


def summarize_profile(path: Path, top: int) -> str:
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        samples = int(count)
        total += samples
        frames = stack.split(";")
        own[frames[-1]] += samples
        for frame in set(frames):
            inclusive[frame] += samples
    if not total:
        return "  (no samples)"
    lines = ["  own samples:"]
    lines += [f"  {n / total:6.1%}  {f}" for f, n in own.most_common(top)]
    lines.append("  inclusive samples:")
    lines += [f"  {n / total:6.1%}  {f}" for f, n in inclusive.most_common(top)]
    return "\n".join(lines)


async def drive(endpoint: str, binary_id: str, seconds: float, concurrency: int,
                processes: dict[str, psutil.Process], profilers: list[subprocess.Popen[bytes]],
                batch: int = 0
                ) -> tuple[int, float, dict[str, dict[int, float]], dict[str, dict[int, float]]]:
    async with AsyncClient(endpoint) as client:
        payload = b"x" * 100
        if batch:  # one request of `batch` executions: how much of the cost is per request
            inputs = [payload] * batch
            requests = max(1, 10_000 // batch)

            def one() -> Any:
                return client.execute_batch(binary_id, inputs)
        else:
            requests = 10_000

            def one() -> Any:
                return client.execute(binary_id, payload)
        await loadgen.drive(one, max(1, requests // 5), concurrency)
        before = {name: thread_times(proc) for name, proc in processes.items()}
        started = time.perf_counter()
        done = 0
        while time.perf_counter() - started < seconds or any(
                p.poll() is None for p in profilers):
            await loadgen.drive(one, requests, concurrency)
            done += requests * max(1, batch)
        elapsed = time.perf_counter() - started
        after = {name: thread_times(proc) for name, proc in processes.items()}
    return done, elapsed, before, after


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=512)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--rate", type=int, default=1000, help="py-spy samples per second")
    parser.add_argument("--batch", type=int, default=0,
                        help="drive execute_batch of this many inputs instead of executes "
                             "(figures stay per execution)")
    parser.add_argument("--no-profile", action="store_true",
                        help="CPU per request only, without py-spy")
    args = parser.parse_args()
    spy = shutil.which("py-spy")
    if spy is None and not args.no_profile:
        sys.exit("py-spy is not installed: pip install py-spy (CPU per request still works "
                 "without it; run with py-spy for the profiles)")
    # py-spy attaches with ptrace; as a user other than root it cannot attach to the OS
    # sandbox's non-dumpable processes (docs/operations.md, section 11), so off then.
    service = start_service(workers=2, config={"server": {"log_level": "warning"},
                                               "sandbox": {"enabled": os.geteuid() == 0}})
    out = Path(tempfile.mkdtemp(prefix="wcprof"))
    try:
        with service.client() as client:
            binary_id = client.load(PLUGIN).binary_id
            workers = [w.pid for w in client.stats().workers]
        processes = {"supervisor": psutil.Process(service.pid), "client": psutil.Process()}
        processes.update({f"worker {i}": psutil.Process(pid) for i, pid in enumerate(workers)})
        targets = {} if args.no_profile else {"supervisor": service.pid, "worker 0": workers[0]}
        profilers = [
            subprocess.Popen([spy, "record", "--format", "raw", "--rate", str(args.rate),
                              "--duration", str(int(args.seconds)), "--nonblocking",
                              "--output", str(out / f"{name.replace(' ', '')}.txt"),
                              "--pid", str(pid)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for name, pid in targets.items()
        ]
        done, elapsed, before, after = asyncio.run(
            drive(service.endpoint, binary_id, args.seconds, args.concurrency, processes,
                  profilers, args.batch))
        for profiler in profilers:
            profiler.wait(timeout=60)
        shape = f"batches of {args.batch}" if args.batch else "one execution per request"
        print(f"{done:,} executions in {elapsed:.1f} s = {done / elapsed:,.0f}/s "
              f"({args.concurrency} in flight, 100 B, 2 workers, {shape})")
        print("CPU per request (user+system, us), by process and its busiest threads:")
        for name in processes:
            per_thread = sorted(((after[name].get(t, 0.0) - before[name].get(t, 0.0))
                                 / done * 1e6 for t in after[name]), reverse=True)
            busiest = " ".join(f"{x:.1f}" for x in per_thread[:3])
            print(f"  {name:11} {sum(per_thread):6.1f}   threads: {busiest}")
        for name in targets:
            print(f"\npy-spy, {name} (pid {targets[name]}), {args.rate} samples/s:")
            print(summarize_profile(out / f"{name.replace(' ', '')}.txt", args.top))
    finally:
        service.cleanup()
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
