"""Turning what wasmtime reports (traps, errors, exit statuses) into the service's errors.

Precedence, most specific first: a failure the host itself decided (output cap) explains the
trap it caused; then the engine's own limits (epoch deadline = TIMEOUT, fuel = OUT_OF_FUEL);
then "memory at the cap" (a plugin that could not grow usually fails right after, with a trap or
an error code, and the useful answer is MEMORY_LIMIT); then the plain trap / plugin code.
"""

from __future__ import annotations

import msgspec
import wasmtime

from wasmcore.protocol.errors import (
    MemoryLimit,
    OutOfFuel,
    PluginError,
    Timeout,
    Trap,
    WasmCoreError,
)
from wasmcore.protocol.limits import WASM_PAGE, Limits, Metering

_BACKTRACE_CHARS = 4096
_INTERRUPT = wasmtime.TrapCode.INTERRUPT.value
INTERRUPT = _INTERRUPT  # the trap code of an epoch deadline (TIMEOUT)
_OUT_OF_FUEL = wasmtime.TrapCode.OUT_OF_FUEL.value


class ExecutionResult(msgspec.Struct):
    output: bytes  # empty when the output went to the execution's output sink
    logs: list[str]
    metering: Metering
    logs_truncated: bool = False
    output_in_sink: bool = False


_NOTHING_RAN = Metering(fuel_consumed=0, wall_time_us=0, peak_memory_bytes=0)


def with_metering(error: WasmCoreError, metering: Metering = _NOTHING_RAN,
                  logs: list[str] | None = None, logs_truncated: bool = False) -> WasmCoreError:
    """`error` carrying what the execution used and logged, as a result would (an error
    raised before anything ran: zero metering, no logs)."""
    error.details.update(
        fuel_consumed=metering.fuel_consumed,
        wall_time_us=metering.wall_time_us,
        peak_memory_bytes=metering.peak_memory_bytes,
        logs=[] if logs is None else logs,
        logs_truncated=logs_truncated,
    )
    return error


def memory_at_cap(memory_size: int, limits: Limits) -> bool:
    """One more page would not fit: the plugin has most likely been refused a grow."""
    return memory_size + WASM_PAGE > limits.memory_bytes


def split_trap_message(text: str) -> tuple[str, str]:
    """wasmtime's text is "error while executing at wasm backtrace: ... Caused by: <reason>".

    Returns (reason, backtrace). The reason alone makes a readable error message; the
    backtrace (bounded, deep recursion prints thousands of frames) goes into details.
    """
    head, sep, cause = text.partition("Caused by:")
    if not sep:
        return text.strip(), ""
    reason = " ".join(line.strip() for line in cause.strip().splitlines() if line.strip())
    return reason, head.strip()[:_BACKTRACE_CHARS]


def from_trap_code(code: int | None, timeout_ms: int, fuel: int) -> WasmCoreError | None:
    if code == _INTERRUPT:
        return Timeout(
            f"execution exceeded the {timeout_ms} ms time limit", {"timeout_ms": timeout_ms}
        )
    if code == _OUT_OF_FUEL:
        return OutOfFuel(f"execution used up its fuel ({fuel} units)", {"fuel": fuel})
    return None


def classify_trap(
    trap: wasmtime.Trap, limits: Limits, memory_size: int
) -> WasmCoreError:
    """Map a wasm trap (from instantiation or a call) to a service error."""
    code = trap.trap_code
    limit_error = from_trap_code(code.value if code else None, limits.timeout_ms, limits.fuel)
    if limit_error is not None:
        return limit_error
    reason, backtrace = split_trap_message(trap.message)
    if memory_at_cap(memory_size, limits):
        return MemoryLimit(
            f"plugin failed at the {limits.memory_bytes}-byte memory limit ({reason})",
            {"memory_bytes": limits.memory_bytes, "trap_message": reason},
        )
    return Trap(reason, {"trap_code": code.name if code else None, "backtrace": backtrace})


def classify_error(
    error: wasmtime.WasmtimeError, limits: Limits, memory_size: int
) -> WasmCoreError | None:
    """Map a wasmtime error (not a trap). None means success (WASI exit status 0)."""
    if isinstance(error, wasmtime.ExitTrap):
        return plugin_code_error(error.code, limits, memory_size, exited=True)
    reason, backtrace = split_trap_message(str(error))
    return Trap(reason, {"trap_code": None, "backtrace": backtrace})


def plugin_code_error(
    code: int, limits: Limits, memory_size: int, *, exited: bool = False
) -> WasmCoreError | None:
    """A non-zero entry return / exit status; None when the code means success."""
    if code == 0:
        return None
    if memory_at_cap(memory_size, limits):
        return MemoryLimit(
            f"plugin failed with code {code} at the {limits.memory_bytes}-byte memory limit",
            {"memory_bytes": limits.memory_bytes, "plugin_code": code},
        )
    what = "exited with status" if exited else "returned error code"
    return PluginError(f"plugin {what} {code}", {"plugin_code": code})


def refused_grow_error(
    failure: WasmCoreError, pages: int, memory_size: int, limits: Limits
) -> MemoryLimit | None:
    """MEMORY_LIMIT for a plugin that failed (`failure`) after a memory grow of `pages` pages
    was refused (the grow probe's record; 0: none refused), when that grow would have taken
    the memory past the limit. None: the failure stands."""
    requested = memory_size + pages * WASM_PAGE
    if not pages or requested <= limits.memory_bytes:
        return None
    sizes = {"allowed_bytes": limits.memory_bytes, "requested_bytes": requested,
             "current_bytes": memory_size}
    if isinstance(failure, MemoryLimit) and "input_bytes" in failure.details:
        failure.details.update(sizes)  # "the input does not fit" says more: kept
        return failure
    if "plugin_code" in failure.details:
        reason = f"status {failure.details['plugin_code']}"
    else:
        reason = str(failure.details.get("trap_message") or failure.message)
    details: dict[str, object] = {"memory_bytes": limits.memory_bytes, **sizes}
    for key in ("trap_message", "plugin_code", "trap_code", "backtrace"):
        if key in failure.details:
            details[key] = failure.details[key]
    if isinstance(failure, Trap):
        details["trap_message"] = reason
    return MemoryLimit(
        f"the plugin asked to grow its memory from {memory_size} to {requested} bytes, over "
        f"the {limits.memory_bytes}-byte limit (memory_mb), and then failed ({reason}); "
        f"raise memory_mb (up to the maximum in welcome.limits) or give it less to do",
        details)
