"""Every use of wasmtime-py's private internals, and the raw ctypes entry points into libwasmtime.

The fence: no other module of ours imports `wasmtime._ffi`, calls private methods
(`_consume`, `_from_ptr`) or knows a wasmtime C struct's layout; they call the names defined
here (tests/test_raw_fence.py keeps it so). What this module relies on, and so what to check
when wasmtime moves (docs/operations.md, "Upgrading wasmtime"):

* `wasmtime._ffi.dll`, the loaded libwasmtime, to build our own C function prototypes for C API
  functions wasmtime-py does not wrap or wraps slowly (unchecked calls and host callbacks,
  `wasmtime_instance_pre_instantiate`, the store limiter, the pooling allocator, linking an
  Extism plugin to its store's kernel (`wasmtime_linker_define_instance` / `_instantiate`),
  reading the grow probe's global, the epoch deadline callback of short timeouts);
* C struct layouts from `wasmtime._ffi`: `wasmtime_extern_t` (kind byte, then the union at
  `of`), `wasmtime_instance_t`, `wasmtime_val_raw_t` (16 bytes, i32 in the low 4, i64 in the
  low 8), `wasmtime_val_t` (`of.i32`);
  `wasm_byte_vec_t` and `wasi_config_set_stdin_bytes` (WASI stdin from bytes);
* wasmtime-py objects' native pointers: `ptr()` of Engine, Config, Linker, FuncType,
  InstancePre, Module and WasiConfig; `WasiConfig._consume()` (the store takes ownership);
  `Trap._from_ptr` / `WasmtimeError._from_ptr` (wrap an owned pointer, messages, ExitTrap).

Why raw calls at all: wasmtime-py's objects cost ~100 us per fresh-store execution
(Store/Instance/Func wrappers, `wasmtime_val_t` conversions, a generic trampoline per host call).
The hot path instead calls the C API directly with plain integer addresses.

We build our *own* function objects from the shared library handle instead of reusing
`wasmtime._bindings`' ones: their argtypes are typed pointers (slow conversions) and mutating
them would change wasmtime-py's behaviour for everyone else in the process.

Calls that can run guest code (instantiate, func calls) release the GIL (CFUNCTYPE), so the
epoch ticker thread keeps running while wasm loops. Short bookkeeping calls keep the GIL
(PYFUNCTYPE): they never block and skip the GIL release/reacquire round-trip.
"""

from __future__ import annotations

import ctypes
from ctypes import c_bool, c_int32, c_int64, c_size_t, c_uint32, c_uint64, c_void_p
from typing import Any

import wasmtime
from wasmtime import _ffi as ffi

_DLL = ffi.dll


def _releasing(name: str, restype: Any, *argtypes: Any) -> Any:
    """A foreign function that drops the GIL while it runs (may execute wasm)."""
    return ctypes.CFUNCTYPE(restype, *argtypes)((name, _DLL))


def _holding(name: str, restype: Any, *argtypes: Any) -> Any:
    """A foreign function that keeps the GIL (never runs wasm, never blocks)."""
    return ctypes.PYFUNCTYPE(restype, *argtypes)((name, _DLL))


# --- store / context -------------------------------------------------------------------------
store_new = _holding("wasmtime_store_new", c_void_p, c_void_p, c_void_p, c_void_p)
store_context = _holding("wasmtime_store_context", c_void_p, c_void_p)
# Deleting a store frees instances/memories; it runs no guest code.
store_delete = _holding("wasmtime_store_delete", None, c_void_p)
store_limiter = _holding(
    "wasmtime_store_limiter", None, c_void_p, c_int64, c_int64, c_int64, c_int64, c_int64
)
context_set_fuel = _holding("wasmtime_context_set_fuel", c_void_p, c_void_p, c_uint64)
context_get_fuel = _holding("wasmtime_context_get_fuel", c_void_p, c_void_p, c_void_p)
context_set_epoch_deadline = _holding(
    "wasmtime_context_set_epoch_deadline", None, c_void_p, c_uint64
)
# Called on the executing thread when a store's epoch deadline is reached:
# (context, data, uint64_t* next deadline delta, uint8_t* update kind) -> wasmtime_error_t*
# (0: go on, `delta` ticks more; an error: the call fails with it).
DEADLINE_CALLBACK = ctypes.CFUNCTYPE(c_size_t, c_void_p, c_void_p, c_void_p, c_void_p)
store_epoch_deadline_callback = _holding(
    "wasmtime_store_epoch_deadline_callback", None, c_void_p, DEADLINE_CALLBACK, c_void_p,
    c_void_p,
)
UPDATE_DEADLINE_CONTINUE = 0  # wasmtime_update_deadline_kind_t
error_new = _holding("wasmtime_error_new", c_void_p, ctypes.c_char_p)
_context_set_wasi = _holding("wasmtime_context_set_wasi", c_void_p, c_void_p, c_void_p)

