"""Extism plugins: the host side of `extism:host/env` and `extism:host/user`.

A plugin built with an Extism PDK imports its kernel from `extism:host/env` and exports
no-argument functions returning an i32 status. Per execution, in the execution's fresh store:

1. the kernel (extism_kernel.py, a small wasm module) is instantiated and the request input is
   copied into its memory in one move;
2. the kernel instance is defined as `extism:host/env` on this module's own linker, next to the
   host functions below (config, vars, logs, http, user methods: they need the host), and the
   plugin is instantiated through that linker into the Sandbox's instance slot, so the rest of
   the Sandbox's execution path (exports, `_initialize`, the entry call) is unchanged;
3. after the entry returns, the output (and on a non-zero status, the error message) is read
   out of kernel memory in one move.

Choices (docs/plugin-abi.md, "Extism plugins"): config is the request's env; vars live for one
execution (a fresh store per execution keeps nothing, and a visit counter belongs in the
tenant's key-value state); every log level is captured into the execution's logs as
`[level] message`; `http_request` is refused (PLUGIN_ERROR): plugins have no network.
`extism:host/user` imports `(i64) -> i64` call the operator's host method of the same name
through the `UserCall` seam (request block in, response block out: the JSON response, or the
method's JSON error when it failed).
"""

from __future__ import annotations

import ctypes
import weakref
from collections.abc import Callable
from typing import Any

import wasmtime

from wasmcore.protocol.errors import (
    InternalError,
    InvalidModule,
    MemoryLimit,
    OutputLimit,
    PluginError,
    WasmCoreError,
)
from wasmcore.protocol.limits import Limits

from . import _raw
from .extism_kernel import (
    ERROR_OFFSET,
    HEAP,
    HOST_MODULE,
    KERNEL_FUNCTIONS,
    KERNEL_WAT,
    MAGIC,
    OUTPUT_LENGTH,
    OUTPUT_OFFSET,
)
from .host import HostState, InputSource, OutputSink

ENV_MODULE = "extism:host/env"
USER_MODULE = "extism:host/user"

# `extism:host/user` imports call the operator's host methods: (tenant, name, request) ->
# (ok, response). Wired by the worker (sandbox_worker/host_methods.py's HostMethods.call).
UserCall = Callable[[str, str, bytes], tuple[bool, bytes]]
# Optional: whether a host method of that name exists, asked at load (unknown: refused then).
UserKnown = Callable[[str], bool]

_I64 = ("i64",)
# The `extism:host/env` functions the host (Python) provides (name -> (params, results)).
HOST_FUNCTIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "config_get": (_I64, _I64),
    "var_get": (_I64, _I64),
    "var_set": (("i64", "i64"), ()),
    "http_request": (("i64", "i64"), _I64),
    "http_status_code": ((), ("i32",)),
    "http_headers": ((), _I64),
    "log_trace": (_I64, ()),
    "log_debug": (_I64, ()),
    "log_info": (_I64, ()),
    "log_warn": (_I64, ()),
    "log_error": (_I64, ()),
}
ENV_FUNCTIONS = {**KERNEL_FUNCTIONS, **HOST_FUNCTIONS}
USER_SIGNATURE = (_I64, _I64)
IMPORT_NAMES = frozenset((ENV_MODULE, name) for name in ENV_FUNCTIONS)
# Bytes of vars one execution may hold (keys and values together), as Extism bounds them.
VARS_BYTES = 1 << 20

_U64 = ctypes.c_uint64.from_address
_I64_AT = ctypes.c_int64.from_address


def _sig(func_type: wasmtime.FuncType) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return tuple(str(t) for t in func_type.params), tuple(str(t) for t in func_type.results)


def is_extism(module: wasmtime.Module) -> bool:
    return any(imp.module in (ENV_MODULE, USER_MODULE) for imp in module.imports)


