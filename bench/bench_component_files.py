"""What a component's WASI files cost: the Python sample (plugins/components/upper_py.wasm,
which imports wasi:filesystem, as every componentize-py component does) run in the worker's
sandbox on a 5-byte input with no WASI files, with arguments, with a scratch /tmp too
(created, watched, measured, emptied) and with a read-only mapped directory too. The figure
behind docs/operations.md, section 2.6.

    python bench/bench_component_files.py [--runs N]

The plugin opens no file on this input, so the difference is the service's own cost.
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

from wasmcore.protocol.limits import Limits  # noqa: E402
from wasmcore.sandbox_worker.runtime import Sandbox  # noqa: E402
from wasmcore.sandbox_worker.wasi import WasiFiles  # noqa: E402

LIMITS = Limits(memory_bytes=256 << 20)


def times_us(sandbox: Sandbox, component: object, files: WasiFiles | None,
             runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter_ns()
        done = sandbox.execute(component, b"hello", limits=LIMITS,  # type: ignore[arg-type]
                               files=files)
        times.append((time.perf_counter_ns() - started) / 1000)
        assert done.output == b"HELLO"
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=300)
    runs = parser.parse_args().runs
    with tempfile.TemporaryDirectory() as root, tempfile.TemporaryDirectory() as mapped, \
            Sandbox() as sandbox:
        component = sandbox.compile(
            (ROOT / "plugins" / "components" / "upper_py.wasm").read_bytes())
        cases: dict[str, WasiFiles | None] = {
            "no files": None,
            "argv": WasiFiles(args=("a",), argv0="upper_py"),
            "+ scratch /tmp": WasiFiles(args=("a",), argv0="upper_py", scratch_root=root,
                                        scratch_bytes=16 << 20),
            "+ scratch + 1 mapped dir": WasiFiles(args=("a",), argv0="upper_py",
                                                  scratch_root=root, scratch_bytes=16 << 20,
                                                  dirs=(("/data", mapped),)),
        }
        for files in cases.values():  # warm up
            times_us(sandbox, component, files, 10)
        # Interleaved, so that the machine's drift spreads over every case alike.
        samples: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(runs // 10):
            for name, files in cases.items():
                samples[name] += times_us(sandbox, component, files, 10)
        base = None
        for name, values in samples.items():
            us = statistics.median(values)
            base = us if base is None else base
            print(f"{name:28s} {us:8.1f} us per execution (median of {len(values)}), "
                  f"+{us - base:.1f} us")


if __name__ == "__main__":
    main()
