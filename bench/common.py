"""Shared pieces of the benchmarks: workload, statistics, endpoints, service config."""

from __future__ import annotations

import atexit
import os
import platform
import shutil
import socket
import statistics
import tempfile
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = ROOT / "plugins" / "uppercase.wasm"
EXTISM_PLUGIN = ROOT / "plugins" / "extism" / "uppercase.wasm"
KiB = 1024
MiB = 1024 * KiB

# The service's defaults (64 MiB linear memory, 16 MiB output) cannot run the 16 MiB row:
# the plugin's memory holds the input plus its heap, and the output equals the input. The
# benchmarks raise both; every row (in-process ones too) runs under these limits.
BENCH_MEMORY_MB = 256
BENCH_OUTPUT_BYTES = 64 * MiB
BENCH_LIMITS_NOTE = (
    f"limits raised for the benchmark: memory_mb={BENCH_MEMORY_MB}, "
    f"output_bytes={BENCH_OUTPUT_BYTES // MiB} MiB (defaults 64 MiB / 16 MiB)"
)


def service_config() -> dict[str, dict[str, Any]]:
    # The tcp rows measure the transport itself, in the clear; bench_curve.py measures CURVE.
    return {
        "server": {"log_level": "warning", "allow_unauthenticated_tcp": True},
        "limits": {"memory_mb": BENCH_MEMORY_MB, "output_bytes": BENCH_OUTPUT_BYTES},
    }


def make_input(size: int) -> bytes:
    """Mixed-case ASCII text (so the plugin has work on every byte), `size` bytes long."""
    unit = b"The quick brown fox jumps over the lazy dog. "
    return (unit * (size // len(unit) + 1))[:size]


def expected_output(data: bytes) -> bytes:
    return data.upper()  # same as the plugin on ASCII input


def size_label(size: int) -> str:
    if size >= MiB and size % MiB == 0:
        return f"{size // MiB} MiB"
    if size >= KiB and size % KiB == 0:
        return f"{size // KiB} KiB"
    return f"{size} B"


def parse_size(text: str) -> int:
    text = text.strip().upper().replace("IB", "").replace("B", "")
    for suffix, factor in (("K", KiB), ("M", MiB)):
        if text.endswith(suffix):
            return int(float(text[:-1]) * factor)
    return int(text)


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def endpoint_for(transport: str, tag: str) -> str:
    """A fresh endpoint of the given kind; ipc paths stay short (the sun_path limit is 108)."""
    if transport == "tcp":
        return f"tcp://127.0.0.1:{free_tcp_port()}"
    directory = tempfile.mkdtemp(prefix="wcb", dir="/tmp")
    atexit.register(shutil.rmtree, directory, True)  # the socket file outlives its server
    return f"ipc://{directory}/{tag}.sock"


@dataclass(slots=True)
class Summary:
    """Latency percentiles in microseconds, plus throughput in operations per second."""

    count: int
    median_us: float
    p90_us: float
    p99_us: float
    max_us: float
    mean_us: float
    throughput: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(samples_us: list[float], throughput: float | None = None) -> Summary:
    """`throughput` defaults to one-at-a-time: 1 / mean latency."""
    ordered = sorted(samples_us)
    mean = statistics.fmean(ordered) if ordered else float("nan")
    return Summary(
        count=len(ordered),
        median_us=percentile(ordered, 0.5),
        p90_us=percentile(ordered, 0.9),
        p99_us=percentile(ordered, 0.99),
        max_us=ordered[-1] if ordered else float("nan"),
        mean_us=mean,
        throughput=throughput if throughput is not None else (1e6 / mean if mean else 0.0),
    )


def machine_info() -> dict[str, Any]:
    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "absent"

    return {
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "wasmtime": version("wasmtime"),
        "pyzmq": version("pyzmq"),
        "extism": version("extism"),
    }


def measure_serial(fn: Any, payload: bytes, iterations: int, warmup: int = 50,
                   progress: Any = None) -> list[float]:
    """Per-call microseconds of `fn(payload)`, one call at a time, after a warm-up."""
    import time

    for _ in range(warmup):
        fn(payload)
    clock = time.perf_counter_ns
    samples: list[float] = []
    for _ in range(iterations):
        start = clock()
        fn(payload)
        samples.append((clock() - start) / 1000.0)
        if progress is not None:
            progress(1)
    return samples