# --- instances / calls -----------------------------------------------------------------------
instance_pre_instantiate = _releasing(
    "wasmtime_instance_pre_instantiate", c_void_p, c_void_p, c_void_p, c_void_p, c_void_p
)
instance_export_nth = _holding(
    "wasmtime_instance_export_nth", c_bool, c_void_p, c_void_p, c_size_t, c_void_p, c_void_p,
    c_void_p,
)
func_call_unchecked = _releasing(
    "wasmtime_func_call_unchecked", c_void_p, c_void_p, c_void_p, c_void_p, c_size_t, c_void_p
)
caller_export_get = _holding(
    "wasmtime_caller_export_get", c_bool, c_void_p, c_void_p, c_size_t, c_void_p
)
caller_context = _holding("wasmtime_caller_context", c_void_p, c_void_p)
# Extism plugins: their `extism:host/env` imports are the kernel instance of the same store,
# so they are linked per execution (define the instance, then instantiate through the linker).
linker_define_instance = _holding(
    "wasmtime_linker_define_instance", c_void_p, c_void_p, c_void_p, ctypes.c_char_p, c_size_t,
    c_void_p,
)
linker_instantiate = _releasing(
    "wasmtime_linker_instantiate", c_void_p, c_void_p, c_void_p, c_void_p, c_void_p, c_void_p
)

# --- memory ----------------------------------------------------------------------------------
memory_data = _holding("wasmtime_memory_data", c_void_p, c_void_p, c_void_p)
memory_data_size = _holding("wasmtime_memory_data_size", c_size_t, c_void_p, c_void_p)

# --- globals ---------------------------------------------------------------------------------
_global_get = _holding("wasmtime_global_get", None, c_void_p, c_void_p, c_void_p)

# --- traps -----------------------------------------------------------------------------------
trap_new = _holding("wasmtime_trap_new", c_void_p, ctypes.c_char_p, c_size_t)

# --- linker / engine setup -------------------------------------------------------------------
# Host callback signature of wasmtime_func_unchecked_callback_t: returns a wasm_trap_t* (0 = ok).
UNCHECKED_CALLBACK = ctypes.CFUNCTYPE(c_size_t, c_void_p, c_void_p, c_void_p, c_size_t)
_linker_define_func_unchecked = _holding(
    "wasmtime_linker_define_func_unchecked", c_void_p, c_void_p, ctypes.c_char_p, c_size_t,
    ctypes.c_char_p, c_size_t, c_void_p, UNCHECKED_CALLBACK, c_void_p, c_void_p,
)
engine_increment_epoch = _releasing("wasmtime_engine_increment_epoch", None, c_void_p)
# The bare C function's address (a POSIX timer's notify function; see ticker.py).
engine_increment_epoch_addr: int = (
    ctypes.cast(_DLL.wasmtime_engine_increment_epoch, c_void_p).value or 0
)

_pool_new = _holding("wasmtime_pooling_allocation_config_new", c_void_p)
_pool_delete = _holding("wasmtime_pooling_allocation_config_delete", None, c_void_p)
_pool_u32 = {
    name: _holding(f"wasmtime_pooling_allocation_config_{name}_set", None, c_void_p, c_uint32)
    for name in ("total_core_instances", "total_memories", "total_tables", "total_stacks")
}
_pool_size = {
    name: _holding(f"wasmtime_pooling_allocation_config_{name}_set", None, c_void_p, c_size_t)
    for name in ("max_memory_size", "linear_memory_keep_resident", "table_keep_resident")
}
_pool_strategy_set = _holding(
    "wasmtime_pooling_allocation_strategy_set", None, c_void_p, c_void_p
)

