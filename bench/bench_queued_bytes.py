"""Supervisor memory with large requests queued behind busy workers.

    python bench/bench_queued_bytes.py [--requests 24] [--mib 60] [--tenants 1]

Both workers are kept busy (plugins/hostile/loop.wat, 60 s timeout), then `--requests`
executes of uppercase with an inline payload of `--mib` MiB each are sent over raw DEALER
sockets (no shared memory), spread round-robin over `--tenants` tenants. Once every request
is either queued or answered (BUSY, PAYLOAD_TOO_LARGE), the supervisor's RSS and its peak
(VmHWM) are read, with the time that took. Before per-tenant and server bounds on queued
bytes, all of them were held: issue 11 measured 37 -> 1,537 MiB for 24 x 60 MiB.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import psutil
import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import machine_info  # noqa: E402
from wasmcore.client.launcher import start_service  # noqa: E402
from wasmcore.protocol import messages as p  # noqa: E402

PLUGINS = ROOT / "plugins"
MiB = 1024 * 1024


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--mib", type=int, default=60)
    parser.add_argument("--tenants", type=int, default=1)
    args = parser.parse_args()

    svc = start_service(workers=2, config={
        "server": {"log_level": "warning", "shm_dir": "off"},
        "limits": {"fuel": 10**13, "timeout_ms": 60_000},
        "pool": {"shutdown_grace_ms": 500},
    })
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(svc.endpoint)
    codes: collections.Counter[str] = collections.Counter()
    try:
        supervisor = psutil.Process(svc.pid)
        with svc.client() as c:
            loop_id = c.load(PLUGINS / "hostile" / "loop.wat").binary_id
            tenants = [f"t{i}" for i in range(args.tenants)]
            upper = {}
            for tenant in tenants:
                with svc.client(tenant=tenant) as tc:
                    upper[tenant] = tc.load(PLUGINS / "uppercase.wat").binary_id
            for request_id in (1, 2):  # both workers busy for 60 s
                sock.send(p.encode(p.Execute(id=request_id, binary_id=loop_id)))
            while c.stats().in_flight < 2:
                time.sleep(0.01)
            before = supervisor.memory_info().rss / MiB
            payload = b"x" * (args.mib * MiB)
            started = time.monotonic()
            for i in range(args.requests):
                tenant = tenants[i % len(tenants)]
                header = p.encode(p.Execute(id=100 + i, tenant=tenant, binary_id=upper[tenant]))
                sock.send_multipart([header, payload], copy=False)
            answered = 0
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                while sock.poll(0):
                    reply = p.reply_decoder.decode(sock.recv_multipart()[0])
                    if reply.id >= 100:
                        codes[getattr(reply, "code", "") or "ok"] += 1
                        answered += 1
                if answered + c.stats().queue_depth >= args.requests:
                    break
                time.sleep(0.05)
            else:
                raise RuntimeError("the requests were neither queued nor answered in time")
            took = time.monotonic() - started
            time.sleep(0.5)
            after = supervisor.memory_info().rss / MiB
            peak = peak_rss_mib(svc.pid)
            queued = c.stats().queue_depth
    finally:
        sock.close()
        svc.cleanup()

    info = machine_info()
    print(f"machine: {info['nproc']} cores, Python {info['python']}; 2 workers, both busy")
    print(f"{args.requests} x {args.mib} MiB inline executes over {args.tenants} tenant(s): "
          f"{queued} queued, answered at once: {dict(codes)} (all in within {took:.1f} s)")
    print(f"supervisor RSS: {before:.0f} MiB before, {after:.0f} MiB with them queued, "
          f"peak {peak:.0f} MiB")


if __name__ == "__main__":
    main()
