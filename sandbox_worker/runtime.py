"""The in-process sandbox runtime: compile plugins once, execute them in fresh stores, fast.

Public API: `SandboxConfig`, `CompiledModule`, `Sandbox`. The worker process wraps this.

Threading: a Sandbox is used from ONE thread at a time. The raw host callbacks read "the
current execution" from state owned by the Sandbox, and the preallocated call buffers are
shared by its executions. (Its epoch ticker, a POSIX timer or a daemon thread, only touches
the engine's epoch counter.) Use one Sandbox per thread if you need parallelism.

Isolation: every execution gets a new Store and a new instance (from a per-module
InstancePre); nothing survives from one execution to the next except the compiled code.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable

import wasmtime

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
from wasmcore.protocol.limits import WASM_PAGE, Limits, Metering
from wasmcore.protocol.settings import SandboxConfig

from . import _raw, fastcall
from .component import CompiledComponent, ComponentRunner, is_component
from .extism import ExtismHost, UserCall, UserKnown, is_extism
from .grow_probe import instrument
from .host import (
    HostState,
    InputSource,
    OutputSink,
    define_host_functions,
    make_host_callbacks,
    output_limit_error,
)
from .host_methods import HostMethods
from .module import (
    DEFAULT_ENTRY,
    CompiledModule,
    EntryKind,
    ModuleCache,
    analyze,
    check_imports,
    link,
    opens_files,
    precheck_imports,
)
from .outcome import (
    INTERRUPT,
    ExecutionResult,
    classify_error,
    classify_trap,
    from_trap_code,
    memory_at_cap,
    plugin_code_error,
    refused_grow_error,
    with_metering,
)
from .ticker import Ticker, start_ticker
from .wasi import (
    Scratch,
    ScratchDirs,
    ScratchWatch,
    StderrSink,
    WasiFiles,
    check_args,
    make_wasi_config,
)

__all__ = ["CompiledModule", "Sandbox", "SandboxConfig"]

# What compile returns: a core module (kinds "core", "wasi") or a component (component.py).
Compiled = CompiledModule | CompiledComponent

_WASM_MAGIC = b"\0asm"
_START = "_start"


class _Failed(Exception):
    """A raw call reported an error (owned wasmtime_error_t*) or a trap (owned wasm_trap_t*)."""

    def __init__(self, error: int, trap: int) -> None:
        super().__init__()
        self.error = error
        self.trap = trap


class Sandbox:
    """Compiles and runs plugins in-process under limits. Not thread-safe: one thread each."""

    def __init__(
        self,
        config: SandboxConfig = SandboxConfig(),  # noqa: B008
        methods: HostMethods | None = None,
        user_call: UserCall | None = None,
        user_known: UserKnown | None = None,
        native: bool | None = None,
    ) -> None:
        """`methods`: what plugins reach with `host.call` (none: every call is answered
        NOT_FOUND). `user_call(tenant, name, request) -> (ok, response)` resolves Extism
        plugins' `extism:host/user` imports; by default the same `methods` (an Extism user
        function is a host method of the same name; with no methods, every call answers
        NOT_FOUND, as `host.call` does). `user_known(name)`, if given, is asked at load: a
        name it denies is refused then (without it, any name links, since methods come and go
        with config reloads, and an unknown one fails when called). `native`: run core modules
        without WASI through the native fast path (fastcall.py) when its library loads; None
        means yes unless WASMCORE_NATIVE=0 is set, False keeps the ctypes path."""
        if user_call is None:
            user_call = methods.call if methods is not None else _no_host_methods
        self.config = config
        self._default_limits = config.default_limits
        self._engine = wasmtime.Engine(_engine_config(config))
        self._engine_addr = _raw.addr(self._engine)
        self._tick_ms = config.epoch_tick_ms

        # One linker for every module: host.* plus WASI preview 1.
        self._linker = wasmtime.Linker(self._engine)
        self._linker.define_wasi()
        self._state = HostState()
        self._state.methods = methods
        # The ctypes callback objects must outlive the linker: kept on the Sandbox.
        self._callbacks = make_host_callbacks(self._state)
        define_host_functions(self._linker, self._callbacks)
        # Extism plugins: their kernel, host functions and own linker.
        self._extism = ExtismHost(self._engine, self._state, _Failed, user_call, user_known)

        self._cache = ModuleCache(config.cache_size)
        self._closed = False
        self._component_runner: ComponentRunner | None = None  # made when first needed
        # Scratch directories over their cap stop their execution as a timeout does: the
        # epoch is pushed past the running store's deadline (only one store runs at a time).
        self._deadline_ticks = 0
        self._stop_requested = False  # set by the scratch watch; read by _deadline_reached
        self._scratch_watch = ScratchWatch(self._stop_running)
        self._scratch_dirs = ScratchDirs()

        # Preallocated out-parameters and the args/results array for raw calls. Reused by
        # every execution (single-threaded by contract), which avoids ~1 us of ctypes
        # allocations per call.
        self._instance = _raw.InstanceSlot()
        self._instance_addr = self._instance.addr
        self._trap = ctypes.c_void_p()
        self._trap_addr = ctypes.addressof(self._trap)
        self._probe_extern = _raw.ExternSlot()
        self._func_extern = _raw.ExternSlot()
        self._func_extern_addr = self._func_extern.addr
        self._func_addr = self._func_extern.item_addr
        self._name_ptr = ctypes.c_void_p()
        self._name_len = ctypes.c_size_t()
        self._name_ptr_addr = ctypes.addressof(self._name_ptr)
        self._name_len_addr = ctypes.addressof(self._name_len)
        self._fuel = ctypes.c_uint64()
        self._fuel_addr = ctypes.addressof(self._fuel)
        self._args = _raw.RawArgs(4)
        self._args_addr = self._args.addr
        self._i32 = self._args.i32
        self._u32_0 = self._args.u32_0
        self._export, self._call = self._make_call_helpers()
        self._native = fastcall.make_runner(self._engine, self._instance_addr, self._state,
                                            native)

        # Short timeouts: the epoch deadline callback checks the clock (see `_run`).
        self._deadline_ns = 0
        self._timed_out = False
        self._on_deadline = _raw.DEADLINE_CALLBACK(self._deadline_reached)
        self._precise_below_ms = _PRECISE_BELOW_TICKS * self._tick_ms

        self._ticker: Ticker = start_ticker(
            self._engine, config.epoch_tick_ms / 1000.0, config.native_ticker
        )

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Stop the ticker thread and drop compiled modules. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._ticker.stop()
        self._cache.clear()
        self._scratch_dirs.close()
        if self._native is not None:
            self._native.close()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        ticker = getattr(self, "_ticker", None)
        if ticker is not None:
            ticker.stop()

    def _stop_running(self) -> None:
        """From the scratch watch's thread: end the running execution at its next epoch
        check. Engine.increment_epoch is an atomic add, safe from any thread. A short
        timeout's deadline callback would let the run go on until its clock deadline: the
        flag tells it to stop now."""
        self._stop_requested = True
        for _ in range(self._deadline_ticks + 1):
            self._engine.increment_epoch()

    # ------------------------------------------------------------------ compiling

    def compile(self, wasm_or_wat: bytes) -> Compiled:
        """Validate, link and cache a module (binary, or WAT text) by the sha256 of its bytes."""
        self._check_open()
        data = bytes(wasm_or_wat)
        sha256 = hashlib.sha256(data).hexdigest()
        cached = self._cache.get(sha256)
        if cached is not None:
            return cached
        wasm = data if data.startswith(_WASM_MAGIC) else _wat_to_wasm(data)
        if is_component(wasm):
            component = self._components().compile(sha256, wasm)
            self._cache.put(component)
            return component
        precheck_imports(wasm)  # not a core module, or unlinkable: refused before compiling
        try:
            wasmtime.Module.validate(self._engine, wasm)
        except wasmtime.WasmtimeError as exc:
            reason = str(exc)
            message = f"invalid WebAssembly module: {reason}"
            raise InvalidModule(message, {"reason": reason}) from None
        module = _compile_with_probe(self._engine, wasm)
        compiled = self._prepare(sha256, len(data), module)
        self._cache.put(compiled)
        return compiled

    def serialize(self, module: Compiled, path: str | os.PathLike[str]) -> None:
        """Write the compiled code to `path` atomically (temp file in the same dir + rename)."""
        blob = module.module.serialize()
        target = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(target))
        fd, tmp = tempfile.mkstemp(prefix=".sandbox-", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(blob)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    def load_serialized(self, path: str | os.PathLike[str], sha256: str) -> Compiled:
        """Load an artifact written by `serialize` (trusted input: it is native code).

        Cached under `sha256` (the hash of the original module bytes). `size` is the artifact's
        size, the original bytes being unknown here.
        """
        self._check_open()
        cached = self._cache.get(sha256)
        if cached is not None:
            return cached
        target = os.fspath(path)
        try:
            module = wasmtime.Module.deserialize_file(self._engine, target)
        except wasmtime.WasmtimeError as exc:
            # The artifact of a component? (Telling costs a failed header check, ~0.2 ms.)
            try:
                component = self._components().load(target, sha256)
            except InvalidModule:
                component = None
            if component is not None:
                self._cache.put(component)
                return component
            raise InvalidModule(
                f"cannot load compiled artifact {target}: {exc}", {"reason": str(exc)}
            ) from None
        compiled = self._prepare(sha256, os.path.getsize(target), module)
        self._cache.put(compiled)
        return compiled

    def _components(self) -> ComponentRunner:
        if self._component_runner is None:
            self._component_runner = ComponentRunner(
                self._engine, self._component_deadline, self._scratch_dirs,
                self._scratch_watch, self._component_host_call)
        return self._component_runner

    def _component_host_call(self, name: str, request: bytes) -> tuple[bool, bytes]:
        """A component's host.call: the host methods `host.call` of a core module reaches,
        for the running execution's tenant."""
        methods = self._state.methods
        if methods is None:
            return _no_host_methods(self._state.tenant, name, request)
        return methods.call(self._state.tenant, name, request)

    def _component_deadline(self, timeout_ms: int) -> int:
        """A component's epoch deadline in ticks, remembered (as `_run` does) for the scratch
        watch, which stops an execution by pushing the epoch past it."""
        self._stop_requested = False
        self._deadline_ticks = deadline_ticks(timeout_ms, self._tick_ms)
        return self._deadline_ticks

    def cached(self, sha256: str) -> Compiled | None:
        """The module compiled or loaded under `sha256`, if the cache still holds it."""
        return self._cache.get(sha256)

    def forget(self, sha256: str) -> None:
        """Drop a module from the cache (it was unloaded); running it again compiles it again."""
        self._cache.discard(sha256)

    def _prepare(self, sha256: str, size: int, module: wasmtime.Module) -> CompiledModule:
        needs_wasi = check_imports(module)
        pre: wasmtime.InstancePre | None = None
        if is_extism(module):
            self._extism.prepare(module)  # linked per execution, to that store's kernel
            link(self._extism.check_linker, module)  # every import checked now, at load
        else:
            pre = link(self._linker, module)
        compiled = CompiledModule(sha256, size, module, pre)
        compiled.needs_wasi = needs_wasi
        compiled.opens_files = needs_wasi and opens_files(module)
        analyze(compiled)
        if self._native is not None and compiled.kind == "core" and not needs_wasi:
            self._native.prepare(compiled)
        return compiled

    # ------------------------------------------------------------------ executing

    def execute(
        self,
        module: Compiled,
        input: bytes | InputSource,
        *,
        env: dict[str, str] | None = None,
        entry: str | None = None,
        limits: Limits | None = None,
        output_sink: OutputSink | None = None,
        tenant: str = "",
        files: WasiFiles | None = None,
    ) -> ExecutionResult:
        """Run one execution in a fresh store. Raises a WasmCoreError subclass on failure;
        every error's details carry the metering so far and the logs produced so far.
        `tenant`: whose execution it is, for host methods (their allow lists, kv.* scope),
        also those an Extism plugin calls as user functions. `files`: arguments and
        directories for a module that imports WASI, or a component."""
        self._check_open()
        self._state.tenant = tenant
        if type(input) is not bytes and not hasattr(input, "copy_to"):
            input = bytes(input)  # any other buffer; an InputSource copies itself in place
        if isinstance(module, CompiledComponent):
            return self._run_component(module, input, env or {}, entry, limits, output_sink,
                                       files)
        lim = limits if limits is not None else self._default_limits
        name = entry if entry is not None else (_START if module.kind == "wasi" else DEFAULT_ENTRY)
        if entry is None and module.kind == "extism" and len(module.exports) == 1:
            name = module.exports[0]  # a one-function plugin needs no entry name
        # A WASI command's `_start`: stdin is the input, stdout the output. Any other entry
        # (a command may export `process` too) follows the core ABI.
        command = module.kind == "wasi" and name == _START
        if command and type(input) is not bytes:
            input = input.read_all()  # the WASI stdin copy takes bytes
        if files is not None and files.args:
            if not module.needs_wasi:
                raise with_metering(BadRequest(
                    "this module does not import WASI, so it cannot receive arguments: "
                    "send them in the input or env instead, or build it for wasm32-wasi",
                    {"args": len(files.args)}))
            check_args(files.args)
        spec = module.entries.get(name)
        if spec is None:
            raise with_metering(
                BadRequest(
                    f"module has no entry {name!r}; available: {', '.join(module.exports)}",
                    {"entry": name, "available": list(module.exports)},
                )
            )
        kind, index = spec
        env = env or {}
        env_bytes = b""
        if kind is EntryKind.ABI:
            env_bytes = encode_env(env) if env else b""
            if (input or env_bytes) and module.alloc_index is None:
                raise with_metering(
                    BadRequest(
                        "this module cannot receive input or env: it exports no "
                        "`memory`/`alloc` (call one of its no-argument entries)",
                        {"available": list(module.exports)},
                    )
                )
            needed = len(input) + len(env_bytes) + module.min_memory_bytes
            if needed > lim.memory_bytes:
                raise with_metering(_too_big(len(input) + len(env_bytes), lim))
        elif command:
            encode_env(env)  # validation only: WASI gets the pairs
        elif module.kind == "extism":
            encode_env(env)  # validation only: the pairs are the plugin's config
            if len(input) + WASM_PAGE > lim.memory_bytes:
                raise with_metering(_too_big(len(input), lim))
        elif len(input) or env:
            raise with_metering(_no_arguments(module, name))
        if module.min_memory_bytes > lim.memory_bytes:
            raise with_metering(
                MemoryLimit(
                    f"module needs {module.min_memory_bytes} bytes of memory at start, "
                    f"over the {lim.memory_bytes}-byte limit",
                    {"memory_bytes": lim.memory_bytes},
                )
            )
        return self._run(module, kind, index, input, env_bytes, env, lim, output_sink,
                         tenant, command, files)

    def _run_component(
        self,
        component: CompiledComponent,
        input: bytes | InputSource,
        env: dict[str, str],
        entry: str | None,
        limits: Limits | None,
        sink: OutputSink | None,
        files: WasiFiles | None = None,
    ) -> ExecutionResult:
        try:
            encode_env(env)  # the same rules for env entries as every other kind
            if files is not None:
                check_args(files.args)  # every component has WASI: it can take arguments
            data = input  # an InputSource is read where it goes (stdin, or a list<u8>)
        except BadRequest as exc:
            raise with_metering(exc) from None
        lim = limits if limits is not None else self._default_limits
        try:
            return self._components().execute(component, data, env, entry, lim, sink, files)
        except (BadRequest, PayloadTooLarge) as exc:
            if "logs" not in exc.details:  # refused before anything ran
                with_metering(exc)
            raise

    def _run(
        self,
        cm: CompiledModule,
        kind: EntryKind,
        index: int,
        data: bytes | InputSource,
        env_bytes: bytes,
        env: dict[str, str],
        lim: Limits,
        sink: OutputSink | None = None,
        tenant: str = "",
        command: bool = False,
        files: WasiFiles | None = None,
    ) -> ExecutionResult:
        native = self._native
        if native is not None and cm.native_owner is native and type(data) is bytes:
            return self._run_native(native, cm, kind, index, data, env_bytes, lim, sink)
        raw = _raw
        state = self._state
        i32 = self._i32
        trap = self._trap
        trap.value = None
        stderr: StderrSink | None = None
        scratch: Scratch | None = None
        failure: WasmCoreError | None = None
        instantiated = False
        fuel_left = 0
        memory_size = 0

        started = time.perf_counter_ns()
        store = raw.store_new(self._engine_addr, None, None)
        ctx = raw.store_context(store)
        state.reset(ctx, lim.output_bytes, lim.log_bytes, sink)
        try:
            raw.store_limiter(store, lim.memory_bytes, -1, -1, -1, -1)
            raw.context_set_fuel(ctx, lim.fuel)
            self._timed_out = False
            self._stop_requested = False
            if lim.timeout_ms < self._precise_below_ms:
                # A short timeout: deadline at the first tick at or after it, by the clock
                # (the tick count alone could stop it up to two ticks late).
                self._deadline_ns = started + lim.timeout_ms * 1_000_000
                raw.store_epoch_deadline_callback(store, self._on_deadline, None, None)
                self._deadline_ticks = max(1, math.ceil(lim.timeout_ms / self._tick_ms))
            else:
                # +1: the first tick may come right after this call; never time out early.
                self._deadline_ticks = deadline_ticks(lim.timeout_ms, self._tick_ms)
            raw.context_set_epoch_deadline(ctx, self._deadline_ticks)
            if cm.kind == "wasi" or cm.needs_wasi:
                stderr = StderrSink(state)
                if (files is not None and files.scratch_bytes > 0 and files.scratch_root
                        and cm.opens_files):
                    scratch = Scratch(self._scratch_dirs, files.scratch_root,
                                      files.scratch_bytes)
                    self._scratch_watch.watch(scratch)
                self._install_wasi(ctx, cm, state, env, data, stderr, command, files, scratch)

            if cm.kind == "extism":
                self._extism.instantiate(ctx, cm.module_addr, data, env, tenant, lim,
                                         self._instance_addr, self._trap_addr)
            else:
                error = raw.instance_pre_instantiate(
                    cm.pre_addr, ctx, self._instance_addr, self._trap_addr
                )
                if error or trap.value:
                    raise _Failed(error or 0, trap.value or 0)
            instantiated = True
            if not cm.verified:
                self._verify_exports(ctx, cm)
            if cm.memory_index is not None:
                self._export(ctx, cm.memory_index, state.memory_extern_addr)
                state.has_memory = True
            if cm.initialize_index is not None:
                self._call(ctx, cm.initialize_index, 0)

            if kind is EntryKind.ABI:
                in_ptr = self._place(ctx, cm, data, lim) if data else 0
                env_ptr = self._place(ctx, cm, env_bytes, lim) if env_bytes else 0
                i32[0].value = in_ptr
                i32[1].value = len(data)
                i32[2].value = env_ptr
                i32[3].value = len(env_bytes)
                self._call(ctx, index, 4)
                code = i32[0].value
            elif kind is EntryKind.STATUS:
                self._call(ctx, index, 1)
                code = i32[0].value
            else:
                self._call(ctx, index, 0)
                code = 0
            if cm.kind == "extism":
                failure = self._extism.finish(code, lim, sink)
            elif code:
                failure = plugin_code_error(code, lim, state.memory_size())
        except _Failed as failed:
            failure = self._classify(failed, lim)
            if self._timed_out:  # the deadline callback stopped it
                failure = from_trap_code(INTERRUPT, lim.timeout_ms, lim.fuel)
        except WasmCoreError as exc:
            failure = exc
        finally:
            if scratch is not None:
                self._scratch_watch.unwatch()
            failure = self._settled(failure, ctx, cm, lim, instantiated)
            raw.context_get_fuel(ctx, self._fuel_addr)
            fuel_left = self._fuel.value
            memory_size = state.memory_size()
            if cm.kind == "extism":
                memory_size += self._extism.memory_size()  # input, output and blocks
            if stderr is not None:
                stderr.flush()
            state.detach()
            if cm.kind == "extism":
                self._extism.detach()
            raw.store_delete(store)  # closes the module's files: its scratch can go
            if scratch is not None:
                failure = scratch.finish() or failure
        metering = Metering(
            fuel_consumed=max(0, lim.fuel - fuel_left),
            wall_time_us=(time.perf_counter_ns() - started) // 1000,
            peak_memory_bytes=memory_size,
        )
        if failure is not None:
            raise with_metering(failure, metering, state.logs, state.logs_truncated)
        return ExecutionResult(
            output=b"".join(state.output),
            logs=state.logs,
            metering=metering,
            logs_truncated=state.logs_truncated,
            output_in_sink=state.sink_active,
        )

    def _run_native(
        self,
        native: fastcall.NativeRunner,
        cm: CompiledModule,
        kind: EntryKind,
        index: int,
        data: bytes,
        env_bytes: bytes,
        lim: Limits,
        sink: OutputSink | None,
    ) -> ExecutionResult:
        """`_run` for a core module without WASI, in one native call (fastcall.py). The same
        guarantees: a fresh store, fuel, the epoch deadline (the clock for short timeouts),
        the memory limit, the output and log caps; failures come back with the store alive
        and are classified here exactly as `_run` does."""
        state = self._state
        state.failure = None
        if state.call_result:
            state.call_result = b""
        state.sink = sink
        state.sink_active = False
        if state.output:  # pieces of a large output (host.make_native_callbacks' `keep`)
            state.output = []
        found = native.limits_cache.get(id(lim))
        if found is not None and found[0] is lim:
            limits = found[1]
        else:
            timeout_ms = lim.timeout_ms
            if timeout_ms < self._precise_below_ms:  # the clock decides, as in `_run`
                ticks = max(1, math.ceil(timeout_ms / self._tick_ms))
                limits = native.limits(lim, ticks, timeout_ms * 1_000_000)
            else:
                limits = native.limits(lim, deadline_ticks(timeout_ms, self._tick_ms), -1)
        plan, plan_addr = native.plan(cm, kind, index)
        verify = not cm.verified
        if verify:
            plan.verify = 1
        started = time.perf_counter_ns()
        status = native.execute(native.state, plan_addr, limits, data, len(data), env_bytes,
                                len(env_bytes),
                                sink.threshold if sink is not None else fastcall.NO_SINK)
        if status == fastcall.VERIFY:  # the module's first execution: check export indices
            plan.verify = 0
            try:
                self._verify_exports(native.results.ctx or 0, cm)
            except WasmCoreError as exc:
                return self._native_failed(native, cm, status, lim, started, exc)
            status = native.resume(native.state, plan_addr, data, len(data), env_bytes,
                                   len(env_bytes))
        if not status & fastcall.STATUS_BITS:  # OK, with flags
            r = native.results
            return ExecutionResult(
                output=native.output(bool(status & fastcall.OK_KEPT)),
                logs=native.logs() if status & fastcall.OK_LOGS else [],
                metering=Metering(
                    fuel_consumed=max(0, lim.fuel - r.fuel_left),
                    wall_time_us=(time.perf_counter_ns() - started) // 1000,
                    peak_memory_bytes=r.memory_size,
                ),
                logs_truncated=bool(status & fastcall.OK_TRUNCATED),
                output_in_sink=bool(status & fastcall.OK_SINK),
            )
        return self._native_failed(native, cm, status, lim, started)

    def _native_failed(self, native: fastcall.NativeRunner, cm: CompiledModule, status: int,
                       lim: Limits, started: int,
                       failure: WasmCoreError | None = None) -> ExecutionResult:
        """The end of a native execution that did not simply succeed (its store is still
        alive): the failure classified as `_run` classifies it, the metering, the store
        deleted. `failure`: one already decided here (the export check)."""
        state = self._state
        r = native.results
        store, ctx = r.store or 0, r.ctx or 0
        state.ctx = ctx
        state.has_memory = bool(r.has_memory)  # the C side filled state.memory_extern
        stage = r.stage
        instantiated = status != fastcall.FAILED or stage not in (
            fastcall.STAGE_SETUP, fastcall.STAGE_INSTANTIATE)
        try:
            if failure is not None:
                pass
            elif status == fastcall.CODE:
                failure = plugin_code_error(r.code, lim, state.memory_size())
            elif stage == fastcall.STAGE_EXPORT:
                failure = InternalError(f"export #{r.missing_index} missing from the instance")
            else:
                failed = _Failed(r.error or 0, r.trap or 0)
                if stage in fastcall.ALLOC_STAGES:
                    n = r.alloc_len
                    if state.memory_size() + n > lim.memory_bytes:
                        self._discard(failed)
                        raise _too_big(n, lim)
                elif stage in fastcall.PLACE_STAGES:
                    n, ptr, size = r.alloc_len, r.alloc_ptr, state.memory_size()
                    if memory_at_cap(size, lim) or size + n > lim.memory_bytes:
                        raise _too_big(n, lim)
                    raise Trap(
                        f"alloc({n}) returned {ptr:#x}, outside the plugin's memory",
                        {"trap_code": None},
                    )
                raise failed
        except _Failed as failed:
            failure = self._classify(failed, lim)
            if r.timed_out:  # the deadline callback stopped it
                failure = from_trap_code(INTERRUPT, lim.timeout_ms, lim.fuel)
        except WasmCoreError as exc:
            failure = exc
        finally:
            if r.output_limit and state.failure is None:
                state.failure = output_limit_error(lim.output_bytes)
            failure = self._settled(failure, ctx, cm, lim, instantiated)
            _raw.context_get_fuel(ctx, self._fuel_addr)
            fuel_left = self._fuel.value
            memory_size = state.memory_size()
            state.detach()
            _raw.store_delete(store)
        metering = Metering(fuel_consumed=max(0, lim.fuel - fuel_left),
                            wall_time_us=(time.perf_counter_ns() - started) // 1000,
                            peak_memory_bytes=memory_size)
        if failure is None:  # nothing failed after all (as `_run` would report it)
            return ExecutionResult(
                output=native.output(bool(r.kept)), logs=native.logs(), metering=metering,
                logs_truncated=bool(r.logs_truncated), output_in_sink=bool(r.sink_active))
        raise with_metering(failure, metering, native.logs(), bool(r.logs_truncated))

    # ------------------------------------------------------------------ raw helpers

    def _make_call_helpers(
        self,
    ) -> tuple[Callable[[int, int, int], None], Callable[[int, int, int], None]]:
        """`export(ctx, index, out_extern_addr)` and `call(ctx, index, nargs)` as closures.

        Why closures: everything they use is bound once in cells, so the hot path pays no
        attribute lookups or bound-method creation (~0.3 us per call saved at this scale).
        `call` looks up function export `index` and calls it with the arguments already in
        the shared args array; a trap or error raises _Failed with the owned pointer.
        """
        export_nth = _raw.instance_export_nth
        func_call = _raw.func_call_unchecked
        instance = self._instance_addr
        name_ptr, name_len = self._name_ptr_addr, self._name_len_addr
        func_extern, func = self._func_extern_addr, self._func_addr
        args = self._args_addr
        trap, trap_addr = self._trap, self._trap_addr

        def export(ctx: int, index: int, out_addr: int) -> None:
            if not export_nth(ctx, instance, index, name_ptr, name_len, out_addr):
                raise InternalError(f"export #{index} missing from the instance")

        def call(ctx: int, index: int, nargs: int) -> None:
            if not export_nth(ctx, instance, index, name_ptr, name_len, func_extern):
                raise InternalError(f"export #{index} missing from the instance")
            error = func_call(ctx, func, args, nargs, trap_addr)
            if error or trap.value:
                raise _Failed(error or 0, trap.value or 0)

        return export, call

    def _verify_exports(self, ctx: int, cm: CompiledModule) -> None:
        """Once per module: the instance's export order must be the module's (the hot path
        addresses exports by index). Cheap insurance against a wasmtime behaviour change."""
        extern = _raw.ExternSlot()
        # Only the indices the hot path uses: listing every export's type again would cost
        # seconds for modules with thousands of exports.
        for i, name in cm.index_names.items():
            self._export(ctx, i, extern.addr)
            got = ctypes.string_at(self._name_ptr.value or 0, self._name_len.value)
            if got != name.encode():
                raise InternalError(f"export #{i} is {got!r}, expected {name!r}")
        cm.verified = True

    def _place(self, ctx: int, cm: CompiledModule, data: bytes | InputSource,
               lim: Limits) -> int:
        """alloc(len) in the guest, then copy `data` there; returns the guest pointer."""
        assert cm.alloc_index is not None
        state = self._state
        n = len(data)
        self._i32[0].value = n
        try:
            self._call(ctx, cm.alloc_index, 1)
        except _Failed as failed:
            if state.memory_size() + n > lim.memory_bytes:
                self._discard(failed)
                raise _too_big(n, lim) from None
            raise
        ptr = self._u32_0.value
        size = state.memory_size()
        if ptr + n > size:
            if memory_at_cap(size, lim) or size + n > lim.memory_bytes:
                raise _too_big(n, lim)
            raise Trap(
                f"alloc({n}) returned {ptr:#x}, outside the plugin's memory",
                {"trap_code": None},
            )
        target = _raw.memory_data(ctx, state.memory_addr) + ptr
        if type(data) is bytes:
            ctypes.memmove(target, data, n)
        else:
            data.copy_to(target, n)  # e.g. read from a segment straight into guest memory
        return ptr

    def _install_wasi(
        self,
        ctx: int,
        cm: CompiledModule,
        state: HostState,
        env: dict[str, str],
        data: bytes,
        stderr: StderrSink,
        is_command: bool,
        files: WasiFiles | None,
        scratch: Scratch | None,
    ) -> None:
        config = make_wasi_config(
            state,
            env if is_command else {},
            data if is_command else b"",
            stderr,
            stdout_is_output=is_command,
            files=files,
            scratch=scratch,
            map_dirs=cm.opens_files,
        )
        # The store takes ownership of the config (and frees it with the store).
        error = _raw.give_wasi_config(ctx, config)
        if error:
            raise _Failed(error, 0)

    def _classify(self, failed: _Failed, lim: Limits) -> WasmCoreError | None:
        """Map (and free) what a raw call reported; None = success (WASI `exit(0)`)."""
        memory_size = self._state.memory_size()
        if failed.trap:
            if failed.error:  # never both in practice; free it anyway
                _raw.take_error(failed.error).close()
            trap = _raw.take_trap(failed.trap)
            try:
                return classify_trap(trap, lim, memory_size)
            finally:
                trap.close()
        error = _raw.take_error(failed.error)
        try:
            return classify_error(error, lim, memory_size)
        finally:
            error.close()

    def _deadline_reached(self, ctx: int, data: int, delta: int, kind: int) -> int:
        """The epoch deadline callback of a short timeout: stop (an error the call fails
        with; `_run` reports TIMEOUT) once the clock has reached the deadline, else wait one
        more tick."""
        if self._stop_requested:  # the scratch watch: its SCRATCH_LIMIT is the answer
            return _raw.error_new(b"execution stopped: scratch directory over its cap") or 0
        if time.perf_counter_ns() >= self._deadline_ns:
            self._timed_out = True
            return _raw.error_new(b"execution exceeded its time limit") or 0
        ctypes.c_uint64.from_address(delta).value = 1
        ctypes.c_uint8.from_address(kind).value = _raw.UPDATE_DEADLINE_CONTINUE
        return 0

    def _settled(self, failure: WasmCoreError | None, ctx: int, cm: CompiledModule,
                 lim: Limits, instantiated: bool) -> WasmCoreError | None:
        """What the execution failed with, all said (both paths, its store still alive): a
        failure the host decided (the output cap) explains whatever happened next; a trap or
        failure after a grow the memory limit refused is MEMORY_LIMIT."""
        if self._state.failure is not None:
            return self._state.failure
        if (failure is not None and instantiated and cm.probe_index is not None
                and isinstance(failure, _AFTER_REFUSED_GROW)):
            return self._refused_grow(ctx, cm, lim, failure)
        return failure

    def _refused_grow(self, ctx: int, cm: CompiledModule, lim: Limits,
                      failure: WasmCoreError) -> WasmCoreError:
        """MEMORY_LIMIT instead of `failure` when the grow probe saw a grow the memory limit
        refused during this execution (the plugin failed after it); else `failure`."""
        assert cm.probe_index is not None
        extern = self._probe_extern
        self._export(ctx, cm.probe_index, extern.addr)
        pages = _raw.global_i32(ctx, extern) & 0xFFFFFFFF
        size = self._state.memory_size()
        return refused_grow_error(failure, pages, size, lim) or failure

    @staticmethod
    def _discard(failed: _Failed) -> None:
        if failed.trap:
            _raw.take_trap(failed.trap).close()
        if failed.error:
            _raw.take_error(failed.error).close()

    def _check_open(self) -> None:
        if self._closed:
            raise InternalError("sandbox is closed")


