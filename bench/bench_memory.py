"""Memory with many binaries: a worker's RSS, the supervisor's RSS, `list` time, and the
artifact store's size (issue 16, "Memory").

    python bench/bench_memory.py [--binaries 10000] [--run 1000] [--workers 1]

Starts the real service (one worker by default), then:
  1. a worker's RSS at rest (after one execution) and the supervisor's RSS with one binary;
  2. loads `--binaries` distinct binaries (the uppercase plugin, each made distinct by a
     comment: another sha256, another compiled artifact), `--concurrency` loads in flight;
  3. runs the first `--run` of them once each, and reads the worker's RSS again;
  4. the supervisor's RSS with every binary registered; `list` (the tenant's every binary)
     timed from the client, median / max of `--list-runs`, the size of its reply and the
     supervisor's CPU per `list` (its loop answers it: that long, nothing else is served);
  5. the artifact store (`server.artifact_dir`) and the data dir (module blobs and the
     registry): files and bytes on disk (`st_blocks`: what tmpfs or the disk holds).
RSS is read with psutil by pid (the figure the watchdog samples).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from wasmcore.client.core import AsyncClient, Client  # noqa: E402
from wasmcore.client.launcher import start_service  # noqa: E402
from wasmcore.protocol import messages as p  # noqa: E402

PLUGINS = ROOT / "plugins"
MiB = 1024 * 1024


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def workers_rss(client: Client) -> int:
    return sum(rss(w.pid) for w in client.stats().workers if w.state in ("idle", "busy"))


def disk_usage(directory: Path) -> tuple[int, int, int]:
    """(files, apparent bytes, bytes on disk) under `directory`."""
    files = size = blocks = 0
    for root, _, names in os.walk(directory):
        for name in names:
            try:
                info = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            files += 1
            size += info.st_size
            blocks += info.st_blocks * 512
    return files, size, blocks


async def load_all(endpoint: str, source: bytes, count: int, concurrency: int) -> list[str]:
    async with AsyncClient(endpoint, timeout_s=300) as client:
        ids: list[str] = [""] * count
        next_index = 0

        async def lane() -> None:
            nonlocal next_index
            while next_index < count:
                i, next_index = next_index, next_index + 1
                loaded = await client.load(data=source + f"\n;; variant {i}\n".encode(),
                                           name=f"v{i}")
                ids[i] = loaded.binary_id

        await asyncio.gather(*(lane() for _ in range(concurrency)))
        return ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--binaries", type=int, default=10_000)
    parser.add_argument("--run", type=int, default=1000, help="how many of them to execute")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=8, help="loads in flight")
    parser.add_argument("--list-runs", type=int, default=5)
    args = parser.parse_args()
    upper = (PLUGINS / "uppercase.wat").read_bytes()
    svc = start_service(workers=args.workers, config={"server": {"log_level": "error"}})
    try:
        with svc.client(timeout_s=300) as c:
            first = c.load(PLUGINS / "uppercase.wat").binary_id
            assert c.execute(first, b"warm").output == b"WARM"
            time.sleep(0.5)
            worker_at_rest, supervisor_at_rest = workers_rss(c), rss(svc.pid)
            started = time.perf_counter()
            ids = asyncio.run(load_all(svc.endpoint, upper, args.binaries, args.concurrency))
            load_s = time.perf_counter() - started
            started = time.perf_counter()
            for binary in ids[:args.run]:
                assert c.execute(binary, b"x").output == b"X"
            run_s = time.perf_counter() - started
            time.sleep(0.5)
            worker_after = workers_rss(c)
            supervisor_after = rss(svc.pid)
            list_s = []
            supervisor = psutil.Process(svc.pid)
            cpu_before = sum(supervisor.cpu_times()[:2])
            for _ in range(args.list_runs):
                started = time.perf_counter()
                listed = c.list()
                list_s.append(time.perf_counter() - started)
            list_cpu = (sum(supervisor.cpu_times()[:2]) - cpu_before) / args.list_runs
            assert len(listed) == args.binaries + 1
            list_bytes = len(p.encode(p.Listed(id=1, binaries=listed)))
        artifacts = disk_usage(svc.workdir / "art")
        data = disk_usage(svc.workdir / "data")
    finally:
        svc.cleanup()
    print(f"{args.binaries:,} distinct binaries loaded in {load_s:.1f} s "
          f"({args.concurrency} loads in flight); {args.run:,} of them run once each in "
          f"{run_s:.1f} s; {args.workers} worker(s)")
    print(f"worker RSS at rest:                       {worker_at_rest / MiB:7.1f} MiB")
    print(f"worker RSS after {args.run:,} distinct binaries: {worker_after / MiB:7.1f} MiB "
          f"(+{(worker_after - worker_at_rest) / MiB:.1f})")
    print(f"supervisor RSS with 1 binary:             {supervisor_at_rest / MiB:7.1f} MiB")
    print(f"supervisor RSS with {args.binaries + 1:,} binaries:     "
          f"{supervisor_after / MiB:7.1f} MiB "
          f"(+{(supervisor_after - supervisor_at_rest) / MiB:.1f}, "
          f"{(supervisor_after - supervisor_at_rest) / args.binaries / 1024:.1f} KiB each)")
    print(f"`list` of {args.binaries + 1:,} binaries: median {statistics.median(list_s) * 1000:.1f}"
          f" ms, max {max(list_s) * 1000:.1f} ms ({args.list_runs} runs); reply "
          f"{list_bytes / 1024:.0f} KiB; the supervisor's CPU per `list` {list_cpu * 1000:.0f} ms "
          "(its loop thread answers it)")
    for label, (files, size, blocks) in (("artifact store", artifacts),
                                         ("data dir (blobs, registry)", data)):
        print(f"{label:27} {files:6,} files, {size / MiB:7.1f} MiB "
              f"({blocks / MiB:.1f} MiB on disk, {blocks / max(1, files) / 1024:.1f} KiB each)")


if __name__ == "__main__":
    main()
