"""WebAssembly components (WASI preview 2): the plugin world in wit/wasm-core.wit.

A component is its own kind of binary ("component"), told from a core module by its preamble
(version 0x0d, layer 1). It gets what a core module gets: compiled once (the serialized
component is the artifact every worker maps), a fresh store and instance per execution, the
same limits (timeout through the engine's epochs, fuel, memory per linear memory), metering,
logs, chains with any other kind. What differs is the calling convention: the component
exports `process(input: list<u8>, env: list<tuple<string, string>>) -> result<list<u8>,
string>` (or other functions of that type, named as entries) and imports
`wasm-core:plugin/host.log` and WASI preview 2, under the preview 1 policy (sandbox_worker/
wasi.py): the request's env and arguments, no network, stdout and stderr into the logs, and for
a component that imports wasi:filesystem a private size-capped scratch /tmp (the same Scratch,
ScratchDirs and ScratchWatch as a WASI p1 module) and the operator's read-only dirs.
"""

from __future__ import annotations

import errno
import os
import re
import time
from collections.abc import Callable

import wasmtime
from wasmtime import component as wc

from wasmcore.protocol.errors import (
    BadRequest,
    InternalError,
    InvalidModule,
    MemoryLimit,
    PayloadTooLarge,
    PluginError,
    Trap,
    WasmCoreError,
)
from wasmcore.protocol.limits import Limits, Metering

from . import _raw
from .file_entry import OUTPUT_PATH, FileExchange
from .host import HostState, InputSource, OutputSink, output_limit_error
from .outcome import ExecutionResult, from_trap_code, split_trap_message, with_metering
from .wasi import (
    Scratch,
    ScratchDirs,
    ScratchWatch,
    StderrSink,
    WasiFiles,
    make_wasi_config,
)

COMPONENT_VERSION = b"\x0d\x00\x01\x00"  # bytes 4-8 of a component: version 0x0d, layer 1
HOST_INTERFACE = "wasm-core:plugin/host@0.1.0"
# The entry shapes (wit/wasm-core.wit): bytes as values (convenient; wasmtime converts a
# list<u8> one element at a time), as the component's stdin and stdout (in bulk, stdout in
# 4-8 KiB pieces), or as its stdin and a file it writes in its scratch /tmp (in bulk).
BYTES_SIGNATURE = "(list<u8>, list<tuple<string, string>>) -> result<list<u8>, string>"
STREAM_SIGNATURE = "(list<tuple<string, string>>) -> result<_, string>"
FILE_SIGNATURE = "(string, list<tuple<string, string>>) -> result<_, string>"
_SHAPES = {BYTES_SIGNATURE: "bytes", STREAM_SIGNATURE: "stream", FILE_SIGNATURE: "file"}
DEFAULT_ENTRIES = ("process", "process-stream")  # tried in order when a call names none
# The largest input a bytes entry takes: a list<u8> value costs the host tens of bytes of
# memory per byte while wasmtime converts it (and 0.2-0.7 s per MiB), and wasmtime refuses
# (TRAP "too much data is being copied between the host and the guest") once a call's values
# in and out pass its hostcall budget, about 4 Mi elements. Larger inputs belong on a stream
# entry.
VALUES_MAX_BYTES = 1024 * 1024
# What the linker provides: the WASI preview 2 interfaces of add_wasip2 (not wasi:http) and our
# host interface. Anything else is refused at load rather than failing every execution.
_PROVIDED = re.compile(
    r"(wasi:(cli|io|clocks|random|filesystem|sockets)/[a-z0-9-]+@0\.2\.\d+"
    r"|wasm-core:plugin/host@0\.1\.\d+)")
_INTERRUPT = wasmtime.TrapCode.INTERRUPT.value
_OUT_OF_FUEL = wasmtime.TrapCode.OUT_OF_FUEL.value
# wasmtime reports a component's traps as errors whose text names the trap.
_TRAP_TEXTS = (("wasm trap: interrupt", _INTERRUPT), ("all fuel consumed", _OUT_OF_FUEL))
_OVER_MEMORY_LIMIT = "exceeds memory limits"
_FILESYSTEM = "wasi:filesystem/"  # a component that imports it can open files
# host.call: (method name, JSON request) -> (ok, JSON response or error), for the execution's
# tenant (HostMethods.call with the tenant bound by the Sandbox).
HostCall = Callable[[str, bytes], tuple[bool, bytes]]


