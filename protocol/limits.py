"""Per-execution limits and the metering every result carries."""

from __future__ import annotations

import msgspec

MiB = 1024 * 1024
WASM_PAGE = 64 * 1024

# The fuel an execution gets when no fuel cap applies: fuel is then metered and reported, and
# the wall-clock timeout is what stops a long run. Why not a finite default cap: a cap fits
# only one machine's speed (2e9 units were ~0.26 s of a spin loop) and silently shadowed every
# timeout longer than that. 2^63-1 units would take decades to burn.
NO_FUEL_CAP = 2**63 - 1


class Limits(msgspec.Struct, frozen=True):
    """Caps for one execution. Defaults come from config; a request may ask for others
    within the operator's maxima (supervisor/requests.py, run_limits)."""

    timeout_ms: int = 5_000
    fuel: int = NO_FUEL_CAP
    memory_bytes: int = 64 * MiB
    output_bytes: int = 16 * MiB
    log_bytes: int = 1 * MiB

    def lowered(
        self,
        timeout_ms: int | None = None,
        fuel: int | None = None,
        memory_bytes: int | None = None,
    ) -> Limits:
        """These limits, with each given value applied only where it is lower (a value that
        is None or not positive means "no wish")."""
        return Limits(
            timeout_ms=_lower(self.timeout_ms, timeout_ms),
            fuel=_lower(self.fuel, fuel),
            memory_bytes=_lower(self.memory_bytes, memory_bytes),
            output_bytes=self.output_bytes,
            log_bytes=self.log_bytes,
        )


def _lower(default: int, requested: int | None) -> int:
    if requested is None or requested <= 0:
        return default
    return min(default, requested)


class Metering(msgspec.Struct, kw_only=True, frozen=True):
    """What one execution used; travels in every reply."""

    fuel_consumed: int = 0
    wall_time_us: int = 0
    peak_memory_bytes: int = 0