# --- struct layouts --------------------------------------------------------------------------
# wasmtime_val_raw_t is a 16-byte union (v128 member); i32 lives in the low 4 bytes. The host
# callbacks read their i32 arguments at `args + k * VAL_RAW_SIZE`.
VAL_RAW_SIZE = ctypes.sizeof(ffi.wasmtime_val_raw_t)
_EXTERN_MEMORY = ffi.WASMTIME_EXTERN_MEMORY.value
# wasmtime_extern_t is {kind, union of}: the union member (wasmtime_func_t, wasmtime_memory_t)
# is what func_call_unchecked and memory_data take.
_EXTERN_UNION_OFFSET = ffi.wasmtime_extern_t.of.offset


class ExternSlot:
    """A preallocated `wasmtime_extern_t` out-parameter (export lookups).

    `addr` is the struct's address (what instance_export_nth / caller_export_get fill);
    `item_addr` is its union member's address (the wasmtime_func_t or wasmtime_memory_t).
    """

    __slots__ = ("_extern", "addr", "item_addr")

    def __init__(self) -> None:
        self._extern = ffi.wasmtime_extern_t()
        self.addr: int = ctypes.addressof(self._extern)
        self.item_addr: int = self.addr + _EXTERN_UNION_OFFSET

    def is_memory(self) -> bool:
        return bool(self._extern.kind == _EXTERN_MEMORY)


def global_i32(ctx: int, extern: ExternSlot) -> int:
    """The value of the i32 global that `extern` (filled by an export lookup) holds."""
    value = ffi.wasmtime_val_t()
    _global_get(ctx, extern.item_addr, ctypes.addressof(value))
    return int(value.of.i32)


class InstanceSlot:
    """A preallocated `wasmtime_instance_t` out-parameter (instance_pre_instantiate)."""

    __slots__ = ("_instance", "addr")

    def __init__(self) -> None:
        self._instance = ffi.wasmtime_instance_t()
        self.addr: int = ctypes.addressof(self._instance)


class RawArgs:
    """A preallocated `wasmtime_val_raw_t[n]`: the args-and-results array of an unchecked call.

    `i32[k]` is a c_int32 view of slot k, `u32_0` an unsigned view of slot 0 (a guest pointer
    returned by alloc). The views are bound once so the hot path only sets/reads `.value`.
    """

    __slots__ = ("_array", "addr", "i32", "u32_0")

    def __init__(self, n: int) -> None:
        self._array = (ffi.wasmtime_val_raw_t * n)()
        self.addr: int = ctypes.addressof(self._array)
        self.i32 = [c_int32.from_address(self.addr + VAL_RAW_SIZE * k) for k in range(n)]
        self.u32_0 = c_uint32.from_address(self.addr)


# --- wasmtime-py objects <-> native pointers -------------------------------------------------


def addr(obj: Any) -> int:
    """Address of a wasmtime-py managed object's native pointer (e.g. Engine, Linker)."""
    return ctypes.cast(obj.ptr(), c_void_p).value or 0


def take_trap(trap_addr: int) -> wasmtime.Trap:
    """Wrap an owned wasm_trap_t* in wasmtime-py's Trap (message/trap_code helpers; frees it)."""
    return wasmtime.Trap._from_ptr(ctypes.cast(trap_addr, ctypes.POINTER(ffi.wasm_trap_t)))


def take_error(error_addr: int) -> wasmtime.WasmtimeError:
    """Wrap an owned wasmtime_error_t* (ExitTrap when it carries a WASI exit status)."""
    return wasmtime.WasmtimeError._from_ptr(
        ctypes.cast(error_addr, ctypes.POINTER(ffi.wasmtime_error_t))
    )


def define_func_unchecked(
    linker: wasmtime.Linker, module: bytes, name: bytes, func_type: wasmtime.FuncType,
    callback: Any,
) -> None:
    """Define `module.name` on `linker` as a raw unchecked host callback (UNCHECKED_CALLBACK).
    The linker does not own `callback`: the caller keeps it alive as long as the linker."""
    error = _linker_define_func_unchecked(
        addr(linker), module, len(module), name, len(name), addr(func_type), callback, None, None
    )
    if error:
        raise take_error(error)


_byte_vec_new = _holding("wasm_byte_vec_new", None, c_void_p, c_size_t, ctypes.c_char_p)
_byte_vec_new_uninitialized = _holding("wasm_byte_vec_new_uninitialized", None, c_void_p,
                                       c_size_t)