def check_imports(module: wasmtime.Module, user_methods: bool,
                  user_known: UserKnown | None = None) -> list[str]:
    """Refuse Extism imports this host does not provide (wrong name or signature, or a user
    function with no host method to call). Returns the user function names."""
    problems: list[str] = []
    missing: list[str] = []
    users: list[str] = []
    for imp in module.imports:
        if imp.module not in (ENV_MODULE, USER_MODULE):
            continue
        name = imp.name or ""
        ty = imp.type
        sig = _sig(ty) if isinstance(ty, wasmtime.FuncType) else None
        if imp.module == ENV_MODULE:
            expected = ENV_FUNCTIONS.get(name)
            if expected is None:
                problems.append(f"{ENV_MODULE}.{name} is not an Extism kernel function")
            elif sig != expected:
                problems.append(f"{ENV_MODULE}.{name} must be {_show(expected)}, not "
                                f"{_show(sig) if sig else 'a non-function'}")
        elif not user_methods:
            problems.append(f"{USER_MODULE}.{name}: no host methods are available to this "
                            "service, so `extism:host/user` imports cannot be resolved")
            missing.append(f"{USER_MODULE}.{name}")
        elif sig != USER_SIGNATURE:
            problems.append(f"{USER_MODULE}.{name} must be {_show(USER_SIGNATURE)} (request "
                            f"offset in, response offset out), not "
                            f"{_show(sig) if sig else 'a non-function'}")
        elif user_known is not None and not user_known(name):
            problems.append(f"{USER_MODULE}.{name}: the operator has no host method named "
                            f"{name!r} (add it to the config, or call one that exists)")
            missing.append(f"{USER_MODULE}.{name}")
        else:
            users.append(name)
    if problems:
        details: dict[str, object] = {"problems": problems[:20], "toolchain": "extism"}
        if missing:
            details["missing_imports"] = missing[:20]
        raise InvalidModule(
            f"Extism plugin cannot be linked: {'; '.join(problems[:5])}"
            f"{f' and {len(problems) - 5} more' if len(problems) > 5 else ''}",
            details,
        )
    return users


def _func_type(sig: tuple[tuple[str, ...], tuple[str, ...]]) -> wasmtime.FuncType:
    kind = {"i32": wasmtime.ValType.i32(), "i64": wasmtime.ValType.i64()}
    return wasmtime.FuncType([kind[t] for t in sig[0]], [kind[t] for t in sig[1]])


def _show(sig: tuple[tuple[str, ...], tuple[str, ...]]) -> str:
    return f"({' '.join(sig[0])}) -> ({' '.join(sig[1])})"


class _CallbackTrap(Exception):
    """Leave a host callback returning this owned wasm_trap_t*."""

    def __init__(self, trap: int) -> None:
        super().__init__()
        self.trap = trap


def _new_trap(message: str) -> int:
    data = message.encode()
    return int(_raw.trap_new(data, len(data)) or 0)