# Timeouts shorter than this many ticks are stopped by the clock, within one tick after they
# are due (an epoch deadline callback, set only for them: a C call per execution saved for
# the usual long timeouts, where a tick more or less does not matter).
_PRECISE_BELOW_TICKS = 10

# Failures that a grow refused by the memory limit earlier in the execution explains: a trap
# (an allocator's __builtin_trap or unreachable), a non-zero status, a failure at the cap.
_AFTER_REFUSED_GROW = (Trap, PluginError, MemoryLimit)


def _compile_with_probe(engine: wasmtime.Engine, wasm: bytes) -> wasmtime.Module:
    """The module compiled with the grow probe (grow_probe.py) when it can be added, else as
    it is (the probe is an aid to diagnosis: never a reason to refuse a valid module)."""
    probed = instrument(wasm)
    if probed is not None:
        try:
            return wasmtime.Module(engine, probed)
        except wasmtime.WasmtimeError:
            pass
    try:
        return wasmtime.Module(engine, wasm)
    except wasmtime.WasmtimeError as exc:
        reason = str(exc)
        raise InvalidModule(f"invalid WebAssembly module: {reason}", {"reason": reason}) from None


def deadline_ticks(timeout_ms: int, tick_ms: float) -> int:
    """Epoch ticks for a timeout: rounded up, plus one because the current tick is already
    partly gone, so a timeout never fires early on a ticker that keeps time."""
    return math.ceil(timeout_ms / tick_ms) + 1