_byte_vec_delete = _holding("wasm_byte_vec_delete", None, c_void_p)
_set_stdin_bytes = _holding("wasi_config_set_stdin_bytes", None, c_void_p, c_void_p)


def set_stdin_bytes(config: wasmtime.WasiConfig, data: Any) -> None:
    """WASI stdin reads `data`: bytes, or an input source (`len` and `copy_to(address,
    length)`, a shared-memory segment say). wasmtime-py has no wrapper for
    wasi_config_set_stdin_bytes."""
    # The C function moves the vector's contents into the config (`take()`), so the vector
    # must not be deleted afterwards. One copy, straight from `data` (c_char_p passes the
    # bytes object's own buffer; a source copies itself in): a 1 MiB stdin costs about
    # 0.1 ms, not the 0.6 ms of a ctypes array filled first.
    vec = ffi.wasm_byte_vec_t()
    if hasattr(data, "copy_to"):
        _byte_vec_new_uninitialized(ctypes.addressof(vec), len(data))
        try:
            data.copy_to(ctypes.cast(vec.data, c_void_p).value or 0, len(data))
        except BaseException:
            _byte_vec_delete(ctypes.addressof(vec))
            raise
    else:
        if type(data) is not bytes:
            data = bytes(data)  # c_char_p takes bytes only
        _byte_vec_new(ctypes.addressof(vec), len(data), data)
    _set_stdin_bytes(addr(config), ctypes.addressof(vec))


def give_wasi_config(ctx: int, config: wasmtime.WasiConfig) -> int:
    """Install `config` as the store's WASI context. The store takes ownership (and frees it
    with the store); `config` is unusable afterwards. Returns an owned wasmtime_error_t* or 0."""
    return int(_context_set_wasi(ctx, ctypes.cast(config._consume(), c_void_p).value) or 0)


def enable_pooling(
    config: wasmtime.Config, slots: int, max_memory_bytes: int, keep_resident: int
) -> None:
    """Switch `config` to the pooling instance allocator.

    Why: the on-demand allocator mmaps/munmaps every linear memory and page-faults on first
    touch, ~6 us per fresh instance. Pool slots are reused; `keep_resident` bytes are reset
    with memset instead of madvise (still zeroed: no state leaks between executions).
    """
    pc = _pool_new()
    try:
        # total_stacks too: its default (1,000 async stacks of 2 MiB) maps ~2 GiB of writable
        # memory that RLIMIT_DATA counts, though nothing here runs async.
        for name in ("total_core_instances", "total_memories", "total_tables", "total_stacks"):
            _pool_u32[name](pc, slots)
        _pool_size["max_memory_size"](pc, max_memory_bytes)
        _pool_size["linear_memory_keep_resident"](pc, keep_resident)
        _pool_size["table_keep_resident"](pc, keep_resident)
        _pool_strategy_set(addr(config), pc)
    finally:
        _pool_delete(pc)


# --- the native fast path (fastcall.py, sandbox_worker/native/fastcall.c) --------------------
# The C file takes libwasmtime's functions as addresses from the library wasmtime-py loaded
# (nothing linked at build time) and assumes the layouts below; fastcall.py refuses the native
# path unless the C file reports exactly these.
NATIVE_FUNCTIONS = (
    "wasmtime_store_new", "wasmtime_store_context", "wasmtime_store_delete",
    "wasmtime_store_limiter", "wasmtime_context_set_fuel", "wasmtime_context_get_fuel",
    "wasmtime_context_set_epoch_deadline", "wasmtime_store_epoch_deadline_callback",
    "wasmtime_error_new", "wasmtime_instance_pre_instantiate", "wasmtime_instance_export_nth",
    "wasmtime_func_call_unchecked", "wasmtime_memory_data", "wasmtime_memory_data_size",
    "wasmtime_caller_export_get", "wasmtime_trap_new",
)
# (sizeof wasmtime_extern_t, offset of its union, sizeof wasmtime_instance_t,
#  sizeof wasmtime_val_raw_t, sizeof wasmtime_memory_t, sizeof wasmtime_func_t,
#  WASMTIME_EXTERN_MEMORY)
NATIVE_LAYOUT = (
    ctypes.sizeof(ffi.wasmtime_extern_t), _EXTERN_UNION_OFFSET,
    ctypes.sizeof(ffi.wasmtime_instance_t), VAL_RAW_SIZE, ctypes.sizeof(ffi.wasmtime_memory_t),
    ctypes.sizeof(ffi.wasmtime_func_t), _EXTERN_MEMORY,
)


