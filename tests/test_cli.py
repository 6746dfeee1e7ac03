"""The command lines, as a user runs them: real processes, real output, real exit statuses."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.conftest import HOSTILE, PLUGINS

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def cli(service, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "wasmcore.client.cli", "--endpoint", service.endpoint,
         *args],
        input=stdin, capture_output=True, timeout=60,
    )


def test_load_execute_chain_list_unload_stats(service):
    loaded = cli(service, "load", "--path", str(PLUGINS / "uppercase.wat"))
    assert loaded.returncode == 0, loaded.stderr
    upper = loaded.stdout.decode().strip()
    assert UUID.match(upper)
    rot = cli(service, "load", "--path", str(PLUGINS / "rot13.wat")).stdout.decode().strip()

    done = cli(service, "execute", "--binary-id", upper, "--input", "hello")
    assert done.returncode == 0 and done.stdout == b"HELLO"

    env = cli(service, "load", "--path", str(PLUGINS / "env_reader.wat")).stdout.decode().strip()
    done = cli(service, "execute", "--binary-id", env, "--env", "K=V", "--env", "X=1=2")
    assert done.stdout == b"K=V\nX=1=2\n" and b"[log] env-reader: 2 entries" in done.stderr

    done = cli(service, "execute", "--binary-id", upper, "--input-file", "-",
               stdin=b"from stdin")
    assert done.stdout == b"FROM STDIN"

    done = cli(service, "chain", "--binary-ids", f"{upper},{rot}", "--input", "hello")
    assert done.returncode == 0 and done.stdout == b"URYYB"

    listed = cli(service, "--json", "list")
    ids = {b["binary_id"] for b in json.loads(listed.stdout)}
    assert {upper, rot, env} <= ids
    assert upper.encode() in cli(service, "list").stdout

    stats = json.loads(cli(service, "--json", "stats").stdout)
    assert len(stats["workers"]) == 2 and stats["queue_depth"] == 0

    assert cli(service, "unload", "--binary-id", rot).returncode == 0
    gone = cli(service, "execute", "--binary-id", rot, "--input", "x")
    assert gone.returncode == 1 and gone.stderr.startswith(b"NOT_FOUND: ")


def test_errors_go_to_stderr_with_code_and_status(service):
    trap = cli(service, "load", "--path", str(HOSTILE / "trap.wat")).stdout.decode().strip()
    done = cli(service, "execute", "--binary-id", trap, "--input", "x")
    assert done.returncode == 1 and done.stdout == b""
    assert done.stderr.startswith(b"TRAP: ")
    done = cli(service, "--json", "execute", "--binary-id", trap, "--input", "x")
    error = json.loads(done.stderr)["error"]
    assert done.returncode == 1 and error["code"] == "TRAP" and error["details"]["trap_code"]
    bad = cli(service, "load", "--path", str(HOSTILE / "invalid.wasm"))
    assert bad.returncode == 1 and bad.stderr.startswith(b"INVALID_MODULE: ")
    usage = cli(service, "execute", "--binary-id", trap, "--env", "novalue")
    assert usage.returncode == 2 and b"KEY=VALUE" in usage.stderr


def test_json_execute_has_metering(service):
    upper = cli(service, "load", "--path", str(PLUGINS / "uppercase.wat")).stdout.decode().strip()
    out = json.loads(cli(service, "--json", "execute", "--binary-id", upper, "--input", "a").stdout)
    assert out["output"] == "A" and out["metering"]["fuel_consumed"] > 0
    assert out["worker_pid"] > 0 and out["version"] >= 1


def test_tenant_option(service):
    upper = cli(service, "--tenant", "cli-a", "load", "--path",
                str(PLUGINS / "uppercase.wat")).stdout.decode().strip()
    other = cli(service, "--tenant", "cli-b", "execute", "--binary-id", upper, "--input", "x")
    assert other.returncode == 1 and other.stderr.startswith(b"NOT_FOUND")


def test_unreachable_server_is_a_clear_error(tmp_path: Path):
    done = subprocess.run(
        [sys.executable, "-m", "wasmcore.client.cli", "--endpoint",
         f"ipc://{tmp_path}/none.sock", "--timeout", "0.5", "stats"],
        capture_output=True, timeout=60,
    )
    assert done.returncode == 1 and done.stderr.startswith(b"UNAVAILABLE: ")
    assert b"is `wasm-core` running?" in done.stderr


def test_demo_runs_the_real_service_end_to_end():
    """The quick start's `wasm-core demo`, on a private runtime and data dir."""
    workdir = Path(tempfile.mkdtemp(prefix="wcd", dir="/tmp"))
    if os.geteuid() == 0:  # its workers switch to nobody, who must pass through (ops. doc 11)
        workdir.chmod(0o711)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(workdir), "XDG_DATA_HOME": str(workdir / "d")}
    try:
        done = subprocess.run([sys.executable, "-m", "wasmcore.supervisor.cli_server", "demo"],
                              capture_output=True, text=True, timeout=180, env=env)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "HELLO FROM WASM-CORE" in done.stdout and "URYYB PUNVA" in done.stdout
    assert "demo finished" in done.stdout