def _engine_config(config: SandboxConfig) -> wasmtime.Config:
    engine_config = wasmtime.Config()
    engine_config.epoch_interruption = True
    engine_config.consume_fuel = True
    engine_config.max_wasm_stack = config.max_wasm_stack
    if config.pool_slots > 0:
        most = max(config.max_memory_bytes, config.default_limits.memory_bytes)
        max_memory = -(-most // WASM_PAGE) * WASM_PAGE
        _raw.enable_pooling(
            engine_config, config.pool_slots, max_memory, config.keep_resident_bytes
        )
    return engine_config


def _wat_to_wasm(data: bytes) -> bytes:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        # Not text either: precheck_imports says it is not a WebAssembly module.
        return data
    try:
        return bytes(wasmtime.wat2wasm(text))
    except wasmtime.WasmtimeError as exc:
        raise InvalidModule(f"invalid WAT text: {exc}", {"reason": str(exc)}) from None


def encode_env(env: dict[str, str]) -> bytes:
    """`KEY=VALUE\\0` entries, in the given order. Keys may not contain '=' or NUL."""
    parts: list[bytes] = []
    for key, value in env.items():
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise BadRequest(
                f"invalid environment entry {key!r}: keys must be non-empty without '=' or NUL, "
                "values without NUL",
                {"key": key},
            )
        parts.append(f"{key}={value}\0".encode())
    return b"".join(parts)


def _no_arguments(module: CompiledModule, entry: str) -> BadRequest:
    """Input or env sent to a core module's no-argument entry, which has no way to receive
    either: refused rather than dropped, so a caller never mistakes it for a run on them."""
    takers = [name for name, (kind, _) in module.entries.items() if kind is EntryKind.ABI]
    instead = (f"or call an entry that takes them: {', '.join(takers)}" if takers
               else "this module has no entry that takes them")
    return BadRequest(
        f"entry {entry!r} takes no arguments, so it cannot receive input or env: send "
        f"neither, {instead}", {"entry": entry, "available": takers})


def _too_big(n: int, lim: Limits) -> MemoryLimit:
    return MemoryLimit(
        f"input of {n} bytes does not fit in the {lim.memory_bytes}-byte memory limit",
        {"memory_bytes": lim.memory_bytes, "input_bytes": n},
    )


def _no_host_methods(tenant: str, name: str, request: bytes) -> tuple[bool, bytes]:
    """The answer to an Extism user function in a sandbox given no host methods."""
    return False, json.dumps({"error": {
        "code": "NOT_FOUND", "message": f"no host method {name!r}: none are configured"}}).encode()
