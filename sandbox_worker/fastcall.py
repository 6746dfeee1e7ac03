"""The native fast path: one fresh-store execution of a core module in one foreign call.

`native/fastcall.c` does what `Sandbox._run` does with ~18 ctypes calls (store, limiter, fuel,
epoch deadline, instantiate, export lookups, alloc, copy-in, call, fuel and memory size,
store delete) in one, and keeps host.output / host.log in its own buffers; it calls back into
Python only for host.call / host.call_result and an output sink. Failures come back with the
store alive, and the Sandbox classifies them with the same code as its ctypes path.

The shared library is committed prebuilt for linux x86_64 (`native/build.sh` rebuilds it). It
is used only when it is present, loads, reports the ABI version this module expects and the
same struct layouts as wasmtime-py's bindings (`_raw.NATIVE_LAYOUT`); otherwise (or with
WASMCORE_NATIVE=0 in the environment) the Sandbox silently keeps its ctypes path.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys
from ctypes import c_int, c_int64, c_size_t, c_uint8, c_uint64, c_void_p
from pathlib import Path
from typing import Any

import wasmtime

from wasmcore.protocol.limits import Limits

from . import _raw
from .host import HOST_FUNC_TYPES, HostState, make_native_callbacks
from .module import CompiledModule, EntryKind, link

log = logging.getLogger(__name__)

ABI_VERSION = 1
DISABLE_ENV = "WASMCORE_NATIVE"  # "0": never use the native path (A/B runs, tests)
LIBRARY = Path(__file__).parent / "native" / f"fastcall-{sys.platform}-{platform.machine()}.so"

# fc_execute's results (fastcall.c): OK carries flags (the low four bits are the status)
OK, CODE, FAILED, VERIFY = 0, 1, 2, 3
STATUS_BITS, OK_LOGS, OK_TRUNCATED, OK_SINK, OK_KEPT = 15, 16, 32, 64, 128
NO_SINK = 2**64 - 1  # fc_execute's sink threshold when there is no sink (never reached)
# where a failure happened (fastcall.c's STAGE_*)
STAGE_SETUP, STAGE_INSTANTIATE, STAGE_EXPORT, STAGE_INITIALIZE = 1, 2, 3, 4
STAGE_ALLOC_INPUT, STAGE_PLACE_INPUT, STAGE_ALLOC_ENV, STAGE_PLACE_ENV, STAGE_CALL = 5, 6, 7, 8, 9
ALLOC_STAGES = (STAGE_ALLOC_INPUT, STAGE_ALLOC_ENV)
PLACE_STAGES = (STAGE_PLACE_INPUT, STAGE_PLACE_ENV)


class Results(ctypes.Structure):
    """The head of fastcall.c's fc_state: what an execution reports (same order and types)."""

    _fields_ = [
        ("fuel_left", c_uint64), ("memory_size", c_uint64), ("code", c_int64),
        ("stage", c_int64), ("missing_index", c_int64), ("alloc_ptr", c_uint64),
        ("alloc_len", c_uint64), ("error", c_void_p), ("trap", c_void_p), ("store", c_void_p),
        ("ctx", c_void_p), ("out_buf", c_void_p), ("out_len", c_uint64), ("out_total", c_uint64),
        ("out_capacity", c_uint64),
        ("log_buf", c_void_p), ("log_used", c_uint64), ("log_count", c_uint64),
        ("log_len", c_uint64), ("has_memory", c_uint8), ("sink_active", c_uint8),
        ("output_limit", c_uint8), ("logs_truncated", c_uint8), ("timed_out", c_uint8),
        ("kept", c_uint8), ("pad", c_uint8 * 2),
    ]


class _Plan(ctypes.Structure):
    _fields_ = [("pre", c_void_p), ("memory_index", c_int64), ("alloc_index", c_int64),
                ("initialize_index", c_int64), ("entry_index", c_int64), ("kind", c_int64),
                ("verify", c_int64)]


class _Limits(ctypes.Structure):
    _fields_ = [("memory_bytes", c_int64), ("fuel", c_uint64), ("output_cap", c_uint64),
                ("log_cap", c_uint64), ("deadline_ticks", c_uint64),
                ("precise_timeout_ns", c_int64)]


