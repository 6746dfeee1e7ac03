"""Executions while another tenant compiles, and refusals before any compile.

    python bench/bench_compile_lane.py [--size-mb 30] [--requests 2000] [--rounds 5]
                                       [--interval-ms 5]

Runs against the installed wasmcore: from a venv of the code before the compile lane, it
measures the same (without the lane's own figures) for a before/after comparison.

Reports, in one run, on a real service (2 executing workers, the compile lane's defaults but
a compile timeout of 10 minutes: the compiles run at low priority on a machine kept busy):
- tenant B's one-at-a-time execute latency (p50, p99, max) idle, then while tenant A loads two
  modules of --size-mb at once (B sends one request every --interval-ms, or back to back with
  0: idle too, --requests of them; while loading, until both loads are answered), with B's
  slowest requests and when they happened;
- the executing workers' RSS before and after A's loads, and the compile workers' peak RSS;
- how long a module of --size-mb with imports the service cannot provide takes to be refused:
  end to end (load sent -> INVALID_MODULE; this includes sending, hashing and storing the
  bytes), in the compile lane alone (dispatch -> reply, from the supervisor's log), for a tiny
  module with the same imports, and the import check alone, in-process, on an mmap.
"""

from __future__ import annotations

import argparse
import mmap
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.wasm_gen import big_module, uleb  # noqa: E402
from wasmcore.client.launcher import RunningService, start_service  # noqa: E402
from wasmcore.protocol import errors  # noqa: E402
from wasmcore.protocol import messages as p  # noqa: E402

try:
    from wasmcore.sandbox_worker.module import precheck_imports
except ImportError:  # the code before the compile lane
    precheck_imports = None
LANE = "compile_workers" in p.StatsReply.__struct_fields__

PLUGINS = ROOT / "plugins"
MB = 1_000_000
FOREIGN = [("wbg", "__wbindgen_object_drop_ref"), ("wbg", "__wbindgen_throw"),
           ("go", "syscall/js.valueGet"), ("env", "emscripten_memcpy_big")]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(values: list[float]) -> str:
    return (f"p50 {pct(values, 0.50):7.2f} ms  p99 {pct(values, 0.99):7.2f} ms  "
            f"max {max(values):7.2f} ms  (n={len(values)})")


def with_custom_section(module: bytes, tag: int) -> bytes:
    """The same module with a different sha256 (a custom section at the end)."""
    body = uleb(5) + b"bench" + tag.to_bytes(4, "little")
    return module + b"\x00" + uleb(len(body)) + body


class RssSampler:
    """Peak RSS per child process of the supervisor, sampled every 50 ms."""

    def __init__(self, supervisor_pid: int) -> None:
        self._parent = psutil.Process(supervisor_pid)
        self.peak: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            for child in self._parent.children():
                try:
                    rss = child.memory_info().rss
                except psutil.Error:
                    continue
                self.peak[child.pid] = max(self.peak.get(child.pid, 0), rss)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


def execute_latencies(svc: RunningService, binary_id: str, count: int,
                      interval_s: float) -> list[float]:
    times = []
    with svc.client(tenant="b") as b:
        for _ in range(count):
            started = time.perf_counter()
            b.execute(binary_id, "x")
            times.append((time.perf_counter() - started) * 1000)
            if interval_s:
                time.sleep(interval_s)
    return times


def while_loading(svc: RunningService, binary_id: str, modules: list[bytes], interval_s: float,
                  ) -> tuple[list[tuple[float, float]], list[float], list[object]]:
    """B's (latency, seconds since A's loads were sent) from the moment A's loads are sent
    until both are answered; the loads' own durations; the replies."""
    ctx = zmq.Context.instance()
    sockets = [ctx.socket(zmq.DEALER) for _ in modules]
    times: list[tuple[float, float]] = []
    load_ms: list[float] = [0.0] * len(modules)
    replies: list[object] = [None] * len(modules)
    try:
        for sock in sockets:
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(svc.endpoint)
        started = time.perf_counter()
        for index, (sock, data) in enumerate(zip(sockets, modules, strict=True)):
            sock.send_multipart([p.encode(p.Load(id=index + 1, tenant="a", name=f"big{index}")),
                                 data], copy=False)
        deadline = time.monotonic() + 600
        with svc.client(tenant="b") as b:
            while None in replies and time.monotonic() < deadline:
                before = time.perf_counter()
                b.execute(binary_id, "x")
                times.append(((time.perf_counter() - before) * 1000, before - started))
                if interval_s:
                    time.sleep(interval_s)
                for index, sock in enumerate(sockets):
                    if replies[index] is None and sock.poll(0):
                        replies[index] = p.reply_decoder.decode(sock.recv_multipart()[0])
                        load_ms[index] = (time.perf_counter() - started) * 1000
    finally:
        for sock in sockets:
            sock.close()
    return times, load_ms, replies


def refusal_times(svc: RunningService, module: bytes,
                  rounds: int) -> tuple[list[float], list[float]]:
    """(first load of new bytes, retry of the same bytes) -> INVALID_MODULE, in ms."""
    first, retry = [], []
    with svc.client(tenant="c") as c:
        for round_ in range(rounds):
            data = with_custom_section(module, round_)
            for bucket in (first, retry):
                started = time.perf_counter()
                try:
                    c.load(data=data, name="foreign")
                except errors.InvalidModule as exc:
                    assert exc.details.get("missing_imports"), exc
                else:
                    raise AssertionError("a module with foreign imports was loaded")
                bucket.append((time.perf_counter() - started) * 1000)
    return first, retry


