"""A worker's memory after running many distinct binaries (issue 11 item 13).

    python bench/bench_worker_modules.py [--binaries 2000] [--workers 1]

Starts the real service with one worker, measures the worker's RSS at rest (after one
execution), then loads N distinct binaries (the uppercase plugin, each made distinct by a
comment: another sha256, another compiled module) and executes each once, and measures the
worker's RSS again. The worker keeps at most `SandboxConfig.cache_size` (256) compiled modules,
so its RSS levels off instead of growing with every binary it has ever run. RSS is read with
psutil from the worker's pid (the same figure the watchdog samples).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from wasmcore.client.launcher import start_service  # noqa: E402

PLUGINS = ROOT / "plugins"
MiB = 1024 * 1024


def worker_rss(client) -> int:
    pids = [w.pid for w in client.stats().workers if w.state in ("idle", "busy")]
    return sum(psutil.Process(pid).memory_info().rss for pid in pids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--binaries", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    upper = (PLUGINS / "uppercase.wat").read_bytes()
    svc = start_service(workers=args.workers, config={"server": {"log_level": "error"}})
    try:
        with svc.client(timeout_s=120) as c:
            first = c.load(PLUGINS / "uppercase.wat").binary_id
            assert c.execute(first, b"warm").output == b"WARM"
            time.sleep(0.5)
            at_rest = worker_rss(c)
            started = time.perf_counter()
            marks: list[tuple[int, int]] = []
            for i in range(args.binaries):
                binary = c.load(data=upper + f"\n;; variant {i}\n".encode(), name=f"v{i}").binary_id
                assert c.execute(binary, b"x").output == b"X"
                if (i + 1) % max(1, args.binaries // 4) == 0:
                    marks.append((i + 1, worker_rss(c)))
            elapsed = time.perf_counter() - started
            time.sleep(0.5)
            after = worker_rss(c)
            pids = sorted(w.pid for w in c.stats().workers)
    finally:
        svc.cleanup()
    print(f"workers {args.workers} (pids {pids}), {args.binaries} distinct binaries loaded and "
          f"run once each in {elapsed:.1f} s")
    print(f"worker RSS at rest: {at_rest / MiB:.1f} MiB")
    for count, rss in marks:
        print(f"  after {count:>5} binaries: {rss / MiB:.1f} MiB")
    print(f"worker RSS after {args.binaries} binaries: {after / MiB:.1f} MiB "
          f"(+{(after - at_rest) / MiB:.1f} MiB)")


if __name__ == "__main__":
    main()