SINK_CALLBACK = ctypes.CFUNCTYPE(c_int, c_void_p, c_size_t)  # also the `keep` callback
CALL_CALLBACK = ctypes.CFUNCTYPE(c_int, c_void_p, c_size_t, c_void_p, c_size_t, c_void_p)
CALL_RESULT_CALLBACK = ctypes.CFUNCTYPE(c_int, c_void_p, c_size_t, c_void_p)

_library: Any = None
_loaded = False


def library() -> Any:
    """The loaded and checked native library, or None (logged once, at debug)."""
    global _library, _loaded
    if not _loaded:
        _loaded = True
        try:
            _library = _load()
        except Exception as exc:  # any problem: the ctypes path, never a failure
            log.debug("native fast path not used: %r", exc)
            _library = None
    return _library


def _load() -> Any:
    if not LIBRARY.is_file():
        raise FileNotFoundError(str(LIBRARY))
    lib = ctypes.CDLL(str(LIBRARY))
    lib.fc_version.restype = c_int
    lib.fc_version.argtypes = []
    if lib.fc_version() != ABI_VERSION:
        raise RuntimeError(f"ABI version {lib.fc_version()}, expected {ABI_VERSION}")
    layout = (c_int64 * 11)()
    lib.fc_layout.restype = None
    lib.fc_layout.argtypes = [c_void_p]
    lib.fc_layout(ctypes.addressof(layout))
    ours = (*_raw.NATIVE_LAYOUT, -1, ctypes.sizeof(Results), ctypes.sizeof(_Plan),
            ctypes.sizeof(_Limits))
    theirs = tuple(layout)
    if theirs[:7] != ours[:7] or theirs[8:] != ours[8:]:
        raise RuntimeError(f"layout mismatch: library {theirs}, expected {ours}")
    functions = _raw.native_function_addresses()
    table = (c_void_p * len(functions))(*functions)
    lib.fc_init.restype = c_int
    lib.fc_init.argtypes = [c_void_p, c_size_t]
    if lib.fc_init(ctypes.addressof(table), len(functions)) != 0:
        raise RuntimeError("libwasmtime lacks a function the native path needs")
    lib.fc_state_new.restype = c_void_p
    lib.fc_state_new.argtypes = [c_void_p] * 7
    lib.fc_state_free.restype = None
    lib.fc_state_free.argtypes = [c_void_p]
    return lib


