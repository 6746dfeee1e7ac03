"""The epoch ticker: one daemon thread per Sandbox advancing the engine's epoch.

Wasm code checks the epoch at function entries and loop back-edges; a store whose deadline
(in ticks) has passed traps with INTERRUPT, which is how wall-clock timeouts are enforced
without signals or a watchdog process.
"""

from __future__ import annotations

import threading
import time

import wasmtime

from . import _raw


class EpochTicker:
    """Increments `engine`'s epoch every `period_s` until `stop()`.

    The epoch tracks elapsed wall time rather than loop iterations: if the thread wakes late
    (scheduler pressure, GIL contention) it catches up with several increments, so a timeout
    never stretches by the amount of oversleep.
    """

    def __init__(self, engine: wasmtime.Engine, period_s: float, name: str = "wasm-epoch") -> None:
        # Holding the Engine keeps the native engine alive as long as this thread uses it.
        self._engine = engine
        self._engine_addr = _raw.addr(engine)
        self._period_s = period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        period = self._period_s
        increment = _raw.engine_increment_epoch
        engine = self._engine_addr
        next_at = time.monotonic() + period
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            now = time.monotonic()
            while next_at <= now:
                increment(engine)
                next_at += period

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=1.0)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()
