"""Where a server listens by default: decided the same way by the server and its clients."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

ENDPOINT_ENV = "WASM_CORE_ENDPOINT"


def runtime_dir() -> Path:
    # Decided by the uid and the variable alone, never by whether the directory exists yet,
    # so that a server and its clients always agree on the default endpoint. For root, /run:
    # a root service's workers run as an unprivileged user that must reach the worker
    # sockets beside the endpoint, which root's own runtime dir (0700) would hide.
    if os.geteuid() == 0:
        return Path("/run/wasm-core")
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base:
        return Path(base) / "wasm-core"
    return Path(tempfile.gettempdir()) / f"wasm-core-{os.getuid()}"


def default_endpoint() -> str:
    return f"ipc://{runtime_dir() / 'wasm-core.sock'}"


def resolve_endpoint(endpoint: str | None) -> str:
    """An explicit endpoint, else $WASM_CORE_ENDPOINT, else the default socket."""
    return endpoint or os.environ.get(ENDPOINT_ENV) or default_endpoint()