def is_component(wasm: bytes | memoryview) -> bool:
    return bytes(wasm[:4]) == b"\0asm" and bytes(wasm[4:8]) == COMPONENT_VERSION


class CompiledComponent:
    """A compiled component and its entries; the same public face as CompiledModule."""

    __slots__ = ("sha256", "kind", "exports", "size", "module", "entries", "verified",
                 "opens_files")

    def __init__(self, sha256: str, size: int, component: wc.Component,
                 entries: dict[str, str], opens_files: bool = False) -> None:
        self.sha256 = sha256
        self.kind = "component"
        self.size = size
        self.module = component  # `module.serialize()` is the artifact, as for core modules
        self.entries = entries  # entry name -> shape, "bytes" or "stream"
        self.exports = list(entries)
        self.verified = True
        # Imports wasi:filesystem: gets /tmp and the operator's dirs (as `opens_files` of a
        # WASI p1 module that imports path_open); others get no directory at all.
        self.opens_files = opens_files

    def __repr__(self) -> str:
        return f"CompiledComponent(sha256={self.sha256[:12]}…, exports={self.exports!r})"


def describe(ty: object) -> str:
    """A component value type as WIT spells it (enough to compare signatures)."""
    if isinstance(ty, wc.ListType):
        return f"list<{describe(ty.element)}>"
    if isinstance(ty, wc.TupleType):
        return f"tuple<{', '.join(describe(t) for t in ty.elements)}>"
    if isinstance(ty, wc.ResultType):
        ok = describe(ty.ok) if ty.ok is not None else "_"
        err = describe(ty.err) if ty.err is not None else "_"
        return f"result<{ok}, {err}>"
    if ty is None:
        return "_"
    return type(ty).__name__.lower()


def _signature(func_type: wc.FuncType) -> str:
    params = ", ".join(describe(t) for _, t in func_type.params)
    result = func_type.result
    return f"({params})" + (f" -> {describe(result)}" if result is not None else "")


