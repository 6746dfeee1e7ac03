"""The file watcher's cost at rest and its reload latency, on the real service.

    python -m bench.bench_watcher [--idle-s 5] [--rounds 30] [--workers 2]

Reports, in one run, with one watched module file loaded:
- wake-ups per second of every supervisor thread while the service is idle (voluntary plus
  involuntary context switches from /proc/<pid>/task/*/status over `--idle-s` seconds), and of
  the workers summed;
- a changed file on disk -> the new version visible through the client (`list` shows the next
  version): median, p99 and max;
- `stop()` (SIGTERM -> exited) with the watcher running.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from wasmcore.client.launcher import start_service  # noqa: E402

PLUGINS = ROOT / "plugins"
QUIET = {"server": {"log_level": "error"}}


def switches(pid: int) -> dict[int, tuple[str, int]]:
    """Per thread of `pid`: (name, voluntary + involuntary context switches so far)."""
    out: dict[int, tuple[str, int]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            status = (task / "status").read_text().splitlines()
            fields = dict(line.split(":", 1) for line in status)
            count = (int(fields["voluntary_ctxt_switches"])
                     + int(fields["nonvoluntary_ctxt_switches"]))
        except (OSError, KeyError, ValueError):
            continue  # the thread ended meanwhile
        out[int(task.name)] = (name, count)
    return out


def idle_wakeups(pid: int, seconds: float) -> tuple[list[tuple[int, str, float]], float]:
    """Supervisor threads' and the workers' (summed) wake-ups per second over `seconds`."""
    workers = [p.pid for p in psutil.Process(pid).children(recursive=True)]
    before = switches(pid)
    before_workers = sum(c for w in workers for _, c in switches(w).values())
    time.sleep(seconds)
    after = switches(pid)
    after_workers = sum(c for w in workers for _, c in switches(w).values())
    rows = [(tid, name, (count - before[tid][1]) / seconds)
            for tid, (name, count) in after.items() if tid in before]
    return sorted(rows, key=lambda r: -r[2]), (after_workers - before_workers) / seconds


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--idle-s", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="wcwatch"))
    svc = start_service(workers=args.workers, config=QUIET)
    try:
        path = tmp / "live.wat"
        shutil.copyfile(PLUGINS / "uppercase.wat", path)
        variants = [(PLUGINS / "rot13.wat").read_bytes(), (PLUGINS / "uppercase.wat").read_bytes()]
        with svc.client() as c:
            assert c.load(path).watched
            time.sleep(1.0)  # the watcher is set up, start-up work is over
            rows, worker_rate = idle_wakeups(svc.pid, args.idle_s)
            print(f"idle {args.idle_s:.0f} s, supervisor pid {svc.pid}, wake-ups/s per thread:")
            for tid, name, rate in rows:
                print(f"  {tid:>8} {name:16} {rate:8.1f}")
            print(f"  supervisor total {sum(r[2] for r in rows):.1f}/s; "
                  f"workers ({args.workers}) total {worker_rate:.1f}/s")
            times = []
            for i in range(args.rounds):
                version = c.list()[0].version
                started = time.perf_counter()
                path.write_bytes(variants[i % 2])
                deadline = time.monotonic() + 10
                while c.list()[0].version <= version:
                    if time.monotonic() > deadline:
                        raise TimeoutError("the change was not reloaded within 10 s")
                    time.sleep(0.0005)
                times.append((time.perf_counter() - started) * 1000)
                time.sleep(0.05)  # each write its own burst
            print(f"file changed -> new version visible: median {statistics.median(times):.1f} "
                  f"ms, p99 {pct(times, 0.99):.1f} ms, max {max(times):.1f} ms "
                  f"(n={len(times)})")
        started = time.perf_counter()
        svc.stop()
        print(f"stop (SIGTERM -> exited): {(time.perf_counter() - started) * 1000:.0f} ms")
    finally:
        svc.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