class ExtismHost:
    """The kernel, the host functions and the per-execution Extism state of one Sandbox.

    Single-threaded like the Sandbox: the callbacks serve "the current execution".
    """

    def __init__(self, engine: wasmtime.Engine, state: HostState,
                 failed: Callable[[int, int], Exception],
                 user_call: UserCall | None = None,
                 user_known: UserKnown | None = None) -> None:
        self._state = state
        self._failed = failed  # the Sandbox's exception for a raw call's (error, trap)
        self.user_call = user_call
        self.user_known = user_known
        self._linker = wasmtime.Linker(engine)
        self._linker.allow_shadowing = True  # `extism:host/env` is redefined per execution
        self._linker.define_wasi()
        self._linker_addr = _raw.addr(self._linker)
        self._callbacks: dict[tuple[str, str], Any] = {}
        self._limits: Limits | None = None
        self._define_host_functions()
        # Link check at load: every `extism:host/env` function defined store-independently
        # (never called), so `instantiate_pre` on this linker checks a plugin's imports (names
        # and types, WASI's and user functions' too) without running anything.
        self.check_linker = wasmtime.Linker(engine)
        self.check_linker.define_wasi()
        self._never_called = _raw.UNCHECKED_CALLBACK(
            lambda env, caller, args, nargs: _new_trap("link check only"))
        for name, sig in ENV_FUNCTIONS.items():
            _raw.define_func_unchecked(self.check_linker, ENV_MODULE.encode(), name.encode(),
                                       _func_type(sig), self._never_called)
        kernel = wasmtime.Module(engine, KERNEL_WAT)
        self._kernel_pre = self._linker.instantiate_pre(kernel)
        self._kernel_pre_addr = _raw.addr(self._kernel_pre)
        names = [export.name for export in kernel.exports]
        self._k_memory = names.index("memory")
        self._k_alloc = names.index("alloc")
        self._k_input = names.index("wasmcore_input")

        self._kinstance = _raw.InstanceSlot()
        self._kmemory = _raw.ExternSlot()
        self._kfunc = _raw.ExternSlot()
        self._args = _raw.RawArgs(2)
        self._args_addr = self._args.addr
        self._arg0 = ctypes.c_uint64.from_address(self._args_addr)  # i64 argument / result
        self._trap = ctypes.c_void_p()
        self._trap_addr = ctypes.addressof(self._trap)
        self._name_ptr = ctypes.c_void_p()
        self._name_len = ctypes.c_size_t()
        self._name_ptr_addr = ctypes.addressof(self._name_ptr)
        self._name_len_addr = ctypes.addressof(self._name_len)
        self._kinstance_addr = self._kinstance.addr
        self._kfunc_addr = self._kfunc.addr
        self._kfunc_item_addr = self._kfunc.item_addr
        self._kmemory_item_addr = self._kmemory.item_addr
        self._env_name = ENV_MODULE.encode()

        # Per execution.
        self.ctx = 0
        self._has_memory = False  # the kernel memory slot belongs to the current store
        self.config: dict[bytes, bytes] = {}
        self.vars: dict[bytes, bytes] = {}
        self.vars_bytes = 0
        self.tenant = ""

    # ------------------------------------------------------------------ linking

    def prepare(self, module: wasmtime.Module) -> None:
        """Check a plugin's Extism imports and define the user functions it calls. The caller
        then links the module against `check_linker` (all other imports, types)."""
        for name in check_imports(module, self.user_call is not None, self.user_known):
            if (USER_MODULE, name) not in self._callbacks:
                self._define(USER_MODULE, name, USER_SIGNATURE, self._user_function(name))
                _raw.define_func_unchecked(self.check_linker, USER_MODULE.encode(),
                                           name.encode(), _func_type(USER_SIGNATURE),
                                           self._never_called)

    def _define(self, module: str, name: str,
                sig: tuple[tuple[str, ...], tuple[str, ...]], callback: Any) -> None:
        raw = _raw.UNCHECKED_CALLBACK(callback)
        self._callbacks[(module, name)] = raw  # must outlive the linker
        _raw.define_func_unchecked(self._linker, module.encode(), name.encode(),
                                   _func_type(sig), raw)

    # ------------------------------------------------------------------ per execution

    def instantiate(self, ctx: int, module_addr: int, data: bytes | InputSource,
                    env: dict[str, str], tenant: str, limits: Limits, instance_addr: int,
                    trap_addr: int) -> None:
        """Kernel + input, then the plugin into `instance_addr` (raises `failed` on a trap)."""
        self.ctx = ctx
        self.config = {k.encode(): v.encode() for k, v in env.items()}
        self.vars = {}
        self.vars_bytes = 0
        self.tenant = tenant
        self._limits = limits
        trap = self._trap
        trap.value = None
        error = _raw.instance_pre_instantiate(
            self._kernel_pre_addr, ctx, self._kinstance.addr, self._trap_addr)
        if error or trap.value:
            raise self._failed(error or 0, trap.value or 0)
        self._export(ctx, self._k_memory, self._kmemory.addr)
        self._has_memory = True
        n = len(data)
        self._arg0.value = n
        self._call_kernel(ctx, self._k_input, 1)
        offset = self._arg0.value
        if n and offset + n > self._memory_size(ctx):  # a fresh kernel: a bug of ours
            raise InternalError(f"Extism kernel placed the input outside its memory: {offset}")
        if n:
            target = self._memory(ctx) + offset
            if type(data) is bytes:
                ctypes.memmove(target, data, n)
            else:
                data.copy_to(target, n)
        name = self._env_name
        error = _raw.linker_define_instance(
            self._linker_addr, ctx, name, len(name), self._kinstance_addr)
        if error:
            raise self._failed(error, 0)
        error = _raw.linker_instantiate(
            self._linker_addr, ctx, module_addr, instance_addr, trap_addr)
        trapped = ctypes.c_void_p.from_address(trap_addr).value
        if error or trapped:
            raise self._failed(error or 0, trapped or 0)

    def finish(self, code: int, limits: Limits, sink: OutputSink | None) -> WasmCoreError | None:
        """After the entry returned `code`: the output into the execution's state, or the
        plugin's error. Reads kernel memory in bulk."""
        ctx = self.ctx
        base = self._memory(ctx)
        size = self._memory_size(ctx)
        error_offset = _U64(base + ERROR_OFFSET).value
        if code != 0 or error_offset:
            # As Extism does, an error set with `error_set` fails the call whatever the status.
            message = self._block(base, size, error_offset) if error_offset else None
            text = (message.decode("utf-8", "replace") if message
                    else f"plugin returned error code {code}")
            return PluginError(text, {"plugin_code": code, "extism_error": message is not None})
        offset = _U64(base + OUTPUT_OFFSET).value
        length = _U64(base + OUTPUT_LENGTH).value
        if length == 0:
            return None
        if offset + length > size or offset < HEAP:
            return PluginError(
                f"output_set({offset}, {length}) is outside the kernel's memory", {})
        if length > limits.output_bytes:
            return OutputLimit(f"plugin output exceeds the {limits.output_bytes}-byte limit",
                               {"output_bytes": limits.output_bytes})
        state = self._state
        if sink is not None and length >= sink.threshold:
            sink.write(base + offset, length)
            state.sink_active = True
        else:
            state.output.append(ctypes.string_at(base + offset, length))
        state.output_len = length
        return None

    def memory_size(self) -> int:
        """Bytes of kernel memory of the current execution (0 before the kernel exists)."""
        return self._memory_size(self.ctx) if self._has_memory and self.ctx else 0

    def detach(self) -> None:
        self.ctx = 0
        self._has_memory = False
        self.config = {}
        self.vars = {}

    # ------------------------------------------------------------------ kernel access

    def _export(self, ctx: int, index: int, out_addr: int) -> None:
        if not _raw.instance_export_nth(ctx, self._kinstance_addr, index, self._name_ptr_addr,
                                        self._name_len_addr, out_addr):
            raise InternalError(f"Extism kernel export #{index} missing")

    def _call_kernel(self, ctx: int, index: int, nargs: int) -> None:
        self._export(ctx, index, self._kfunc_addr)
        trap = self._trap
        trap.value = None
        error = _raw.func_call_unchecked(ctx, self._kfunc_item_addr, self._args_addr, nargs,
                                         self._trap_addr)
        if error or trap.value:
            raise self._failed(error or 0, trap.value or 0)

    def _memory(self, ctx: int) -> int:
        return int(_raw.memory_data(ctx, self._kmemory_item_addr) or 0)

    def _memory_size(self, ctx: int) -> int:
        return int(_raw.memory_data_size(ctx, self._kmemory_item_addr))

    @staticmethod
    def _block(base: int, size: int, offset: int) -> bytes | None:
        """The bytes of the allocated block at `offset`, or None when it is not one."""
        if offset < HEAP + 16 or offset > size:
            return None
        if _U64(base + offset - 8).value != offset ^ MAGIC:
            return None
        length = _U64(base + offset - 16).value
        if offset + length > size:
            return None
        return ctypes.string_at(base + offset, length)

    def read_block(self, ctx: int, offset: int) -> bytes | None:
        return self._block(self._memory(ctx), self._memory_size(ctx), offset)

    def write_block(self, ctx: int, data: bytes) -> int:
        """Allocate a kernel block from a host callback and fill it; its offset (0: empty)."""
        if not data:
            return 0
        try:
            self._arg0.value = len(data)
            self._call_kernel(ctx, self._k_alloc, 1)
        except Exception as exc:
            trap = getattr(exc, "trap", 0)
            error = getattr(exc, "error", 0)
            if error:
                _raw.take_error(error).close()
            raise _CallbackTrap(trap or _new_trap("Extism kernel alloc failed")) from None
        offset = self._arg0.value
        # Kernel memory is the plugin's to write (its allocator's state too): never trust
        # an offset from it with a host write.
        if offset < HEAP + 16 or offset + len(data) > self._memory_size(ctx):
            raise _CallbackTrap(_new_trap(
                f"Extism kernel alloc returned {offset:#x}, outside its memory"))
        ctypes.memmove(self._memory(ctx) + offset, data, len(data))
        return offset

    # ------------------------------------------------------------------ host functions

    def _define_host_functions(self) -> None:
        state = self._state
        # The callbacks hold the host weakly: no reference cycle, so the linkers and the kernel
        # go with the Sandbox, not whenever the cycle collector runs.
        host = weakref.proxy(self)
        val = _raw.VAL_RAW_SIZE

        def guarded(name: str, body: Callable[[int, int], None]) -> Callable[..., int]:
            def callback(env: int, caller: int, args: int, nargs: int) -> int:
                try:
                    body(_raw.caller_context(caller), args)
                    return 0
                except _CallbackTrap as exc:
                    return exc.trap
                except BaseException as exc:  # must never unwind into wasm
                    state.failure = InternalError(f"{ENV_MODULE}.{name} failed: {exc!r}")
                    return _new_trap("host function failed")
            return callback

        def config_get(ctx: int, args: int) -> None:
            key = host.read_block(ctx, _U64(args).value)
            value = host.config.get(key) if key is not None else None
            _U64(args).value = host.write_block(ctx, value) if value else 0

        def var_get(ctx: int, args: int) -> None:
            key = host.read_block(ctx, _U64(args).value)
            value = host.vars.get(key) if key is not None else None
            _U64(args).value = host.write_block(ctx, value) if value else 0

        def var_set(ctx: int, args: int) -> None:
            key = host.read_block(ctx, _U64(args).value)
            if key is None:
                raise _CallbackTrap(_new_trap("var_set: the key is not an allocated block"))
            old = host.vars.pop(key, None)
            if old is not None:
                host.vars_bytes -= len(key) + len(old)
            value_offset = _U64(args + val).value
            if value_offset == 0:
                return  # Extism: a null value removes the var
            value = host.read_block(ctx, value_offset)
            if value is None:
                raise _CallbackTrap(_new_trap("var_set: the value is not an allocated block"))
            if host.vars_bytes + len(key) + len(value) > VARS_BYTES:
                state.failure = PluginError(
                    f"plugin vars exceed {VARS_BYTES} bytes for one execution",
                    {"vars_bytes": VARS_BYTES})
                raise _CallbackTrap(_new_trap("vars limit exceeded"))
            host.vars[key] = value
            host.vars_bytes += len(key) + len(value)

        def http_request(ctx: int, args: int) -> None:
            state.failure = PluginError(
                "http_request is refused: wasm-core plugins have no network access "
                "(pass the data in the request input, or ask the operator for a host method)",
                {"extism_function": "http_request"})
            raise _CallbackTrap(_new_trap("http_request is not allowed"))

        def http_status_code(ctx: int, args: int) -> None:
            ctypes.c_int32.from_address(args).value = 0

        def http_headers(ctx: int, args: int) -> None:
            _U64(args).value = 0

        def logger(level: str) -> Callable[[int, int], None]:
            prefix = f"[{level}] ".encode()

            def log(ctx: int, args: int) -> None:
                message = host.read_block(ctx, _U64(args).value)
                if message is None:
                    raise _CallbackTrap(_new_trap(f"log_{level}: not an allocated block"))
                state.add_log(prefix + message)
            return log

        def out_of_memory(ctx: int, args: int) -> None:
            limit = host._limit_hint()
            state.failure = MemoryLimit(
                f"the Extism kernel cannot allocate {_U64(args).value} more bytes: its memory "
                f"is capped at the {limit}-byte memory limit (input, output and blocks)",
                {"memory_bytes": limit})
            raise _CallbackTrap(_new_trap("Extism kernel out of memory"))

        bodies: dict[str, Callable[[int, int], None]] = {
            "config_get": config_get, "var_get": var_get, "var_set": var_set,
            "http_request": http_request, "http_status_code": http_status_code,
            "http_headers": http_headers,
        }
        for level in ("trace", "debug", "info", "warn", "error"):
            bodies[f"log_{level}"] = logger(level)
        for name, body in bodies.items():
            self._define(ENV_MODULE, name, HOST_FUNCTIONS[name], guarded(name, body))
        self._define(HOST_MODULE, "out_of_memory", (_I64, ()),
                     guarded("out_of_memory", out_of_memory))

    def _limit_hint(self) -> int:
        return self._limits.memory_bytes if self._limits is not None else 0

    def _user_function(self, name: str) -> Callable[..., int]:
        state = self._state
        host = weakref.proxy(self)  # no reference cycle (see _define_host_functions)

        def callback(env: int, caller: int, args: int, nargs: int) -> int:
            try:
                ctx = _raw.caller_context(caller)
                request = host.read_block(ctx, _U64(args).value)
                if request is None:
                    request = b""  # offset 0 (no request) or not a block: an empty request
                call = host.user_call
                if call is None:  # unwired since the module was linked
                    response = b'{"error": "host methods are not available"}'
                else:
                    # A failed call's response is the method's JSON error: the plugin reads
                    # it like any response and decides (no hidden error state that would
                    # fail the whole call behind its back).
                    _ok, response = call(host.tenant, name, request)
                _U64(args).value = host.write_block(ctx, response)
                return 0
            except _CallbackTrap as exc:
                return exc.trap
            except BaseException as exc:  # must never unwind into wasm
                state.failure = InternalError(f"{USER_MODULE}.{name} failed: {exc!r}")
                return _new_trap("host function failed")
        return callback
