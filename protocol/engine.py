"""The engine fingerprint: names compiled artifacts so that engines of different versions or
settings never share one. Computed from package metadata, without importing wasmtime, so the
supervisor (which never runs wasm) agrees with its workers at no cost.
"""

from __future__ import annotations

import functools
import hashlib
import platform
from importlib import metadata

# Bumped when an engine setting that changes generated code changes in the sandbox.
ENGINE_LAYOUT = "epoch+fuel+pool/v1"


@functools.cache  # package metadata does not change under a running process
def engine_fingerprint() -> str:
    """wasmtime version, target and the engine settings that shape compiled code (epoch
    checks, fuel metering, pooling memory layout). Deserializing still validates
    compatibility itself; this only keeps artifacts of different engines apart on disk."""
    version = metadata.version("wasmtime")
    raw = f"wasmtime-{version}|{platform.machine()}|{platform.system()}|{ENGINE_LAYOUT}"
    digest = hashlib.sha256(raw.encode()).hexdigest()[:16]
    return f"wasmtime-{version}-{platform.machine()}-{digest}"
