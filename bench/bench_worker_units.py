"""The worker's own cost per execution, in-process: a real Worker handed job packs the way
the supervisor sends them (no supervisor, a ROUTER standing in for it), against the bare
sandbox loop in the same process. What is left over is the worker's messaging per execution.

    python bench/bench_worker_units.py [-n 20000] [--size 32] [--rounds 3] [--stub]

Rows: `sandbox.execute` in a loop; a JobPack of `size` single run jobs (what the supervisor
sent before units); one unit of `size` executes in a JobPack. CPU time (process_time) per
execution, the best and the median of `rounds` rounds, each round over n executions (the
replies are drained from the ROUTER between packs and their cost is not counted). `--stub`:
the sandbox's execute answers a result made once, so only the worker's messaging is timed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from wasmcore.protocol import messages as p  # noqa: E402
from wasmcore.protocol.settings import WorkerSettings  # noqa: E402
from wasmcore.sandbox_worker.worker import Worker  # noqa: E402

PLUGIN = ROOT / "plugins" / "uppercase.wasm"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20000)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--stub", action="store_true",
                        help="no wasm: time the worker's messaging alone")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="wu", dir="/tmp"))
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(f"ipc://{tmp}/back")
    worker = Worker(WorkerSettings(worker_id="bench", back_endpoint=f"ipc://{tmp}/back",
                                   pub_endpoint=f"ipc://{tmp}/pub", parent_pid=os.getpid()))
    blob = PLUGIN.read_bytes()
    ref = p.ModuleRef(binary_id="b", version=1, sha256=hashlib.sha256(blob).hexdigest(),
                      blob_path=str(PLUGIN), artifact_path="")
    module = worker._module(ref)
    limits = worker.settings.sandbox.default_limits
    payload = b"x" * 100
    if args.stub:
        result = worker.sandbox.execute(module, payload, limits=limits, tenant="default")
        worker.sandbox.execute = lambda *_, **__: result  # type: ignore[method-assign]
    fields = dict(modules=[ref], timeout_ms=limits.timeout_ms, fuel=limits.fuel,
                  memory_bytes=limits.memory_bytes, report_pid=False, tenant="default")
    size = args.size
    singles = p.encode(p.JobPack(
        jobs=[p.RunJob(token=i, request_id=i, **fields) for i in range(size)],
        payloads=[payload] * size))
    unit = p.encode(p.JobPack(
        jobs=[p.RunJob(token=1, request_id=0, unit=list(range(size)), **fields)],
        payloads=[[payload] * size]))

    def drain() -> None:
        while router.poll(0):
            router.recv_multipart()

    def sandbox_loop(n: int) -> float:
        started = time.process_time()
        for _ in range(n):
            worker.sandbox.execute(module, payload, limits=limits, tenant="default")
        return time.process_time() - started

    def packs(frame: bytes) -> Callable[[int], float]:
        def run(n: int) -> float:
            spent = 0.0
            for _ in range(n // size):
                started = time.process_time()
                worker._handle([zmq.Frame(frame)])
                worker._flush()
                spent += time.process_time() - started
                drain()
            return spent
        return run

    rows = {"sandbox.execute loop": sandbox_loop, f"JobPack of {size} single jobs": packs(singles),
            f"one unit of {size} in a JobPack": packs(unit)}
    results: dict[str, list[float]] = {name: [] for name in rows}
    for fn in rows.values():
        fn(2000)  # warm
    for _ in range(args.rounds):
        for name, fn in rows.items():
            results[name].append(fn(args.n) / args.n * 1e6)
    base = statistics.median(results["sandbox.execute loop"])
    print(f"worker CPU per execution, us (uppercase, 100 B, n={args.n}, {args.rounds} rounds"
          f"{', sandbox stubbed' if args.stub else ''})")
    for name, values in results.items():
        median = statistics.median(values)
        print(f"  {name:34} best {min(values):6.2f}  median {median:6.2f}  "
              f"(+{median - base:5.2f} over the bare loop)")
    worker.close()
    router.close()


if __name__ == "__main__":
    main()
