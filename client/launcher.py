"""Start a real wasm-core supervisor as a child process and wait until it serves.

Used by the tests, the benchmarks and anyone embedding the service in a script. Every wait
is bounded; `stop()` escalates from SIGTERM to SIGKILL.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from wasmcore.client.core import Client
from wasmcore.protocol.errors import WasmCoreError


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return str(value)


def render_toml(sections: dict[str, Any], prefix: str = "") -> str:
    """TOML for a dict of tables (nested dicts become [a.b] tables)."""
    lines: list[str] = []
    for section, values in sections.items():
        name = f"{prefix}{section}"
        scalars = {k: v for k, v in values.items() if not isinstance(v, dict)}
        tables = {k: v for k, v in values.items() if isinstance(v, dict)}
        if scalars or not tables:
            lines.append(f"[{name}]")
            lines.extend(f"{key} = {_toml_value(value)}" for key, value in scalars.items())
            lines.append("")
        if tables:
            lines.append(render_toml(tables, prefix=f"{name}."))
    return "\n".join(lines)


def wait_until_serving(endpoint: str | None, process: subprocess.Popen[bytes], workers: int,
                       timeout_s: float = 60.0, credentials: str | None = None) -> None:
    """Until the server at `endpoint` has `workers` workers idle or busy (and a compile
    worker, if it has a compile lane); raises RuntimeError if `process` exits first,
    TimeoutError after `timeout_s`. `credentials`: a credentials file, for a server that
    requires keys."""
    deadline = time.monotonic() + timeout_s
    last_error = "no reply"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"wasm-core exited with {process.returncode} at start")
        try:
            with Client(endpoint, timeout_s=1.0, credentials=credentials) as client:
                stats = client.stats()
            ready = sum(1 for w in stats.workers if w.state in ("idle", "busy"))
            # A server with a compile lane lists its compile workers from the start.
            lane = stats.compile_workers
            lane_ready = not lane or any(w.state in ("idle", "busy") for w in lane)
            if ready >= workers and lane_ready:
                return
            last_error = (f"{ready}/{workers} workers ready"
                          f"{'' if lane_ready else ', no compile worker ready'}")
        except WasmCoreError as exc:
            last_error = str(exc)
        time.sleep(0.05)
    raise TimeoutError(f"wasm-core not ready within {timeout_s}s: {last_error}")


class RunningService:
    def __init__(self, workdir: Path, endpoint: str, process: subprocess.Popen[bytes],
                 config_path: Path, owns_workdir: bool, shm_dir: Path,
                 credentials: str | None = None, lifeline_fd: int = -1) -> None:
        self.workdir = workdir
        self.credentials = credentials  # what `client()` and the readiness wait use
        self.endpoint = endpoint
        self.process = process
        self.config_path = config_path
        self.owns_workdir = owns_workdir
        self.shm_dir = shm_dir
        # The write end of the pipe whose end of file stops the service: held until it exited.
        self._lifeline_fd = lifeline_fd

    @property
    def pid(self) -> int:
        return self.process.pid

    def client(self, tenant: str | None = None, timeout_s: float = 30.0,
               credentials: str | None = None, direct: bool | None = None) -> Client:
        """A client of this service: with `credentials`, else the service's own (if any),
        as `tenant` (default: the credentials' tenant, else "default"); `direct` as
        `Client`'s (default: direct lanes where the server offers them)."""
        return Client(self.endpoint, tenant=tenant, timeout_s=timeout_s,
                      credentials=credentials or self.credentials, direct=direct)

    def wait_ready(self, workers: int, timeout_s: float = 60.0) -> None:
        """Until `workers` workers are idle or busy (a started pool), or raise."""
        wait_until_serving(self.endpoint, self.process, workers, timeout_s, self.credentials)

    def stop(self, timeout_s: float = 20.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if self._lifeline_fd >= 0:
            os.close(self._lifeline_fd)
            self._lifeline_fd = -1
        return self.process.returncode

    def cleanup(self) -> None:
        self.stop()
        if self.owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            shutil.rmtree(self.shm_dir, ignore_errors=True)


def start_service(
    workers: int = 2,
    config: dict[str, dict[str, Any]] | None = None,
    endpoint: str | None = None,
    workdir: Path | None = None,
    wait: bool = True,
    ready_timeout_s: float = 60.0,
    stderr: Any = None,
    preexec_fn: Callable[[], None] | None = None,
    credentials: str | None = None,
) -> RunningService:
    """A supervisor on an ipc endpoint in a short private dir (ipc paths must stay short).
    `preexec_fn` runs in the supervisor's process before it starts (rlimits, say).
    `credentials`: a credentials file (an admin's, for the readiness wait and `client()`)
    for a server that requires keys; make them first with `wasm-core tenant add` in
    `workdir`'s data dir (`<workdir>/data`).
    The service stops when this process exits, however it exits (`--exit-with-fd`); a child
    forked without exec (multiprocessing's "fork") shares that lifeline until it exits too."""
    owns = workdir is None
    workdir = workdir or Path(tempfile.mkdtemp(prefix="wc", dir="/tmp"))
    if os.geteuid() == 0:
        # Run as root, the service's workers switch to an unprivileged user that must pass
        # through this directory to their sockets, artifacts and blobs: search, no listing.
        os.chmod(workdir, 0o711)
    sections: dict[str, dict[str, Any]] = {k: dict(v) for k, v in (config or {}).items()}
    server = sections.setdefault("server", {})
    # The socket in a directory of its own that the server creates private (0700; shared
    # with the workers' group only when they switch users): every peer is then the
    # service's user, so the server may read the paths they name (docs/operations.md 6.1).
    server.setdefault("endpoint", endpoint or f"ipc://{workdir}/sock/s.sock")
    server.setdefault("data_dir", str(workdir / "data"))
    server.setdefault("artifact_dir", str(workdir / "art"))
    shm_root = Path("/dev/shm")
    server.setdefault("shm_dir", str(shm_root / workdir.name if shm_root.is_dir()
                                     else workdir / "shm"))
    sections.setdefault("pool", {}).setdefault("workers", workers)
    config_path = workdir / "wasm-core.toml"
    if not config_path.exists() or config is not None:
        config_path.write_text(render_toml(sections))
    env = os.environ.copy()
    env.setdefault("XDG_RUNTIME_DIR", str(workdir))
    # The service lives as long as this process: only this process holds the pipe's write end
    # (os.pipe's fds are not inherited by other children), so the supervisor reads end of file
    # when this process exits, however it exits, and stops (supervisor/lifeline.py).
    lifeline_r, lifeline_w = os.pipe()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "wasmcore.supervisor.cli_server", "--config", str(config_path),
             "--exit-with-fd", str(lifeline_r)],
            stdin=subprocess.DEVNULL,
            stderr=stderr,
            env=env,
            preexec_fn=preexec_fn,
            pass_fds=(lifeline_r,),
        )
    except BaseException:
        os.close(lifeline_w)
        raise
    finally:
        os.close(lifeline_r)
    service = RunningService(workdir, server["endpoint"], process, config_path, owns,
                             Path(server["shm_dir"]), credentials, lifeline_w)
    if wait:
        try:
            service.wait_ready(sections["pool"]["workers"], ready_timeout_s)
        except BaseException:
            service.cleanup()
            raise
    return service
