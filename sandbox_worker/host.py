"""Host functions `host.log`, `host.output`, `host.call` and `host.call_result`, defined as
raw unchecked callbacks.

wasmtime-py's `Linker.define_func` routes every call through a generic trampoline that boxes
each argument in `Val` objects (several microseconds per call). Here the callbacks receive the
raw `wasmtime_val_raw_t` array address and read the two i32 arguments straight from it.

The callbacks are registered once per Linker, so they cannot be told which execution they
serve; they read the *current execution* from a `HostState` owned by the Sandbox. That is why
a Sandbox must be used from one thread at a time.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING, Any, Protocol

import wasmtime

from wasmcore.protocol.errors import InternalError, OutputLimit, WasmCoreError

from . import _raw

if TYPE_CHECKING:
    from .host_methods import HostMethods

_MEMORY_NAME = b"memory"


class HostState:
    """Mutable per-execution state shared by the host callbacks and the Sandbox.

    Reset at the start of every execution; never carries data from one execution to the next.
    """

    __slots__ = (
        "ctx",
        "has_memory",
        "memory_extern",
        "memory_extern_addr",
        "memory_addr",
        "output",
        "output_len",
        "output_cap",
        "sink",
        "sink_active",
        "logs",
        "log_len",
        "log_cap",
        "logs_truncated",
        "failure",
        "methods",
        "tenant",
        "call_result",
    )

    def __init__(self) -> None:
        self.ctx: int = 0
        self.has_memory = False
        # The current instance's exported memory, filled by wasmtime_instance_export_nth.
        self.memory_extern = _raw.ExternSlot()
        self.memory_extern_addr = self.memory_extern.addr
        # wasmtime_memory_t inside the extern's union: what memory_data/_size take.
        self.memory_addr = self.memory_extern.item_addr
        self.output: list[bytes] = []
        self.output_len = 0
        self.output_cap = 0
        self.sink: OutputSink | None = None
        self.sink_active = False
        self.logs: list[str] = []
        self.log_len = 0
        self.log_cap = 0
        self.logs_truncated = False
        # An error decided by the host (e.g. output cap) that explains the trap that follows.
        self.failure: WasmCoreError | None = None
        # What `host.call` reaches, and for whom (set by the Sandbox per execution).
        self.methods: HostMethods | None = None
        self.tenant = ""
        # The last host.call's response or error, until the next call or execution.
        self.call_result = b""

    def reset(self, ctx: int, output_cap: int, log_cap: int,
              sink: OutputSink | None = None) -> None:
        self.ctx = ctx
        self.has_memory = False
        self.output = []
        self.output_len = 0
        self.output_cap = output_cap
        self.sink = sink
        self.sink_active = False
        self.logs = []
        self.log_len = 0
        self.log_cap = log_cap
        self.logs_truncated = False
        self.failure = None
        self.call_result = b""

    def add_log(self, data: bytes) -> None:
        """Append one log line, truncating once the byte budget is spent (never failing)."""
        budget = self.log_cap - self.log_len
        if budget <= 0:
            self.logs_truncated = True
            return
        if len(data) > budget:
            data = data[:budget]
            self.logs_truncated = True
        self.log_len += len(data)
        if data.endswith(b"\n"):
            data = data[:-1]
        self.logs.append(data.decode("utf-8", "replace"))

    def _route_output(self, length: int, sink: OutputSink | None) -> bool | None:
        """Where `length` more bytes of output go: None past the output cap (OUTPUT_LIMIT is
        then the execution's failure), True into `sink` (once the output is large; what was
        buffered so far goes first), False kept in `output`."""
        if self.output_len + length > self.output_cap:
            if self.failure is None:
                self.failure = output_limit_error(self.output_cap)
            return None
        to_sink = sink is not None and (self.sink_active
                                        or self.output_len + length >= sink.threshold)
        if to_sink and not self.sink_active:
            for chunk in self.output:
                sink.write_bytes(chunk)  # type: ignore[union-attr]  # to_sink: a sink
            self.output = []
            self.sink_active = True
        self.output_len += length
        return to_sink

    def add_output(self, address: int, length: int, sink: OutputSink | None) -> bool:
        """Take `length` bytes at host `address` as output: into `sink` once the output is
        large (straight from guest memory, one copy), else kept. False past the output cap."""
        to_sink = self._route_output(length, sink)
        if to_sink is None:
            return False
        if to_sink:
            sink.write(address, length)  # type: ignore[union-attr]
        else:
            self.output.append(ctypes.string_at(address, length))
        return True

    def add_output_buffer(self, data: bytes | memoryview, sink: OutputSink | None) -> bool:
        """`add_output` for bytes the host holds (a component's output file, mapped)."""
        to_sink = self._route_output(len(data), sink)
        if to_sink is None:
            return False
        if to_sink:
            sink.write_bytes(data)  # type: ignore[union-attr,arg-type]  # os.write takes a view
        else:
            self.output.append(bytes(data))
        return True

    def add_log_stream(self, data: bytes) -> None:
        """Append a byte stream (WASI stderr) as lines, with the same budget as `add_log`."""
        for line in data.splitlines():
            self.add_log(line)

    def memory_size(self) -> int:
        if not self.has_memory:
            return 0
        return int(_raw.memory_data_size(self.ctx, self.memory_addr))

    def detach(self) -> None:
        """Forget the store: callbacks after this point must not touch freed memory."""
        self.ctx = 0
        self.has_memory = False


class InputSource(Protocol):
    """Where a large input comes from instead of bytes (a shared-memory segment, say)."""

    def __len__(self) -> int: ...

    def copy_to(self, address: int, length: int) -> None:
        """Write the first `length` bytes of the input at host `address` (guest memory)."""

    def read_all(self) -> bytes: ...


class OutputSink(Protocol):
    """Where a large output goes instead of memory (a shared-memory segment, say)."""

    threshold: int

    def write(self, address: int, length: int) -> None:
        """Copy `length` bytes at host `address` (guest memory, valid only now)."""

    def write_bytes(self, data: bytes) -> None: ...


def output_limit_error(cap: int) -> OutputLimit:
    return OutputLimit(f"plugin output exceeds the {cap}-byte limit", {"output_bytes": cap})


def copy_call_result(state: HostState, address: int, length: int) -> int:
    """host.call_result's work: the last call's response (or error) copied to host `address`,
    at most `length` bytes; returns how many."""
    body = state.call_result
    n = min(length, len(body))
    if n:
        ctypes.memmove(address, body, n)
    return n


def call_host_method(state: HostState, name: bytes, request: bytes) -> int:
    """host.call's work: run the method, keep its response (or error) for host.call_result;
    returns what the guest gets, the body's length (minus it for an error)."""
    methods = state.methods
    if methods is None:
        ok, body = False, b'{"error":{"code":"NOT_FOUND","message":"no host methods"}}'
    else:
        ok, body = methods.call(state.tenant, name.decode("utf-8", "replace"), request)
    state.call_result = body
    return len(body) if ok else -len(body)


def _trap(message: str) -> int:
    msg = message.encode()
    return int(_raw.trap_new(msg, len(msg)) or 0)


def make_host_callbacks(state: HostState) -> dict[str, Any]:
    """Build the raw `host.output` / `host.log` callbacks bound to `state`.

    The returned ctypes function objects must stay referenced for as long as the Linker that
    holds them is alive (the Sandbox keeps them).
    """
    u32_at = ctypes.c_uint32.from_address
    string_at = ctypes.string_at
    memory_data = _raw.memory_data
    memory_data_size = _raw.memory_data_size
    val_size = _raw.VAL_RAW_SIZE

    i64_at = ctypes.c_int64.from_address
    i32_at = ctypes.c_int32.from_address

    def locate(caller: int, args: int) -> tuple[int, int] | None:
        """(host address, length) of the guest bytes [ptr, ptr+len) named by the two i32
        arguments at `args`, or None when out of bounds / no memory. Valid only until the
        guest runs again."""
        ptr = u32_at(args).value
        length = u32_at(args + val_size).value
        ctx = state.ctx
        if not state.has_memory and not attach(caller):
            return None
        if ptr + length > memory_data_size(ctx, state.memory_addr):
            return None
        return memory_data(ctx, state.memory_addr) + ptr, length

    def attach(caller: int) -> bool:
        """Called before the host resolved exports (e.g. from a start function): ask the
        caller's instance for its memory."""
        if not state.ctx or not _raw.caller_export_get(
            caller, _MEMORY_NAME, len(_MEMORY_NAME), state.memory_extern_addr
        ):
            return False
        if not state.memory_extern.is_memory():
            return False
        state.has_memory = True
        return True

    def read_two(caller: int, args: int) -> tuple[bytes, bytes] | None:
        """The guest bytes named by two (ptr, len) pairs, with one look at the memory."""
        if not state.has_memory and not attach(caller):
            return None
        ctx, memory = state.ctx, state.memory_addr
        size = memory_data_size(ctx, memory)
        ptr1 = u32_at(args).value
        len1 = u32_at(args + val_size).value
        ptr2 = u32_at(args + 2 * val_size).value
        len2 = u32_at(args + 3 * val_size).value
        if ptr1 + len1 > size or ptr2 + len2 > size:
            return None
        base = memory_data(ctx, memory)
        return string_at(base + ptr1, len1), string_at(base + ptr2, len2)

    def read_args(caller: int, args: int) -> bytes | None:
        found = locate(caller, args)
        return None if found is None else string_at(found[0], found[1])

    def output(env: int, caller: int, args: int, nargs: int) -> int:
        try:
            found = locate(caller, args)
            if found is None:
                return _trap("host.output: pointer/length outside the plugin's memory")
            if not state.add_output(found[0], found[1], state.sink):
                return _trap("output limit exceeded")
            return 0
        except BaseException as exc:  # must never unwind into wasm
            state.failure = InternalError(f"host.output failed: {exc!r}")
            return _trap("host function failed")

    def log(env: int, caller: int, args: int, nargs: int) -> int:
        try:
            data = read_args(caller, args)
            if data is None:
                return _trap("host.log: pointer/length outside the plugin's memory")
            state.add_log(data)
            return 0
        except BaseException as exc:  # must never unwind into wasm
            state.failure = InternalError(f"host.log failed: {exc!r}")
            return _trap("host function failed")

    def call(env: int, caller: int, args: int, nargs: int) -> int:
        """host.call(name_ptr, name_len, req_ptr, req_len) -> i64: the response's length,
        or minus the error's length; either is then read with host.call_result."""
        try:
            found = read_two(caller, args)
            if found is None:
                return _trap("host.call: pointer/length outside the plugin's memory")
            i64_at(args).value = call_host_method(state, found[0], found[1])
            return 0
        except BaseException as exc:  # must never unwind into wasm
            state.failure = InternalError(f"host.call failed: {exc!r}")
            return _trap("host function failed")

    def call_result(env: int, caller: int, args: int, nargs: int) -> int:
        """host.call_result(dst_ptr, dst_len) -> i32: copies the last call's response (or
        error) there, at most dst_len bytes; returns how many."""
        try:
            found = locate(caller, args)
            if found is None:
                return _trap("host.call_result: pointer/length outside the plugin's memory")
            i32_at(args).value = copy_call_result(state, *found)
            return 0
        except BaseException as exc:  # must never unwind into wasm
            state.failure = InternalError(f"host.call_result failed: {exc!r}")
            return _trap("host function failed")

    return {
        "output": _raw.UNCHECKED_CALLBACK(output),
        "log": _raw.UNCHECKED_CALLBACK(log),
        "call": _raw.UNCHECKED_CALLBACK(call),
        "call_result": _raw.UNCHECKED_CALLBACK(call_result),
    }


def make_native_callbacks(state: HostState) -> dict[str, Any]:
    """What the native fast path (fastcall.c) calls back into Python for, as plain functions
    taking host addresses (the C side has checked them against guest memory). Each returns 0,
    or 1 after recording the failure in `state` (the guest then traps)."""
    string_at = ctypes.string_at
    i64_at = ctypes.c_int64.from_address
    i32_at = ctypes.c_int32.from_address

    def sink_write(address: int, length: int) -> int:
        try:
            sink = state.sink
            assert sink is not None
            if not state.sink_active:  # pieces `keep` took first: they come first
                for piece in state.output:
                    sink.write_bytes(piece)
                state.output = []
                state.sink_active = True
            sink.write(address, length)
            return 0
        except BaseException as exc:  # must never unwind into wasm
            state.failure = InternalError(f"host.output failed: {exc!r}")
            return 1

    def call(name: int, name_len: int, request: int, request_len: int, result: int) -> int:
        try:
            i64_at(result).value = call_host_method(
                state, string_at(name, name_len) if name_len else b"",
                string_at(request, request_len) if request_len else b"")
            return 0
        except BaseException as exc:  # must never unwind into wasm
            state.failure = InternalError(f"host.call failed: {exc!r}")
            return 1

    def call_result(target: int, length: int, copied: int) -> int:
        try:
            i32_at(copied).value = copy_call_result(state, target, length)
            return 0
        except BaseException as exc:  # must never unwind into wasm
            state.failure = InternalError(f"host.call_result failed: {exc!r}")
            return 1

    def keep(address: int, length: int) -> int:
        try:
            state.output.append(string_at(address, length))
            return 0
        except BaseException as exc:  # must never unwind into wasm
            state.failure = InternalError(f"host.output failed: {exc!r}")
            return 1

    return {"sink_write": sink_write, "call": call, "call_result": call_result, "keep": keep}


_I32 = wasmtime.ValType.i32()
HOST_FUNC_TYPES: dict[str, tuple[list[wasmtime.ValType], list[wasmtime.ValType]]] = {
    "output": ([_I32, _I32], []),
    "log": ([_I32, _I32], []),
    "call": ([_I32, _I32, _I32, _I32], [wasmtime.ValType.i64()]),
    "call_result": ([_I32, _I32], [_I32]),
}


def define_host_functions(linker: wasmtime.Linker, callbacks: dict[str, Any]) -> None:
    """Register the callbacks as `host.<name>` with their signatures (HOST_FUNC_TYPES)."""
    for name, callback in callbacks.items():
        func_type = wasmtime.FuncType(*HOST_FUNC_TYPES[name])
        _raw.define_func_unchecked(linker, b"host", name.encode(), func_type, callback)


HOST_IMPORTS = frozenset({("host", "log"), ("host", "output"), ("host", "call"),
                          ("host", "call_result")})