def native_function_addresses() -> list[int]:
    """The addresses of NATIVE_FUNCTIONS in the loaded libwasmtime (0 where one is missing)."""
    found: list[int] = []
    for name in NATIVE_FUNCTIONS:
        try:
            found.append(ctypes.cast(getattr(_DLL, name), c_void_p).value or 0)
        except AttributeError:
            found.append(0)
    return found


_linker_define_func_native = _holding(
    "wasmtime_linker_define_func_unchecked", c_void_p, c_void_p, ctypes.c_char_p, c_size_t,
    ctypes.c_char_p, c_size_t, c_void_p, c_void_p, c_void_p, c_void_p,
)


def define_func_native(
    linker: wasmtime.Linker, module: bytes, name: bytes, func_type: wasmtime.FuncType,
    callback_addr: int, env_addr: int,
) -> None:
    """Define `module.name` on `linker` as the C unchecked callback at `callback_addr`, which
    gets `env_addr` as its env (both must outlive the linker)."""
    error = _linker_define_func_native(
        addr(linker), module, len(module), name, len(name), addr(func_type), callback_addr,
        env_addr, None,
    )
    if error:
        raise take_error(error)


# --- components: the call of a plugin's `process` with bytes moved in bulk ------------------
# wasmtime-py lowers a `list<u8>` one element at a time in Python (a wasmtime_component_val_t
# per byte, built by a Python loop: about 2 s per MiB). The C API still wants one 32-byte val
# per byte, but the bytes can be scattered into (and gathered from) that array by one strided
# memoryview copy, in C. What remains is wasmtime's own per-element conversion in Rust.
_component_func_call = _releasing(
    "wasmtime_component_func_call", c_void_p, c_void_p, c_void_p, c_void_p, c_size_t, c_void_p,
    c_size_t,
)
_component_val_delete = _holding("wasmtime_component_val_delete", None, c_void_p)
_vallist_new_uninit = _holding("wasmtime_component_vallist_new_uninit", None, c_void_p, c_size_t)
_valtuple_new_uninit = _holding(
    "wasmtime_component_valtuple_new_uninit", None, c_void_p, c_size_t
)

_COMPONENT_VAL = ffi.wasmtime_component_val_t
_COMPONENT_VAL_SIZE = ctypes.sizeof(_COMPONENT_VAL)
_COMPONENT_VAL_OF = _COMPONENT_VAL.of.offset
_KIND_U8 = ffi.WASMTIME_COMPONENT_U8.value
_KIND_LIST = ffi.WASMTIME_COMPONENT_LIST.value
_KIND_TUPLE = ffi.WASMTIME_COMPONENT_TUPLE.value
_KIND_STRING = ffi.WASMTIME_COMPONENT_STRING.value
_KIND_RESULT = ffi.WASMTIME_COMPONENT_RESULT.value


class ComponentCallFailed(Exception):
    """The call reported an error: `error` is the owned wasmtime_error_t* (take_error)."""

    def __init__(self, error: int) -> None:
        super().__init__()
        self.error = error


def store_context_addr(store: wasmtime.Store) -> int:
    """The wasmtime_context_t* of a wasmtime-py Store."""
    return ctypes.cast(store._context(), c_void_p).value or 0


def _val_array(base: int, n: int) -> memoryview:
    return memoryview((ctypes.c_ubyte * (n * _COMPONENT_VAL_SIZE)).from_address(base)).cast("B")


def _lower_bytes(val: Any, data: bytes) -> None:
    """`val` = list<u8> of `data`: one strided copy for the kinds, one for the bytes."""
    n = len(data)
    items = ffi.wasmtime_component_vallist_t()
    _vallist_new_uninit(ctypes.addressof(items), n)
    if n:
        view = _val_array(ctypes.cast(items.data, c_void_p).value or 0, n)
        view[0::_COMPONENT_VAL_SIZE] = bytes((_KIND_U8,)) * n
        view[_COMPONENT_VAL_OF::_COMPONENT_VAL_SIZE] = data
    val.kind = _KIND_LIST
    val.of.list = items