class NativeRunner:
    """One Sandbox's native state: its C fc_state, the linker whose host functions are the C
    callbacks bound to it, and the per-module plans and per-Limits structs. Single-threaded,
    as the Sandbox."""

    def __init__(self, lib: Any, engine: wasmtime.Engine, instance_addr: int,
                 state: HostState) -> None:
        self._lib = lib
        callbacks = make_native_callbacks(state)
        # The ctypes callback objects must outlive the C state: kept here.
        self._callbacks = (SINK_CALLBACK(callbacks["sink_write"]),
                           CALL_CALLBACK(callbacks["call"]),
                           CALL_RESULT_CALLBACK(callbacks["call_result"]),
                           SINK_CALLBACK(callbacks["keep"]))
        self._state = state
        self._state_addr: int = lib.fc_state_new(
            _raw.addr(engine), instance_addr, state.memory_extern_addr,
            *(ctypes.cast(cb, c_void_p).value for cb in self._callbacks))
        if not self._state_addr:
            raise MemoryError("fc_state_new")
        self.results = Results.from_address(self._state_addr)
        self.linker = wasmtime.Linker(engine)
        for name in HOST_FUNC_TYPES:
            func_type = wasmtime.FuncType(*HOST_FUNC_TYPES[name])
            _raw.define_func_native(
                self.linker, b"host", name.encode(),
                func_type, ctypes.cast(getattr(lib, f"fc_host_{name}"), c_void_p).value or 0,
                self._state_addr)
        # Runs guest code: drops the GIL (the Python ticker thread, host callbacks take it).
        self.execute = ctypes.CFUNCTYPE(
            c_int, c_void_p, c_void_p, c_void_p, ctypes.c_char_p, c_uint64, ctypes.c_char_p,
            c_uint64, c_uint64)(("fc_execute", lib))
        self.resume = ctypes.CFUNCTYPE(
            c_int, c_void_p, c_void_p, ctypes.c_char_p, c_uint64, ctypes.c_char_p,
            c_uint64)(("fc_continue", lib))
        self.state = self._state_addr
        self.limits_cache: dict[int, tuple[Limits, int, _Limits]] = {}
        # A bytes view of the output buffer, remade when the C side moves it.
        self._view_addr = 0
        self._view = memoryview(b"")

    def close(self) -> None:
        """Free the C state (the Sandbox is closed: nothing runs through it any more)."""
        if self._state_addr:
            self._lib.fc_state_free(self._state_addr)
            self._state_addr = self.state = 0

    def prepare(self, compiled: CompiledModule) -> None:
        """Link `compiled` (a core module without WASI) to the native host functions."""
        compiled.native_pre = link(self.linker, compiled.module)
        compiled.native_pre_addr = _raw.addr(compiled.native_pre)
        # Its host functions write to this runner's C state: no other runner may run it.
        compiled.native_owner = self

    @staticmethod
    def plan(compiled: CompiledModule, kind: EntryKind, index: int) -> tuple[Any, int]:
        """The C plan of `compiled`'s entry `index` and its address (cached on the module)."""
        plans = compiled.native_plans
        if plans is None:
            plans = compiled.native_plans = {}
        found = plans.get(index)
        if found is not None:
            return found
        plan = _Plan(
            pre=compiled.native_pre_addr,
            memory_index=-1 if compiled.memory_index is None else compiled.memory_index,
            alloc_index=-1 if compiled.alloc_index is None else compiled.alloc_index,
            initialize_index=(-1 if compiled.initialize_index is None
                              else compiled.initialize_index),
            entry_index=index, kind=int(kind), verify=0)
        plans[index] = (plan, ctypes.addressof(plan))
        return plans[index]

    def limits(self, lim: Limits, deadline_ticks: int, precise_timeout_ns: int) -> int:
        """The address of a C copy of `lim`, cached in `limits_cache` by identity (Limits
        are frozen and the worker reuses them; the hot path looks the cache up itself)."""
        if len(self.limits_cache) >= 256:
            self.limits_cache.clear()
        struct = _Limits(memory_bytes=lim.memory_bytes, fuel=lim.fuel,
                         output_cap=lim.output_bytes, log_cap=lim.log_bytes,
                         deadline_ticks=deadline_ticks, precise_timeout_ns=precise_timeout_ns)
        address = ctypes.addressof(struct)
        self.limits_cache[id(lim)] = (lim, address, struct)
        return address

    def output(self, kept: bool = False) -> bytes:
        """The output of the last execution (empty when it went to the sink); `kept`: the
        status said Python holds its first pieces (HostState.output)."""
        if kept:
            pieces = self._state.output
            self._state.output = []
            tail = self.output()
            if tail:
                pieces.append(tail)
            # One piece (a single large host.output) is returned as it is: joining it with an
            # empty tail would copy it once more (16 MiB: +3.5 ms, +800 page faults).
            return pieces[0] if len(pieces) == 1 else b"".join(pieces)
        r = self.results
        n = r.out_len
        if not n:
            return b""
        address = r.out_buf
        if address != self._view_addr or n > len(self._view):
            capacity = r.out_capacity
            self._view = memoryview((ctypes.c_ubyte * capacity).from_address(address)).cast("B")
            self._view_addr = address
        return self._view[:n].tobytes()

    def logs(self) -> list[str]:
        r = self.results
        if not r.log_count:
            return []
        buf = ctypes.string_at(r.log_buf, r.log_used)
        logs: list[str] = []
        pos = 0
        while pos < len(buf):
            n = int.from_bytes(buf[pos:pos + 4], "little")
            logs.append(buf[pos + 4:pos + 4 + n].decode("utf-8", "replace"))
            pos += 4 + n
        return logs


def make_runner(engine: wasmtime.Engine, instance_addr: int, state: HostState,
                wanted: bool | None) -> NativeRunner | None:
    """A NativeRunner when the native path is wanted (None: unless WASMCORE_NATIVE=0) and
    the library passed its checks; else None (the ctypes path)."""
    if wanted is None:
        wanted = os.environ.get(DISABLE_ENV, "1") != "0"
    if not wanted:
        return None
    lib = library()
    if lib is None:
        return None
    return NativeRunner(lib, engine, instance_addr, state)