def scan_time_ms(module: bytes, rounds: int = 200) -> float:
    with tempfile.NamedTemporaryFile(suffix=".wasm") as handle:
        handle.write(module)
        handle.flush()
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            with open(handle.name, "rb") as f, mmap.mmap(f.fileno(), 0,
                                                          access=mmap.ACCESS_READ) as mapped:
                try:
                    precheck_imports(mapped)
                except errors.InvalidModule:
                    pass
            times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=30.0)
    parser.add_argument("--requests", type=int, default=2000, help="B's idle executes")
    parser.add_argument("--rounds", type=int, default=5, help="refusals of each kind")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--interval-ms", type=float, default=5.0,
                        help="B's pause between requests while A loads (0: back to back)")
    args = parser.parse_args()
    size = int(args.size_mb * MB)

    print(f"machine: {os.cpu_count()} cores; generating modules of {args.size_mb:g} MB ...",
          flush=True)
    started = time.perf_counter()
    modules = [big_module(size, seed=seed) for seed in (1, 2)]
    foreign = big_module(size, seed=3, imports=FOREIGN)
    tiny_foreign = big_module(1000, seed=4, imports=FOREIGN)
    print(f"  {[len(m) for m in modules]} bytes + {len(foreign)} with foreign imports, "
          f"in {time.perf_counter() - started:.1f} s", flush=True)

    log = tempfile.NamedTemporaryFile(prefix="wc-bench-", suffix=".log")  # noqa: SIM115
    config: dict[str, dict[str, object]] = {
        "server": {"log_level": "info", "max_payload_bytes": 64 * 1024 * 1024}}
    if LANE:
        config["compile"] = {"timeout_ms": 600_000}
    svc = start_service(workers=args.workers, stderr=log, config=config)
    sampler = RssSampler(svc.pid)
    try:
        with svc.client(tenant="b") as b:
            upper = b.load(PLUGINS / "uppercase.wat").binary_id
            for _ in range(50):
                b.execute(upper, "warm")
            stats = b.stats()
        exec_pids = {w.pid for w in stats.workers}
        rss_before = {pid: psutil.Process(pid).memory_info().rss for pid in exec_pids}

        idle = execute_latencies(svc, upper, args.requests, args.interval_ms / 1000)
        print(f"B idle, one at a time:          {summary(idle)}", flush=True)

        during, load_ms, replies = while_loading(svc, upper, modules, args.interval_ms / 1000)
        ok = all(isinstance(r, p.Loaded) for r in replies)
        print(f"B while A loads 2 x {args.size_mb:g} MB:   {summary([ms for ms, _ in during])}")
        slowest = sorted(during, reverse=True)[:3]
        print("  B's slowest: " + ", ".join(f"{ms:.0f} ms at {at:.2f} s" for ms, at in slowest)
              + " (after A's loads were sent)")
        print(f"  A's loads answered after {', '.join(f'{ms / 1000:.1f} s' for ms in load_ms)}"
              f" ({'both loaded' if ok else replies})", flush=True)

        with svc.client(tenant="b") as b:
            stats = b.stats()
        for w in stats.workers:
            before = rss_before.get(w.pid)
            was = f"{before / 2**20:6.1f} MiB" if before else "(new worker)"
            now = psutil.Process(w.pid).memory_info().rss
            print(f"  executing worker pid {w.pid}: RSS {was} -> {now / 2**20:6.1f} MiB"
                  f", compiled {w.compiled}, deserialized {w.deserialized}")
        lane_peak = max((rss for pid, rss in sampler.peak.items() if pid not in exec_pids),
                        default=0)
        exec_peak = max((rss for pid, rss in sampler.peak.items() if pid in exec_pids),
                        default=0)
        print(f"  peak RSS: compile workers {lane_peak / 2**20:.0f} MiB, executing workers "
              f"{exec_peak / 2**20:.0f} MiB; compile restarts "
              f"{ {k: v for k, v in stats.restarts_by_cause.items() if k.startswith('compile')} }")

        first, retry = refusal_times(svc, foreign, args.rounds)
        tiny_first, tiny_retry = refusal_times(svc, tiny_foreign, args.rounds)
        print(f"refuse {len(foreign) / MB:.1f} MB module, foreign imports, new bytes:  "
              f"{summary(first)}")
        print(f"refuse {len(foreign) / MB:.1f} MB module, foreign imports, same bytes: "
              f"{summary(retry)}")
        print(f"refuse tiny module, foreign imports (new / same bytes): "
              f"p50 {pct(tiny_first, 0.5):.2f} / {pct(tiny_retry, 0.5):.2f} ms")
        if precheck_imports is not None:
            print(f"import check alone (mmap + scan) of the {len(foreign) / MB:.1f} MB module: "
                  f"{scan_time_ms(foreign):.3f} ms")
    finally:
        sampler.stop()
        svc.cleanup()
    lane = lane_times(Path(log.name).read_text(), "c", "INVALID_MODULE")
    log.close()
    if lane:
        print(f"refusals in the compile lane alone (dispatch -> reply, big and tiny): "
              f"{summary(lane)}")
    return 0


def lane_times(log: str, tenant: str, code: str) -> list[float]:
    """The compile lane's own times for `tenant`'s compiles that ended with `code`, from
    the supervisor's log lines (compile_lane.py)."""
    pattern = rf"compile for tenant '{tenant}': {code} in ([0-9.]+) ms on a compile worker"
    return [float(ms) for ms in re.findall(pattern, log)]


if __name__ == "__main__":
    raise SystemExit(main())