class ComponentRunner:
    """Compiles and runs components on the Sandbox's engine (its epoch ticker, its thread)."""

    def __init__(self, engine: wasmtime.Engine, deadline_ticks: Callable[[int], int],
                 scratch_dirs: ScratchDirs, scratch_watch: ScratchWatch,
                 host_call: HostCall) -> None:
        self._engine = engine
        self._host_call = host_call  # host.call: the Sandbox's host methods, its tenant
        # timeout in ms -> epoch ticks; the Sandbox's, which also remembers them so that its
        # scratch watch can stop this run through the epoch.
        self._deadline_ticks = deadline_ticks
        self._scratch_dirs = scratch_dirs
        self._scratch_watch = scratch_watch
        self._state = HostState()
        self._linker = wc.Linker(engine)
        self._linker.add_wasip2()
        with self._linker.root() as root, root.add_instance(HOST_INTERFACE) as host:
            host.add_func("log", self._log)
            host.add_func("call", self._call)
        self._stdout = _raw.STDOUT_CALLBACK(self._on_stdout)  # kept: stores call it
        self._sink: OutputSink | None = None

    def _on_stdout(self, _data: int, address: int, length: int) -> int:
        """A stream entry's output, straight from the guest's buffer: into the execution's
        output sink once large (one copy), else kept; refused past the output cap."""
        state = self._state
        try:
            if not state.add_output(address, length, self._sink):
                return -errno.EFBIG
            return length
        except BaseException as exc:  # must never unwind into wasm
            state.failure = InternalError(f"stdout failed: {exc!r}")
            return -errno.EIO

    def _log(self, _store: object, message: str) -> None:
        self._state.add_log(message.encode())

    def _call(self, _store: object, name: str, request: str) -> wc.Variant:
        """host.call: the method's JSON answer as ok, its JSON error as err."""
        try:
            ok, body = self._host_call(name, request.encode())
        except BaseException as exc:  # HostMethods.call never raises: a bug of ours
            self._state.failure = InternalError(f"host.call failed: {exc!r}")
            raise
        return wc.Variant("ok" if ok else "err", body.decode("utf-8", "replace"))

    # ------------------------------------------------------------------ compiling

    def compile(self, sha256: str, wasm: bytes) -> CompiledComponent:
        try:
            component = wc.Component(self._engine, wasm)
        except wasmtime.WasmtimeError as exc:
            raise InvalidModule(f"invalid WebAssembly component: {exc}",
                                {"reason": str(exc)}) from None
        return self._prepare(sha256, len(wasm), component)

    def load(self, path: str, sha256: str) -> CompiledComponent:
        try:
            component = wc.Component.deserialize_file(self._engine, path)
        except wasmtime.WasmtimeError as exc:
            raise InvalidModule(f"cannot load compiled artifact {path}: {exc}",
                                {"reason": str(exc)}) from None
        return self._prepare(sha256, os.path.getsize(path), component)

    def _prepare(self, sha256: str, size: int, component: wc.Component) -> CompiledComponent:
        ty = component.type
        imports = list(ty.imports(self._engine))
        missing = [name for name in imports if not _PROVIDED.fullmatch(name)]
        if missing:
            raise InvalidModule(
                f"component imports what the host does not provide: {', '.join(missing[:20])} "
                f"(available: {HOST_INTERFACE} and WASI 0.2: wasi:cli, io, clocks, random, "
                "filesystem, sockets); refused",
                {"missing_imports": missing},
            )
        entries: dict[str, str] = {}
        for name, extern in ty.exports(self._engine).items():
            item = extern.ty
            if isinstance(item, wc.FuncType) and _signature(item) in _SHAPES:
                entries[name] = _SHAPES[_signature(item)]
        if not entries:
            raise InvalidModule(
                "component exports no entry function: expected `process: func(input: list<u8>, "
                "env: list<tuple<string, string>>) -> result<list<u8>, string>` or "
                "`process-stream: func(env: list<tuple<string, string>>) -> result<_, string>` "
                "or `process-file: func(output-path: string, env: list<tuple<string, string>>) "
                "-> result<_, string>` (the worlds in wit/wasm-core.wit)"
            )
        opens_files = any(name.startswith(_FILESYSTEM) for name in imports)
        return CompiledComponent(sha256, size, component, entries, opens_files)

    # ------------------------------------------------------------------ executing

    def execute(self, cc: CompiledComponent, data: bytes | InputSource, env: dict[str, str],
                entry: str | None, lim: Limits,
                sink: OutputSink | None = None,
                files: WasiFiles | None = None) -> ExecutionResult:
        """One execution in a fresh store. `files`: arguments, and for a component that
        imports wasi:filesystem the scratch /tmp and the operator's dirs."""
        name = entry if entry is not None else next(
            (e for e in DEFAULT_ENTRIES if e in cc.entries), cc.exports[0])
        shape = cc.entries.get(name)
        if shape is None:
            raise BadRequest(
                f"component has no entry {name!r}; available: {', '.join(cc.exports)}",
                {"entry": name, "available": list(cc.exports)},
            )
        if shape == "bytes" and len(data) > VALUES_MAX_BYTES:
            raise PayloadTooLarge(
                f"an input of {len(data)} bytes is over the {VALUES_MAX_BYTES}-byte limit of a "
                f"component entry that takes its input as a list<u8> value ({name!r}); give the "
                "component a `process-stream` entry (input on stdin, output on stdout) and call "
                "that one (docs/plugin-abi.md, section 6)",
                {"input_bytes": len(data), "max_input_bytes": VALUES_MAX_BYTES, "entry": name})
        if shape == "bytes" and type(data) is not bytes:
            data = data.read_all()  # a list<u8> value is built from bytes
        through_files = shape == "file"
        if through_files and (files is None or not files.scratch_root or not cc.opens_files):
            raise BadRequest(
                f"the entry {name!r} writes its output to a file in the execution's scratch "
                "directory, which "
                + ("this component cannot open (it does not import wasi:filesystem)"
                   if not cc.opens_files else "this execution has none (no scratch root)")
                + "; call its `process-stream` entry instead",
                {"entry": name})
        pairs = [(key.encode(), value.encode()) for key, value in env.items()]
        state = self._state
        state.reset(0, lim.output_bytes, lim.log_bytes)
        stderr = StderrSink(state)
        failure: WasmCoreError | None = None
        output = b""
        fuel_left = 0
        scratch: Scratch | None = None
        exchange: FileExchange | None = None
        started = time.perf_counter_ns()
        store = wasmtime.Store(self._engine)
        try:
            store.set_limits(memory_size=lim.memory_bytes)
            store.set_fuel(lim.fuel)
            store.set_epoch_deadline(self._deadline_ticks(lim.timeout_ms))
            streams = shape == "stream"
            # A stream entry reads the input from stdin and writes its output to stdout
            # (bounded by the output cap as it writes); otherwise stdout goes to the logs.
            # A file entry reads stdin too, and writes its output to a file.
            if through_files and files is not None:
                # The output file is the host's transport, not the plugin's scratch space:
                # /tmp holds it on top of [wasi] scratch_mb (even when that is 0).
                scratch = Scratch(self._scratch_dirs, files.scratch_root,
                                  files.scratch_bytes + lim.output_bytes)
                exchange = FileExchange(scratch.path)
                self._scratch_watch.watch(scratch)
            elif (files is not None and files.scratch_bytes > 0 and files.scratch_root
                    and cc.opens_files):
                scratch = Scratch(self._scratch_dirs, files.scratch_root, files.scratch_bytes)
                self._scratch_watch.watch(scratch)
            config = make_wasi_config(state, env, b"" if shape == "bytes" else data, stderr,
                                      stdout_is_output=streams, files=files,
                                      scratch=scratch, map_dirs=cc.opens_files)
            if streams:
                self._sink = sink
                _raw.set_stdout_callback(config, self._stdout)
            store.set_wasi(config)
            try:
                instance = self._linker.instantiate(store, cc.module)
                func = instance.get_func(store, name)
                if func is None:
                    raise BadRequest(f"component has no function {name!r}", {"entry": name})
                ok, payload = _raw.call_component_func(
                    func, store, data if shape == "bytes" else None, pairs,
                    (OUTPUT_PATH.encode(),) if through_files else ())
            except _raw.ComponentCallFailed as failed:
                failure = _classify(_raw.take_error(failed.error), lim)
            except wasmtime.WasmtimeError as exc:
                failure = _classify(exc, lim)
            else:
                if not ok:
                    failure = _plugin_error(payload)
                elif streams:
                    output = b"".join(state.output)
                elif exchange is not None:
                    exchange.read_output(state, sink)
                    output = b"".join(state.output)
                else:
                    output = payload
                    if len(output) > lim.output_bytes:
                        failure = output_limit_error(lim.output_bytes)
            fuel_left = store.get_fuel()
        except WasmCoreError as exc:
            failure = exc
        finally:
            if scratch is not None:
                self._scratch_watch.unwatch()
            if state.failure is not None:
                failure = state.failure  # the host decided (output cap): it explains the rest
            over_output = False
            if exchange is not None:
                over_output = exchange.output_size() > lim.output_bytes
                exchange.close()
            self._sink = None
            stderr.flush()
            store.close()  # closes the component's files: its scratch can go
            if scratch is not None:
                # Over the cap: SCRATCH_LIMIT explains the rest (the watch stopped it).
                failure = scratch.finish() or failure
            if over_output:
                failure = output_limit_error(lim.output_bytes)  # not SCRATCH_LIMIT: as stdout does
        metering = Metering(
            fuel_consumed=max(0, lim.fuel - fuel_left),
            wall_time_us=(time.perf_counter_ns() - started) // 1000,
            peak_memory_bytes=0,  # a component's memories are not visible to the host
        )
        if failure is not None:
            raise with_metering(failure, metering, state.logs, state.logs_truncated)
        return ExecutionResult(output=output, logs=state.logs, metering=metering,
                               logs_truncated=state.logs_truncated,
                               output_in_sink=state.sink_active)


def _classify(error: wasmtime.WasmtimeError, lim: Limits) -> WasmCoreError:
    try:
        text = str(error)
    finally:
        error.close()
    for needle, code in _TRAP_TEXTS:
        if needle in text:
            limited = from_trap_code(code, lim.timeout_ms, lim.fuel)
            if limited is not None:
                return limited
    reason, backtrace = split_trap_message(text)
    if _OVER_MEMORY_LIMIT in text:
        # The component's memories start larger than the limit: it cannot even instantiate.
        return MemoryLimit(
            f"plugin needs more than the {lim.memory_bytes}-byte memory limit to start "
            f"({reason})", {"memory_bytes": lim.memory_bytes, "trap_message": reason})
    return Trap(reason, {"trap_code": None, "backtrace": backtrace})


def _plugin_error(message: bytes) -> WasmCoreError:
    text = message.decode("utf-8", "replace")
    return PluginError(f"plugin failed: {text}", {"plugin_message": text[:4096]})


