"""Raw ctypes entry points into libwasmtime for the per-execution hot path.

wasmtime-py's objects cost ~100 us per fresh-store execution (Store/Instance/Func wrappers,
`wasmtime_val_t` conversions, a generic trampoline per host call). The hot path instead calls
the C API directly with plain integer addresses.

We build our *own* function objects from the shared library handle instead of reusing
`wasmtime._bindings`' ones: their argtypes are typed pointers (slow conversions) and mutating
them would change wasmtime-py's behaviour for everyone else in the process.

Calls that can run guest code (instantiate, func calls) release the GIL (CFUNCTYPE), so the
epoch ticker thread keeps running while wasm loops. Short bookkeeping calls keep the GIL
(PYFUNCTYPE): they never block and skip the GIL release/reacquire round-trip.
"""

from __future__ import annotations

import ctypes
from ctypes import c_bool, c_int, c_int64, c_size_t, c_uint8, c_uint32, c_uint64, c_void_p
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
context_set_wasi = _holding("wasmtime_context_set_wasi", c_void_p, c_void_p, c_void_p)

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

# --- memory ----------------------------------------------------------------------------------
memory_data = _holding("wasmtime_memory_data", c_void_p, c_void_p, c_void_p)
memory_data_size = _holding("wasmtime_memory_data_size", c_size_t, c_void_p, c_void_p)

# --- traps / errors --------------------------------------------------------------------------
trap_new = _holding("wasmtime_trap_new", c_void_p, ctypes.c_char_p, c_size_t)
trap_code = _holding("wasmtime_trap_code", c_bool, c_void_p, c_void_p)
error_exit_status = _holding("wasmtime_error_exit_status", c_bool, c_void_p, c_void_p)

# --- linker / engine setup -------------------------------------------------------------------
# Host callback signature of wasmtime_func_unchecked_callback_t: returns a wasm_trap_t* (0 = ok).
UNCHECKED_CALLBACK = ctypes.CFUNCTYPE(c_size_t, c_void_p, c_void_p, c_void_p, c_size_t)
linker_define_func_unchecked = _holding(
    "wasmtime_linker_define_func_unchecked", c_void_p, c_void_p, ctypes.c_char_p, c_size_t,
    ctypes.c_char_p, c_size_t, c_void_p, UNCHECKED_CALLBACK, c_void_p, c_void_p,
)
engine_increment_epoch = _releasing("wasmtime_engine_increment_epoch", None, c_void_p)
# The bare C function (as a POSIX timer's notify function; see ticker.py).
engine_increment_epoch_ptr = _DLL.wasmtime_engine_increment_epoch

_pool_new = _holding("wasmtime_pooling_allocation_config_new", c_void_p)
_pool_delete = _holding("wasmtime_pooling_allocation_config_delete", None, c_void_p)
_pool_u32 = {
    name: _holding(f"wasmtime_pooling_allocation_config_{name}_set", None, c_void_p, c_uint32)
    for name in ("total_core_instances", "total_memories", "total_tables")
}
_pool_size = {
    name: _holding(f"wasmtime_pooling_allocation_config_{name}_set", None, c_void_p, c_size_t)
    for name in ("max_memory_size", "linear_memory_keep_resident", "table_keep_resident")
}
_pool_strategy_set = _holding(
    "wasmtime_pooling_allocation_strategy_set", None, c_void_p, c_void_p
)

# wasmtime_val_raw_t is a 16-byte union (v128 member); i32 lives in the low 4 bytes.
VAL_RAW_SIZE = ctypes.sizeof(ffi.wasmtime_val_raw_t)
EXTERN_FUNC = 0
EXTERN_MEMORY = 3


def addr(obj: Any) -> int:
    """Address of a wasmtime-py managed object's native pointer (e.g. Engine, Linker)."""
    return ctypes.cast(obj.ptr(), c_void_p).value or 0


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
        for name in ("total_core_instances", "total_memories", "total_tables"):
            _pool_u32[name](pc, slots)
        _pool_size["max_memory_size"](pc, max_memory_bytes)
        _pool_size["linear_memory_keep_resident"](pc, keep_resident)
        _pool_size["table_keep_resident"](pc, keep_resident)
        _pool_strategy_set(addr(config), pc)
    finally:
        _pool_delete(pc)


def take_trap(trap_addr: int) -> wasmtime.Trap:
    """Wrap an owned wasm_trap_t* in wasmtime-py's Trap (message/trap_code helpers; frees it)."""
    return wasmtime.Trap._from_ptr(ctypes.cast(trap_addr, ctypes.POINTER(ffi.wasm_trap_t)))


def take_error(error_addr: int) -> wasmtime.WasmtimeError:
    """Wrap an owned wasmtime_error_t* (ExitTrap when it carries a WASI exit status)."""
    return wasmtime.WasmtimeError._from_ptr(
        ctypes.cast(error_addr, ctypes.POINTER(ffi.wasmtime_error_t))
    )


def raw_trap_code(trap_addr: int) -> int | None:
    code = c_uint8(0)
    if trap_code(trap_addr, ctypes.addressof(code)):
        return code.value
    return None


def exit_status(error_addr: int) -> int | None:
    status = c_int(0)
    if error_exit_status(error_addr, ctypes.addressof(status)):
        return status.value
    return None
