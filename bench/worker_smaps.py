"""Where a worker's memory at rest is: /proc/<worker>/smaps_rollup and the largest mappings.

    python -m bench.worker_smaps [--workers 2] [--top 10]

Starts the real service, runs the uppercase plugin a few times, and prints one worker's RSS
split into private and shared pages (shared library pages count in every worker's RSS, and so
in what the RSS watchdog compares to its limits, but are held once) and its largest mappings.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from wasmcore.client.launcher import start_service  # noqa: E402

PLUGINS = ROOT / "plugins"
ROLLUP = ("Rss", "Pss", "Shared_Clean", "Shared_Dirty", "Private_Clean", "Private_Dirty")


def mappings(pid: int) -> collections.Counter[str]:
    """Resident KiB per mapped file ("[anon]" for anonymous mappings)."""
    resident: collections.Counter[str] = collections.Counter()
    name = "[anon]"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        parts = line.split()
        if "-" in parts[0] and len(parts) >= 5:
            name = parts[5] if len(parts) > 5 else "[anon]"
        elif parts[0] == "Rss:":
            resident[name] += int(parts[1])
    return resident


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()
    svc = start_service(workers=args.workers, config={"server": {"log_level": "error"}})
    try:
        with svc.client() as c:
            binary = c.load(PLUGINS / "uppercase.wat").binary_id
            for _ in range(args.workers * 2):
                c.execute(binary, b"warm")
            time.sleep(0.5)
            pid = c.stats().workers[0].pid
        rollup = {}
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
            key, value, *_ = line.split()
            rollup[key.rstrip(":")] = int(value)
        print(f"worker {pid} at rest ({args.workers} workers), MiB: "
              + ", ".join(f"{k} {rollup.get(k, 0) / 1024:.1f}" for k in ROLLUP))
        for name, kib in mappings(pid).most_common(args.top):
            print(f"  {kib / 1024:6.1f} MiB  {name}")
    finally:
        svc.cleanup()


if __name__ == "__main__":
    main()
