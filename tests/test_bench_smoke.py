"""Smoke tests of the benchmark tooling (tiny counts, no timing assertions): the suite and
`wasm-client bench` must keep running and keep producing what they promise."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PLUGINS
from wasmcore.client.launcher import RunningService

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(90)
def test_suite_tiny_run_writes_every_row_and_plots(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.suite", "--quick", "-n", "3", "--requests", "16",
         "--concurrency", "4", "--sizes", "100", "--workers", "1", "--workers-max", "1",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=80,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [json_path] = out.glob("*.json")
    results = json.loads(json_path.read_text())

    sys.path.insert(0, str(ROOT))
    from bench.suite import row_names

    has_extism = results["machine"]["extism"] != "absent"
    produced = {r["row"] for r in results["rows"]}
    assert produced == set(row_names(has_extism))
    if not has_extism:
        assert {"extism fresh plugin", "extism reused plugin"} <= set(results["skipped"])
    for row in results["rows"]:
        assert row["size"] == 100 and row["count"] > 0 and row["samples_us"], row["row"]
        assert not row.get("errors"), row
    assert [s["workers"] for s in results["workers_scaling"]] == [1]
    pngs = {p.name.split("-", 2)[-1] for p in out.glob("*.png")}
    assert pngs == {"latency.png", "throughput-workers.png", "payload.png"}
    assert "wasm-core ipc" in proc.stdout


@pytest.mark.timeout(60)
def test_wasm_client_bench_json(service: RunningService) -> None:
    with service.client() as client:
        binary_id = client.load(PLUGINS / "uppercase.wasm").binary_id
    proc = subprocess.run(
        [sys.executable, "-m", "wasmcore.client.cli", "--endpoint", service.endpoint,
         "--json", "bench", "--binary-id", binary_id, "--input", "hello world",
         "--requests", "50", "--concurrency", "8"],
        capture_output=True, text=True, timeout=50,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["requests"] == 50 and report["concurrency"] == 8
    assert report["ok"] == 50 and report["errors"] == 0 and report["errors_by_code"] == {}
    assert report["throughput_per_s"] > 0
    assert 0 < report["latency_us"]["p50"] <= report["latency_us"]["p99"]
    assert report["metering"]["fuel"]["p50"] > 0
    assert report["metering"]["peak_memory_bytes"]["p50"] > 0


@pytest.mark.timeout(60)
def test_wasm_client_bench_counts_errors(service: RunningService) -> None:
    """An unknown binary: every request fails with NOT_FOUND, and the exit status says so."""
    proc = subprocess.run(
        [sys.executable, "-m", "wasmcore.client.cli", "--endpoint", service.endpoint,
         "--json", "bench", "--binary-id", "00000000-0000-4000-8000-000000000000",
         "--input", "x", "--requests", "10", "--concurrency", "4"],
        capture_output=True, text=True, timeout=50,
    )
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    assert report["ok"] == 0 and report["errors_by_code"] == {"NOT_FOUND": 10}


@pytest.mark.timeout(90)
def test_profile_service_reports_cpu_and_both_profiles() -> None:
    import shutil

    if shutil.which("py-spy") is None:
        pytest.skip("py-spy is a bench extra, not a test dependency")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.profile_service", "--seconds", "1", "--concurrency", "32",
         "--top", "3", "--rate", "200"],
        cwd=ROOT, capture_output=True, text=True, timeout=80,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for name in ("supervisor", "worker 0", "worker 1", "client"):
        assert f"  {name}" in out, out
    assert out.count("own samples:") == 2 and "(no samples)" not in out, out


@pytest.mark.timeout(90)
def test_host_methods_bench_runs(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "bench/bench_host_methods.py", "--calls", "20", "--runs", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=80,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "echo (trivial operator method)" in proc.stdout and "kv.incr" in proc.stdout
@pytest.mark.timeout(120)
@pytest.mark.parametrize("command", [
    ["bench/bench_large.py", "--mib", "1", "--rounds", "2", "--runs", "1"],
    ["-m", "bench.bench_client_patterns", "--requests", "300", "--rounds", "1",
     "--concurrency", "32", "--threads", "2"],
    ["bench/bench_memory.py", "--binaries", "20", "--run", "5", "--list-runs", "1"],
])
def test_payload_client_and_memory_benchmarks_run(command: list[str]) -> None:
    proc = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True,
                          timeout=110)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if "bench/bench_large.py" in command:  # every row, and no segment made after warming up
        rows = [line for line in proc.stdout.splitlines() if line.startswith("service")]
        assert len(rows) == 2 and all(line.split()[-1] == "0" for line in rows), proc.stdout
    elif "bench.bench_client_patterns" in command:
        for pattern in ("lanes", "semaphore", "waves", "execute_many", "threads"):
            assert f"\n{pattern} " in proc.stdout, proc.stdout
    else:
        assert "artifact store" in proc.stdout and "`list` of 21 binaries" in proc.stdout


@pytest.mark.timeout(120)
def test_latency_breakdown_finds_every_hop_of_every_request() -> None:
    """The probe rides into the supervisor and its workers (sitecustomize) and every request's
    events are found in order; a behaviour of the tooling, no timing."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.latency_breakdown", "-n", "40"],
        cwd=ROOT, capture_output=True, text=True, timeout=110,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "requests with every event in order: 40 (dropped 0)" in proc.stdout, proc.stdout
    assert "worker: Sandbox.execute" in proc.stdout
    assert "Error in sitecustomize" not in proc.stderr, proc.stderr


@pytest.mark.timeout(120)
def test_hop_floor_runs_every_topology() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.hop_floor", "-n", "20", "--rounds", "1", "--no-service"],
        cwd=ROOT, capture_output=True, text=True, timeout=110,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for row in ("relay + execute", "relay, socketpair link + execute", "direct + execute"):
        assert row in proc.stdout, proc.stdout
