"""What a WASI execution's files cost: the same command run in the worker's sandbox without
files, with a scratch /tmp (created, watched, measured, removed), and with a read-only
mapped directory too. The figure behind docs/operations.md, section 2.6.

    python bench/bench_wasi_scratch.py [--runs N]

The command is plugins/wasi_files.wasm `args` (prints its argv, opens no file), so the
difference is the service's own cost per execution, not the plugin's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from wasmcore.sandbox_worker.runtime import Sandbox  # noqa: E402
from wasmcore.sandbox_worker.wasi import WasiFiles  # noqa: E402


def median_us(sandbox: Sandbox, module: object, files: WasiFiles | None, runs: int) -> float:
    for _ in range(20):  # warm up
        sandbox.execute(module, b"", files=files)  # type: ignore[arg-type]
    times = []
    for _ in range(runs):
        started = time.perf_counter_ns()
        sandbox.execute(module, b"", files=files)  # type: ignore[arg-type]
        times.append((time.perf_counter_ns() - started) / 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=2000)
    runs = parser.parse_args().runs
    with tempfile.TemporaryDirectory() as root, tempfile.TemporaryDirectory() as mapped, \
            Sandbox() as sandbox:
        module = sandbox.compile((ROOT / "plugins" / "wasi_files.wasm").read_bytes())
        cases = {
            "argv only": WasiFiles(args=("args",), argv0="wasi_files"),
            "+ scratch /tmp": WasiFiles(args=("args",), argv0="wasi_files", scratch_root=root,
                                        scratch_bytes=16 << 20),
            "+ scratch + 1 mapped dir": WasiFiles(args=("args",), argv0="wasi_files",
                                                  scratch_root=root, scratch_bytes=16 << 20,
                                                  dirs=(("/data", mapped),)),
        }
        base = None
        for name, files in cases.items():
            us = median_us(sandbox, module, files, runs)
            base = us if base is None else base
            print(f"{name:28s} {us:8.1f} us per execution (median of {runs}), "
                  f"+{us - base:.1f} us")


if __name__ == "__main__":
    main()