def _set_string(val: Any, text: bytes) -> None:
    val.kind = _KIND_STRING
    _byte_vec_new(ctypes.addressof(val.of.string), len(text), text)


def _lower_pairs(val: Any, pairs: list[tuple[bytes, bytes]]) -> None:
    """`val` = list<tuple<string, string>> of already UTF-8 encoded pairs."""
    items = ffi.wasmtime_component_vallist_t()
    _vallist_new_uninit(ctypes.addressof(items), len(pairs))
    for i, (key, value) in enumerate(pairs):
        pair = ffi.wasmtime_component_valtuple_t()
        _valtuple_new_uninit(ctypes.addressof(pair), 2)
        _set_string(pair.data[0], key)
        _set_string(pair.data[1], value)
        items.data[i].kind = _KIND_TUPLE
        items.data[i].of.tuple = pair
    val.kind = _KIND_LIST
    val.of.list = items


def _lift_bytes(val: Any) -> bytes:
    if val.kind == _KIND_STRING:
        return ctypes.string_at(ctypes.cast(val.of.string.data, c_void_p).value or 0,
                                val.of.string.size)
    if val.kind != _KIND_LIST:
        raise TypeError(f"expected list<u8> or string, got value kind {val.kind}")
    n = val.of.list.size
    if not n:
        return b""
    base = ctypes.cast(val.of.list.data, c_void_p).value or 0
    if _COMPONENT_VAL.from_address(base).kind != _KIND_U8:
        raise TypeError("expected list<u8>")
    return _val_array(base, n)[_COMPONENT_VAL_OF::_COMPONENT_VAL_SIZE].tobytes()


def call_component_func(
    func: Any, store: wasmtime.Store, data: bytes | None, pairs: list[tuple[bytes, bytes]],
    strings: tuple[bytes, ...] = (),
) -> tuple[bool, bytes]:
    """Call a component function typed `(list<u8>, list<tuple<string, string>>) ->
    result<list<u8>, string>`, or with `data` None one typed `(list<tuple<string, string>>)
    -> result<_, string>`, or with `strings` too one that takes those strings (UTF-8) before
    the pairs (the caller checked the type; wasmtime checks the values anyway).
    Returns (ok, the output bytes or the UTF-8 error message); ComponentCallFailed when the
    call traps or fails. The instance must not be called again (no post-return is run)."""
    first = 0 if data is None else 1
    count = first + len(strings) + 1
    params = (_COMPONENT_VAL * count)()
    result = _COMPONENT_VAL()
    lowered = 0
    try:
        if data is not None:
            _lower_bytes(params[0], data)
            lowered = 1
        for text in strings:
            _set_string(params[lowered], text)
            lowered += 1
        _lower_pairs(params[count - 1], pairs)
        lowered = count
        error = _component_func_call(
            ctypes.addressof(func._func), store_context_addr(store), ctypes.addressof(params),
            count, ctypes.addressof(result), 1,
        )
        if error:
            raise ComponentCallFailed(error)
        try:
            if result.kind != _KIND_RESULT:
                raise TypeError(f"expected a result, got value kind {result.kind}")
            outcome = result.of.result
            payload = _lift_bytes(outcome.val.contents) if outcome.val else b""
            return bool(outcome.is_ok), payload
        finally:
            _component_val_delete(ctypes.addressof(result))
    finally:
        for i in range(lowered):
            _component_val_delete(ctypes.addressof(params[i]))


# wasi_config_set_stdout_custom's callback: (data, buffer, length) -> bytes taken or -errno.
# wasmtime-py's own trampoline builds a ctypes array type per write (~25 us per 8 KiB write:
# most of a component's stream output time); ours hands the address over as an integer.
STDOUT_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_ssize_t, c_void_p, c_void_p, c_size_t)
_set_stdout_custom = _holding(
    "wasi_config_set_stdout_custom", None, c_void_p, STDOUT_CALLBACK, c_void_p, c_void_p
)


def set_stdout_callback(config: wasmtime.WasiConfig, callback: Any) -> None:
    """Stdout writes call `callback` (a STDOUT_CALLBACK object, which the caller keeps alive
    for as long as any store made with this config)."""
    _set_stdout_custom(addr(config), callback, None, None)
