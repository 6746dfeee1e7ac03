"""Detection and recovery times of the supervisor, measured on real processes.

    python bench/bench_recovery.py [--rounds N]

Measures, over N rounds each:
- SIGKILL of a busy worker -> the client's WORKER_LOST reply;
- SIGKILL of a worker -> pool back at full size (replacement ready);
- SIGSTOP of a busy worker -> WORKER_LOST (heartbeat timeout, as configured below);
- RSS over the hard limit -> the client's MEMORY_LIMIT reply (from when the plugin's memory is
  resident, approximated by the start of the request plus its touch time);
- SIGKILL of the supervisor -> no worker process left.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import struct
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from wasmcore.client.launcher import start_service  # noqa: E402
from wasmcore.protocol import errors  # noqa: E402

HOSTILE = ROOT / "plugins" / "hostile"
POOL = {"heartbeat_interval_ms": 100, "heartbeat_timeout_ms": 1000, "watchdog_interval_ms": 100,
        "deadline_grace_ms": 500}


def _busy_pid(client) -> int:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        busy = [w.pid for w in client.stats().workers if w.state == "busy"]
        if busy:
            return busy[0]
        time.sleep(0.002)
    raise RuntimeError("no busy worker")


def _pool_ready(client, size: int, exclude: int) -> bool:
    live = [w.pid for w in client.stats().workers if w.state in ("idle", "busy")]
    return len(live) == size and exclude not in live


def _lost_after(svc, signum: int, loop_id: str) -> tuple[float, float]:
    """(signal -> error reply, signal -> pool at size) in ms."""
    box: dict[str, float] = {}

    def victim() -> None:
        with svc.client() as c:
            try:
                c.execute(loop_id, "x", timeout_ms=30_000)
            except errors.WasmCoreError as exc:
                box["code"] = exc.code  # type: ignore[assignment]
            box["replied"] = time.perf_counter()

    thread = threading.Thread(target=victim)
    thread.start()
    with svc.client() as c:
        pid = _busy_pid(c)
        sent = time.perf_counter()
        os.kill(pid, signal.SIGKILL if signum == signal.SIGKILL else signal.SIGSTOP)
        thread.join(30)
        while not _pool_ready(c, 2, pid):
            time.sleep(0.001)
        ready = time.perf_counter()
    assert box.get("code") == "WORKER_LOST", box
    return (box["replied"] - sent) * 1000, (ready - sent) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    results: dict[str, list[float]] = {}
    svc = start_service(workers=2, config={"pool": POOL, "limits": {"fuel": 10**14},
                                           "server": {"log_level": "error"}})
    try:
        with svc.client() as c:
            loop_id = c.load(HOSTILE / "loop.wat").binary_id
        for _ in range(args.rounds):
            reply, ready = _lost_after(svc, signal.SIGKILL, loop_id)
            results.setdefault("SIGKILL worker -> WORKER_LOST reply", []).append(reply)
            results.setdefault("SIGKILL worker -> pool back at size", []).append(ready)
        for _ in range(args.rounds):
            reply, ready = _lost_after(svc, signal.SIGSTOP, loop_id)
            results.setdefault("SIGSTOP worker -> WORKER_LOST (1000 ms hb timeout)", []).append(
                reply)
    finally:
        svc.cleanup()

    svc = start_service(workers=1, config={
        "pool": {**POOL, "rss_soft_limit_mb": 100, "rss_hard_limit_mb": 150},
        "limits": {"memory_mb": 512, "fuel": 10**14, "timeout_ms": 60_000},
        "server": {"log_level": "error"}})
    try:
        with svc.client() as c:
            hog = c.load(HOSTILE / "rss_hog.wat").binary_id
            for _ in range(args.rounds):
                started = time.perf_counter()
                try:
                    c.execute(hog, struct.pack("<II", 256, 1_000_000))
                except errors.MemoryLimit:
                    pass
                results.setdefault("request start -> MEMORY_LIMIT (touching 256 MiB, hard 150)",
                                   []).append((time.perf_counter() - started) * 1000)
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and not any(
                        w.state == "idle" for w in c.stats().workers):
                    time.sleep(0.005)
    finally:
        svc.cleanup()

    for _ in range(args.rounds):
        svc = start_service(workers=2, config={"server": {"log_level": "error"}})
        try:
            with svc.client() as c:
                pids = [w.pid for w in c.stats().workers]
            sent = time.perf_counter()
            svc.process.send_signal(signal.SIGKILL)
            while any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                      for p in pids):
                time.sleep(0.001)
            results.setdefault("SIGKILL supervisor -> no worker left", []).append(
                (time.perf_counter() - sent) * 1000)
        finally:
            svc.cleanup()

    print(f"{'measurement':62} {'median ms':>10} {'max ms':>8}  (n={args.rounds}, "
          f"{os.cpu_count()} cores)")
    for name, values in results.items():
        print(f"{name:62} {statistics.median(values):>10.1f} {max(values):>8.1f}")


if __name__ == "__main__":
    main()
