"""Load once, serve everywhere: reload and restart timings on the real service.

    python bench/bench_reload.py [--workers N] [--rounds N]

Reports, in one run:
- reloading an unchanged file through the client (median, p99);
- loading a generated ~1.8 MB module with 1 and with N workers: the load's latency, compiles in
  the whole service (must stay 1: the compile lane's) and deserializations (every executing
  worker);
- a changed file on disk -> every worker serving the new version (median, p99);
- a supervisor restart with 100 loaded binaries -> serving again (first successful execute).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import wasmtime

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from wasmcore.client.launcher import start_service  # noqa: E402

PLUGINS = ROOT / "plugins"
QUIET = {"server": {"log_level": "error"}, "pool": {"heartbeat_interval_ms": 50}}


def big_module(functions: int = 7200, seed: int = 0) -> bytes:
    """A valid core module of about 1.8 MB (many arithmetic functions), plus the ABI."""
    body = " ".join(f"(i32.add (local.get 0) (i32.const {i}))" for i in range(40))
    funcs = "\n".join(
        f'(func (export "f{i}") (param i32) (result i32) '
        f"{body} {' '.join(['i32.xor'] * 39)} (i32.const {seed}) i32.add)"
        for i in range(functions)
    )
    upper = (PLUGINS / "uppercase.wat").read_text()
    text = upper.rstrip().rstrip(")") + "\n" + funcs + "\n)"
    return wasmtime.wat2wasm(text)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def unchanged_reload(rounds: int) -> list[float]:
    svc = start_service(workers=2, config=QUIET)
    try:
        with svc.client() as c:
            c.load(PLUGINS / "uppercase.wat")
            times = []
            for _ in range(rounds):
                started = time.perf_counter()
                assert not c.load(PLUGINS / "uppercase.wat").changed
                times.append((time.perf_counter() - started) * 1000)
        return times
    finally:
        svc.cleanup()


def compile_once(workers: int, module: bytes, tmp: Path) -> tuple[float, int, int, float]:
    svc = start_service(workers=workers, config=QUIET)
    try:
        path = tmp / f"big{workers}.wasm"
        path.write_bytes(module)
        with svc.client() as c:
            started = time.perf_counter()
            binary = c.load(path).binary_id
            load_ms = (time.perf_counter() - started) * 1000
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                stats = c.stats()
                compiled = sum(w.compiled for w in stats.workers)
                deserialized = sum(w.deserialized for w in stats.workers)
                if compiled + deserialized >= workers:  # every executing worker has it
                    break
                time.sleep(0.02)
            started = time.perf_counter()
            for _ in range(workers * 4):
                c.execute(binary, "x")
            exec_ms = (time.perf_counter() - started) * 1000 / (workers * 4)
            stats = c.stats()
            everyone = stats.workers + stats.compile_workers
            return (load_ms, sum(w.compiled for w in everyone),
                    sum(w.deserialized for w in everyone), exec_ms)
    finally:
        svc.cleanup()


def change_to_serving(rounds: int, tmp: Path, workers: int) -> list[float]:
    svc = start_service(workers=workers, config=QUIET)
    try:
        path = tmp / "live.wat"
        shutil.copyfile(PLUGINS / "uppercase.wat", path)
        variants = [(PLUGINS / "rot13.wat").read_bytes(), (PLUGINS / "uppercase.wat").read_bytes()]
        expected = [b"nop", b"ABC"]
        times = []
        with svc.client() as c:
            binary = c.load(path).binary_id
            time.sleep(0.5)  # the watcher is set up
            for i in range(rounds):
                version = c.list()[0].version
                started = time.perf_counter()
                path.write_bytes(variants[i % 2])
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    if c.list()[0].version > version:
                        break
                    time.sleep(0.0005)
                times.append((time.perf_counter() - started) * 1000)
                # Every execution after the commit, on any worker, runs the new version.
                for _ in range(workers * 2):
                    assert c.execute(binary, "abc").output == expected[i % 2]
        return times
    finally:
        svc.cleanup()


def restart_with(binaries: int, tmp: Path) -> tuple[float, float]:
    workdir = Path(tempfile.mkdtemp(prefix="wcb", dir="/tmp"))
    try:
        svc = start_service(workers=2, config=QUIET, workdir=workdir)
        ids = []
        with svc.client() as c:
            for i in range(binaries):
                ids.append(c.load(data=big_module(4, seed=i), name=f"m{i}").binary_id)
        svc.stop()
        started = time.perf_counter()
        svc = start_service(workers=2, workdir=workdir, wait=False)
        with svc.client(timeout_s=60) as c:
            while True:
                try:
                    c.execute(ids[-1], "x")
                    break
                except Exception:  # noqa: BLE001 - not serving yet
                    time.sleep(0.005)
            first = (time.perf_counter() - started) * 1000
            assert len(c.list()) == binaries
        svc.stop()
        return first, 0.0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(Path("/dev/shm") / workdir.name, ignore_errors=True)  # its payload dir


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="wcbench"))
    try:
        module = big_module()
        engine = wasmtime.Engine()
        started = time.perf_counter()
        wasmtime.Module(engine, module)
        compile_ms = (time.perf_counter() - started) * 1000
        print(f"generated module: {len(module) / 1e6:.2f} MB, in-process compile "
              f"{compile_ms:.0f} ms")
        times = unchanged_reload(args.rounds * 4)
        print(f"unchanged reload via client: median {statistics.median(times):.2f} ms, "
              f"p99 {pct(times, 0.99):.2f} ms (n={len(times)})")
        for workers in sorted({1, args.workers}):
            load_ms, compiled, deserialized, exec_ms = compile_once(workers, module, tmp)
            print(f"load 1.8 MB module, {workers} worker(s): load {load_ms:.0f} ms, "
                  f"compiles {compiled}, deserializations {deserialized}, "
                  f"execute after {exec_ms:.2f} ms")
        times = change_to_serving(args.rounds, tmp, args.workers)
        print(f"file changed on disk -> new version serving ({args.workers} workers): median "
              f"{statistics.median(times):.1f} ms, p99 {pct(times, 0.99):.1f} ms "
              f"(n={len(times)})")
        first, _ = restart_with(100, tmp)
        print(f"restart with 100 binaries -> first execute served: {first:.0f} ms")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
