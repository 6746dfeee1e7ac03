"""`wasm-core demo`: start the real service on the default config, drive it with the real CLI
over the sample plugins, print every command and its output, then stop the service cleanly."""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from wasmcore.client.launcher import wait_until_serving

_READY_TIMEOUT_S = 60.0


def _sample(name: str) -> Path:
    return Path(str(resources.files("wasmcore.plugins") / name))


def _cli(*args: str, endpoint: str | None) -> str:
    command = ["wasm-client", *args]
    print(f"$ {shlex.join(command)}", flush=True)
    argv = [sys.executable, "-m", "wasmcore.client.cli"]
    if endpoint:
        argv += ["--endpoint", endpoint]
    done = subprocess.run([*argv, *args], capture_output=True, text=True, timeout=60)
    if done.stdout:
        print(done.stdout.rstrip("\n"))
    if done.stderr:
        print(done.stderr.rstrip("\n"))
    if done.returncode != 0:
        raise RuntimeError(f"`{shlex.join(command)}` failed with status {done.returncode}")
    return done.stdout.strip()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wasm-core demo")
    parser.add_argument("--endpoint", help="serve the demo on this endpoint instead")
    args = parser.parse_args(argv)
    server_argv = [sys.executable, "-m", "wasmcore.supervisor.cli_server"]
    if args.endpoint:
        server_argv += ["--endpoint", args.endpoint]
    print(f"$ wasm-core {' '.join(server_argv[3:])} &", flush=True)
    server = subprocess.Popen(server_argv, env=os.environ.copy())
    try:
        wait_until_serving(args.endpoint, server, workers=1, timeout_s=_READY_TIMEOUT_S)
        ep = args.endpoint
        upper = _cli("load", "--path", str(_sample("uppercase.wat")), endpoint=ep)
        rot13 = _cli("load", "--path", str(_sample("rot13.wat")), endpoint=ep)
        counter = _cli("load", "--path", str(_sample("counter.wat")), endpoint=ep)
        env_reader = _cli("load", "--path", str(_sample("env_reader.wat")), endpoint=ep)
        _cli("execute", "--binary-id", upper, "--input", "hello from wasm-core", endpoint=ep)
        _cli("execute", "--binary-id", counter, "--input", "one two three\nfour\n", endpoint=ep)
        _cli("execute", "--binary-id", env_reader, "--env", "GREETING=hi", "--env", "LANG=wat",
             endpoint=ep)
        _cli("chain", "--binary-ids", f"{upper},{rot13}", "--input", "hello chain",
             endpoint=ep)
        _cli("--json", "execute", "--binary-id", upper, "--input", "metered", endpoint=ep)
        # Other languages and kinds: Rust (core ABI), an Extism PDK plugin, a WASI command
        # with arguments, and a plugin keeping per-tenant state through host methods (kv.*).
        textkit = _cli("load", "--path", str(_sample("rust/textkit.wasm")), endpoint=ep)
        _cli("execute", "--binary-id", textkit, "--input", "the cat saw the hat", endpoint=ep)
        greet = _cli("load", "--path", str(_sample("extism/c/greet.wasm")), endpoint=ep)
        _cli("execute", "--binary-id", greet, "--entry", "greet", "--input", "extism",
             "--env", "greeting=Hello", endpoint=ep)
        wasi = _cli("load", "--path", str(_sample("wasi_files.wasm")), endpoint=ep)
        _cli("execute", "--binary-id", wasi, "--arg", "args", "--arg", "from the demo",
             endpoint=ep)
        visits = _cli("load", "--path", str(_sample("visit_counter.wasm")), endpoint=ep)
        for _ in range(2):
            _cli("execute", "--binary-id", visits, "--input", "demo", endpoint=ep)
        _cli("list", endpoint=ep)
        _cli("stats", endpoint=ep)
        print("demo finished: the service answered every request; stopping it (SIGTERM)")
        return 0
    except (RuntimeError, TimeoutError, subprocess.TimeoutExpired) as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


if __name__ == "__main__":
    sys.exit(main())
