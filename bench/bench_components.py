"""Components (WASI preview 2) on the real service: load, instantiate, call, RSS, bulk bytes.

    python bench/bench_components.py [--rounds N] [--skip-languages | --round-trip-only]

Reports, in one run:
- per sample (plugins/components/upper_py.wasm, upper_js.wasm): the first load through the
  service (compile lane: compile + serialize), a later load of the artifact in a worker
  (deserialize; measured in-process, as a worker does it), instantiate + call of a 5-byte
  input in-process (a fresh store each time, as every execution), a 5-byte execute through
  the service (median, p99), and the RSS of each executing worker after running it;
- a 1 MiB round trip through the service (execute, output checked) for a core module
  (plugins/multi_entry.wasm `process`, an echo) and, in the same run, for components: the
  hand-written echo component (plugins/components/echo.wasm) with bytes as values (`process`),
  the Python sample as values (`process`), as streams (`process-stream`) and as stdin + an
  output file (`process-file`), the Rust sample (plugins/rust/upper_component.wasm) as streams
  and as stdin + an output file; plus each one's empty round trip, so the cost of the bytes
  alone is visible;
- the same 1 MiB round trip in-process (`Sandbox.execute`, as a worker runs it) for the core
  module and the Rust sample's entries, in the same run.

`--round-trip-only`: only the two 1 MiB round-trip tables (the Python sample still loads).
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

from wasmcore.client.launcher import start_service  # noqa: E402
from wasmcore.protocol.limits import Limits  # noqa: E402
from wasmcore.sandbox_worker.runtime import Sandbox, SandboxConfig  # noqa: E402
from wasmcore.sandbox_worker.wasi import WasiFiles  # noqa: E402

PLUGINS = ROOT / "plugins"
COMPONENTS = PLUGINS / "components"
SAMPLES = {"python": "upper_py.wasm", "js": "upper_js.wasm"}
RUST_COMPONENT = PLUGINS / "rust" / "upper_component.wasm"
CONFIG = {"server": {"log_level": "error"}, "compile": {"timeout_ms": 600_000},
          "limits": {"memory_mb": 256}}
MiB = 1024 * 1024


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def in_process(name: str, rounds: int) -> dict[str, float]:
    """Compile, serialize, deserialize and run a sample in this process (a worker's view)."""
    wasm = (COMPONENTS / name).read_bytes()
    with Sandbox(SandboxConfig()) as sandbox, tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        compiled = sandbox.compile(wasm)
        compile_s = time.perf_counter() - started
        artifact = Path(tmp) / "artifact"
        sandbox.serialize(compiled, artifact)
        sandbox.forget(compiled.sha256)
        started = time.perf_counter()
        loaded = sandbox.load_serialized(artifact, compiled.sha256)
        load_s = time.perf_counter() - started
        limits = Limits(memory_bytes=256 * MiB)
        started = time.perf_counter()
        sandbox.execute(loaded, b"hello", limits=limits)
        first_s = time.perf_counter() - started
        calls = []
        for _ in range(rounds):
            started = time.perf_counter()
            sandbox.execute(loaded, b"hello", limits=limits)
            calls.append(time.perf_counter() - started)
        return {"compile_s": compile_s, "artifact_mb": artifact.stat().st_size / MiB,
                "deserialize_s": load_s, "first_call_s": first_s,
                "call_median_s": statistics.median(calls), "call_p99_s": pct(calls, 0.99)}


def worker_rss_mb(client) -> list[str]:
    """Each executing worker's RSS now and its peak (VmHWM), in MiB, read from /proc."""
    shown = []
    for worker in client.stats().workers:
        fields = {}
        with open(f"/proc/{worker.pid}/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        rss, peak = (int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM"))
        shown.append(f"{rss:.0f} (peak {peak:.0f})")
    return shown


