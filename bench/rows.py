"""The in-process rows of the suite: one object per way of running uppercase.wasm."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bench.common import BENCH_MEMORY_MB, BENCH_OUTPUT_BYTES, EXTISM_PLUGIN, PLUGIN, MiB
from wasmcore.protocol.limits import Limits
from wasmcore.sandbox_worker.runtime import Sandbox, SandboxConfig

try:  # optional: the `bench` extra; its rows are skipped (with a note) without it
    import extism
except ImportError:  # pragma: no cover - depends on the environment
    extism = None

EXTISM_MISSING = "extism is not installed (pip install -e '.[bench]'); Extism rows skipped"


class FastPath:
    """The service's runtime in-process, under the same raised limits as the service."""

    def __init__(self) -> None:
        limits = Limits(memory_bytes=BENCH_MEMORY_MB * MiB, output_bytes=BENCH_OUTPUT_BYTES)
        self.sandbox = Sandbox(SandboxConfig(default_limits=limits))
        self.module = self.sandbox.compile(PLUGIN.read_bytes())

    def __call__(self, data: bytes) -> bytes:
        return self.sandbox.execute(self.module, data).output

    def close(self) -> None:
        self.sandbox.close()


class Straightforward:
    """bench_sandbox's public-API wasmtime-py baseline (new Store, instantiate, Func calls)."""

    def __init__(self) -> None:
        from bench.bench_sandbox import Straightforward as Impl

        self.impl = Impl()

    def __call__(self, data: bytes) -> bytes:
        return self.impl.execute(data)

    def close(self) -> None:
        pass


class ExtismFresh:
    """A new Extism plugin instance per call, from one CompiledPlugin (compiled once): the
    closest Extism analogue of the service's fresh store per execution."""

    def __init__(self) -> None:
        assert extism is not None
        # Not re-exported at the package's top level in extism 1.1.
        from extism.extism import CompiledPlugin

        self.compiled = CompiledPlugin(EXTISM_PLUGIN.read_bytes(), wasi=False)

    def __call__(self, data: bytes) -> bytes:
        plugin = extism.Plugin(self.compiled)
        try:
            return bytes(plugin.call("upper", data))
        finally:
            del plugin

    def close(self) -> None:
        pass


class ExtismReused:
    """One Extism plugin for every call (state survives between calls: no isolation)."""

    def __init__(self) -> None:
        assert extism is not None
        self.plugin = extism.Plugin(EXTISM_PLUGIN.read_bytes(), wasi=False)

    def __call__(self, data: bytes) -> bytes:
        return bytes(self.plugin.call("upper", data))

    def close(self) -> None:
        pass


# name -> factory; the order is the table's.
IN_PROCESS: dict[str, Callable[[], Any]] = {
    "wasmtime-py straightforward": Straightforward,
    "sandbox fast path": FastPath,
    "extism fresh plugin": ExtismFresh,
    "extism reused plugin": ExtismReused,
}
EXTISM_ROWS = ("extism fresh plugin", "extism reused plugin")
