"""One error hierarchy for the whole service, one stable code per failure kind.

The code is what crosses the wire; the client rebuilds the matching exception class from it
with `error_from_code`. Messages say what to do next.
"""

from __future__ import annotations

from typing import Any, ClassVar


class WasmCoreError(Exception):
    """Base of every error the service reports. `code` is stable and part of the protocol."""

    code: ClassVar[str] = "INTERNAL"

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = details or {}

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class InternalError(WasmCoreError):
    code = "INTERNAL"


class BadRequest(WasmCoreError):
    code = "BAD_REQUEST"


class NotFound(WasmCoreError):
    code = "NOT_FOUND"


class Forbidden(WasmCoreError):
    code = "FORBIDDEN"


class InvalidModule(WasmCoreError):
    code = "INVALID_MODULE"


class Timeout(WasmCoreError):
    code = "TIMEOUT"


class OutOfFuel(WasmCoreError):
    code = "OUT_OF_FUEL"


class MemoryLimit(WasmCoreError):
    code = "MEMORY_LIMIT"


class OutputLimit(WasmCoreError):
    code = "OUTPUT_LIMIT"


class ScratchLimit(WasmCoreError):
    """A WASI module put more in its scratch directory (/tmp) than [wasi] scratch_mb allows:
    details carry {"scratch_bytes": used, "limit": cap}."""

    code = "SCRATCH_LIMIT"


class Trap(WasmCoreError):
    code = "TRAP"


class PluginError(WasmCoreError):
    code = "PLUGIN_ERROR"


class WorkerLost(WasmCoreError):
    code = "WORKER_LOST"


class Busy(WasmCoreError):
    code = "BUSY"


class ShuttingDown(WasmCoreError):
    code = "SHUTTING_DOWN"


class PayloadTooLarge(WasmCoreError):
    code = "PAYLOAD_TOO_LARGE"


class StorageError(WasmCoreError):
    """The server could not write to its own storage (disk full, data dir broken): nothing
    was changed."""

    code = "STORAGE_ERROR"


class QuotaExceeded(WasmCoreError):
    """A per-tenant quota of the operator's config would be exceeded: details name the
    quota, its limit and the tenant's current use ({"quota", "limit", "used"})."""

    code = "QUOTA_EXCEEDED"


class Unavailable(WasmCoreError):
    """The client got no reply in time (the service is down or unreachable)."""

    code = "UNAVAILABLE"


class Unauthenticated(WasmCoreError):
    """The server does not accept this client's key: unknown, removed, or none sent where one
    is required (the client sees the refused handshake; the server answers it for a key
    removed while its connection was open)."""

    code = "UNAUTHENTICATED"


ERROR_CLASSES: dict[str, type[WasmCoreError]] = {
    cls.code: cls
    for cls in (
        InternalError,
        BadRequest,
        NotFound,
        Forbidden,
        InvalidModule,
        Timeout,
        OutOfFuel,
        MemoryLimit,
        OutputLimit,
        Trap,
        PluginError,
        WorkerLost,
        Busy,
        ShuttingDown,
        PayloadTooLarge,
        Unavailable,
        StorageError,
        QuotaExceeded,
        Unauthenticated,
        ScratchLimit,
    )
}


def error_from_code(
    code: str, message: str, details: dict[str, Any] | None = None
) -> WasmCoreError:
    """Rebuild the exception for a wire error; unknown codes (a newer server) stay readable."""
    cls = ERROR_CLASSES.get(code)
    if cls is None:
        err = WasmCoreError(message, details)
        err.code = code  # type: ignore[misc]
        return err
    return cls(message, details)