def round_trip_data() -> bytes:
    return bytes(range(65, 91)) * (MiB // 26) + b"A" * (MiB % 26)  # already upper-case


def in_process_round_trip(rounds: int) -> None:
    """The 1 MiB round trip in a worker's Sandbox: the core module against the Rust sample's
    bulk entries, interleaved so that the machine's drift spreads over each alike."""
    data = round_trip_data()
    limits = Limits(memory_bytes=256 * MiB)
    with Sandbox(SandboxConfig()) as sandbox, tempfile.TemporaryDirectory() as root:
        files = WasiFiles(scratch_root=root, scratch_bytes=16 * MiB)
        core = sandbox.compile((PLUGINS / "multi_entry.wasm").read_bytes())
        rust = sandbox.compile(RUST_COMPONENT.read_bytes())
        cases = [("core module (multi_entry process)", core, "process"),
                 ("component, rust sample, process-stream", rust, "process-stream"),
                 ("component, rust sample, process-file", rust, "process-file")]
        samples: dict[str, list[list[float]]] = {label: [[], []] for label, _, _ in cases}
        for i in range(rounds):
            for label, binary, entry in cases:
                for k, payload in enumerate((b"", data)):
                    started = time.perf_counter()
                    out = sandbox.execute(binary, payload, entry=entry, limits=limits,
                                          files=files).output
                    samples[label][k].append(time.perf_counter() - started)
                    if i == 0:
                        assert bytes(out) == payload, label
        base = statistics.median(samples[cases[0][0]][1])
        print(f"\n1 MiB round trip in-process, Sandbox.execute (median of {rounds}):")
        for label, (empty, mib) in samples.items():
            e, m = statistics.median(empty), statistics.median(mib)
            print(f"  {label}: empty {ms(e)}, 1 MiB {ms(m)} ({m / base:.1f}x the core "
                  f"module's), bytes alone {ms(m - e)}")


def through_service(rounds: int, languages: bool, stats: bool = True) -> None:
    svc = start_service(workers=2, config=CONFIG)
    try:
        with svc.client(timeout_s=600) as c:
            print(f"worker RSS at start: {', '.join(worker_rss_mb(c))} MiB")
            ids: dict[str, str] = {}
            if languages:
                for language, name in SAMPLES.items():
                    if not stats and language != "python":
                        continue
                    started = time.perf_counter()
                    ids[language] = c.load(COMPONENTS / name).binary_id
                    print(f"{language}: first load through the service (compile lane) "
                          f"{time.perf_counter() - started:.1f} s")
                    if not stats:
                        continue
                    times = []
                    for _ in range(rounds):
                        started = time.perf_counter()
                        assert c.execute(ids[language], b"hello").output == b"HELLO"
                        times.append(time.perf_counter() - started)
                    print(f"{language}: 5-byte execute through the service: median "
                          f"{ms(statistics.median(times))}, p99 {ms(pct(times, 0.99))} "
                          f"({rounds} runs, first included)")
                    print(f"{language}: worker RSS after: "
                          f"{', '.join(worker_rss_mb(c))} MiB")
            core = c.load(PLUGINS / "multi_entry.wasm").binary_id
            echo = c.load(COMPONENTS / "echo.wasm").binary_id
            rust = c.load(RUST_COMPONENT).binary_id
            cases = [("core module (multi_entry process)", core, None),
                     ("component, hand-written echo, process (values)", echo, None),
                     ("component, rust sample, process-stream", rust, "process-stream"),
                     ("component, rust sample, process-file", rust, "process-file")]
            if languages:
                cases += [("component, python sample, process (values)", ids["python"], None),
                          ("component, python sample, process-stream", ids["python"],
                           "process-stream"),
                          ("component, python sample, process-file", ids["python"],
                           "process-file")]
            data = round_trip_data()
            # Interleaved (each case in turn, every round), so that the machine's load, which
            # moves by 2-5x within a minute here, weighs on every case alike.
            samples: dict[str, list[list[float]]] = {label: [[], []] for label, _, _ in cases}
            for i in range(rounds):
                for label, binary, entry in cases:
                    for k, payload in enumerate((b"", b"", data)):
                        started = time.perf_counter()
                        out = c.execute(binary, payload, entry=entry).output
                        samples[label][min(k, 1) if payload else 0].append(
                            time.perf_counter() - started)
                        if i == 0:
                            assert bytes(out) == payload, label
            base = statistics.median(samples[cases[0][0]][1])
            print(f"\n1 MiB round trip through the service (median of {rounds}, interleaved; "
                  "empty input median of 2x as many):")
            for label, (empty, mib) in samples.items():
                e, m = statistics.median(empty), statistics.median(mib)
                print(f"  {label}: empty {ms(e)}, 1 MiB {ms(m)} "
                      f"({m / base:.1f}x the core module's), bytes alone {ms(m - e)}")
    finally:
        svc.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--skip-languages", action="store_true",
                        help="only the 1 MiB round trips of the core module, the echo and the "
                             "Rust components")
    parser.add_argument("--round-trip-only", action="store_true",
                        help="only the 1 MiB round trips (in-process and through the service)")
    args = parser.parse_args()
    in_process_round_trip(args.rounds)
    if args.round_trip_only:
        through_service(args.rounds, True, stats=False)
        return
    if not args.skip_languages:
        for language, name in SAMPLES.items():
            r = in_process(name, args.rounds)
            print(f"{language} ({name}, {(COMPONENTS / name).stat().st_size / MiB:.1f} MiB): "
                  f"compile {r['compile_s']:.1f} s, artifact {r['artifact_mb']:.0f} MiB, "
                  f"deserialize {ms(r['deserialize_s'])}, first instantiate+call "
                  f"{ms(r['first_call_s'])}, then median {ms(r['call_median_s'])}, "
                  f"p99 {ms(r['call_p99_s'])}")
    through_service(args.rounds, not args.skip_languages)


if __name__ == "__main__":
    main()
