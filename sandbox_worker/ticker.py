"""The epoch ticker: advances a Sandbox's engine epoch every tick.

Wasm code checks the epoch at function entries and loop back-edges; a store whose deadline
(in ticks) has passed traps with INTERRUPT, which is how wall-clock timeouts are enforced
without signals or a watchdog process.

Three implementations, the first that works is used:
* `NativeEpochTicker` (default where the native library loads, sandbox_worker/fastcall.py):
  one C thread of `native/fastcall.c` that sleeps on the monotonic clock and increments the
  epoch; no Python, no GIL, no thread created per tick, and `stop()` returns only once the
  thread has exited, so it never calls into an engine after that.
* `PosixEpochTimer` (Linux/glibc): a POSIX timer (SIGEV_THREAD) whose notify
  function *is* `wasmtime_engine_increment_epoch`, with the engine pointer as its argument.
  No Python runs per tick, so the ticker never takes the GIL. Why it matters: a Python thread
  waking every 1 ms steals the GIL from the executing thread at its next ctypes call, and
  each handoff costs that execution tens of microseconds (measured p99 ~54 us vs ~22 us
  for a 13 us execution; see docs/performance.md). glibc starts a new thread for every
  expiry, though (100 a second at 10 ms ticks), and an expiry already handed to its thread
  may land after `timer_delete`: hence the grace period below.
* `EpochTicker`: one daemon Python thread (portable fallback).
"""

from __future__ import annotations

import atexit
import collections
import ctypes
import ctypes.util
import os
import sys
import threading
import time
import weakref
from typing import Any, Protocol

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


class Ticker(Protocol):
    def stop(self) -> None: ...


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class _Sigevent(ctypes.Structure):
    # glibc x86_64/aarch64 layout: sigval (8), signo (4), notify (4), then the union whose
    # SIGEV_THREAD member is {function, attributes}; 64 bytes in total.
    _fields_ = [
        ("sigev_value", ctypes.c_void_p),
        ("sigev_signo", ctypes.c_int),
        ("sigev_notify", ctypes.c_int),
        ("sigev_notify_function", ctypes.c_void_p),
        ("sigev_notify_attributes", ctypes.c_void_p),
        ("_pad", ctypes.c_byte * 32),
    ]


_SIGEV_THREAD = 2
_CLOCK_MONOTONIC = 1

# timer_delete does not wait for a notification already handed to its thread: that thread may
# call increment_epoch(engine) after stop() returns. Stopped timers' engines are kept alive
# for a grace period, so such a late call never touches a freed engine (seen as a rare
# segfault in a process that creates and drops many Sandboxes, e.g. the test suite; a loop
# creating and closing Sandboxes with a 20 us tick crashed within seconds without it). At most
# _MAX_RETIRED engines wait at once: each holds its pooling allocator's address space, so a
# caller dropping Sandboxes faster than that waits for the oldest grace to end.
_LATE_NOTIFY_GRACE_S = 0.5
_MAX_RETIRED = 16
_retired_engines: collections.deque[tuple[float, wasmtime.Engine]] = collections.deque()


_retired_lock = threading.Lock()


def _keep_alive_briefly(engine: wasmtime.Engine) -> None:
    with _retired_lock:
        now = time.monotonic()
        while _retired_engines and (_retired_engines[0][0] <= now
                                    or len(_retired_engines) >= _MAX_RETIRED):
            time.sleep(max(0.0, _retired_engines[0][0] - now))
            _retired_engines.popleft()
            now = time.monotonic()
        _retired_engines.append((now + _LATE_NOTIFY_GRACE_S, engine))


_live_timers: weakref.WeakSet[PosixEpochTimer | NativeEpochTicker] = weakref.WeakSet()
# At exit, how long to let notifications already handed to timer threads land (a late one is
# a thread that was about to call increment_epoch; it needs microseconds, not the full grace).
_EXIT_GRACE_S = 0.1


def _stop_timers_at_exit() -> None:
    """Interpreter exit frees objects in no particular order, so an engine could go before a
    timer still calling into it (seen as a segfault at exit of a process that never closed its
    Sandbox). Stop every timer first, and let notifications in flight land."""
    for timer in list(_live_timers):
        timer.stop()
    with _retired_lock:
        last = max((deadline for deadline, _ in _retired_engines), default=0.0)
    time.sleep(min(_EXIT_GRACE_S, max(0.0, last - time.monotonic())))


atexit.register(_stop_timers_at_exit)


class PosixEpochTimer:
    """A periodic POSIX timer calling wasmtime_engine_increment_epoch(engine) with no GIL.

    `union sigval` holding a pointer is passed exactly like a pointer argument on the
    supported ABIs (x86_64 SysV, aarch64), so the C function can be the notify function.
    """

    def __init__(self, engine: wasmtime.Engine, period_s: float) -> None:
        if not sys.platform.startswith("linux"):
            raise OSError("POSIX SIGEV_THREAD timers are only used on Linux")
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        self._timer_create = libc.timer_create
        self._timer_settime = libc.timer_settime
        self._timer_delete = libc.timer_delete
        # The engine must outlive the timer (and any notification still in flight).
        self._engine = engine
        event = _Sigevent()
        event.sigev_value = _raw.addr(engine)
        event.sigev_notify = _SIGEV_THREAD
        event.sigev_notify_function = _raw.engine_increment_epoch_addr
        self._timer = ctypes.c_void_p()
        if self._timer_create(_CLOCK_MONOTONIC, ctypes.byref(event), ctypes.byref(self._timer)):
            raise OSError(ctypes.get_errno(), "timer_create failed")
        nanos = max(1, int(period_s * 1e9))
        period = _Timespec(nanos // 1_000_000_000, nanos % 1_000_000_000)
        spec = _Itimerspec(period, period)
        if self._timer_settime(self._timer, 0, ctypes.byref(spec), None):
            errno = ctypes.get_errno()
            self._timer_delete(self._timer)
            raise OSError(errno, "timer_settime failed")
        self._armed = True
        _live_timers.add(self)

    def stop(self) -> None:
        if self._armed:
            self._armed = False
            self._timer_delete(self._timer)
            _keep_alive_briefly(self._engine)

    def __del__(self) -> None:
        # A timer left armed would keep calling into its engine after the engine is freed.
        if getattr(self, "_armed", False):
            self.stop()


class NativeEpochTicker:
    """The native library's ticker thread (fastcall.c's fc_ticker_*), calling
    wasmtime_engine_increment_epoch(engine) every period with no GIL."""

    def __init__(self, lib: Any, engine: wasmtime.Engine, period_s: float) -> None:
        # The engine must outlive the thread: stop() joins it before this reference goes.
        self._engine = engine
        self._stop_fn = lib.fc_ticker_stop
        self._handle = lib.fc_ticker_start(_raw.engine_increment_epoch_addr, _raw.addr(engine),
                                           max(1, int(period_s * 1e9)))
        if not self._handle:
            raise OSError("fc_ticker_start failed")
        _live_timers.add(self)

    def stop(self) -> None:
        handle, self._handle = self._handle, None
        if handle:
            self._stop_fn(handle)  # returns after the thread has exited

    def __del__(self) -> None:
        if getattr(self, "_handle", None):
            self.stop()


def _native_library() -> Any:
    """The native library when it loads and has the ticker, else None."""
    from . import fastcall  # imported late: fastcall imports the host functions

    if os.environ.get(fastcall.DISABLE_ENV, "1") == "0":
        return None
    lib = fastcall.library()
    if lib is None or not hasattr(lib, "fc_ticker_start"):
        return None
    lib.fc_ticker_start.restype = ctypes.c_void_p
    lib.fc_ticker_start.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    lib.fc_ticker_stop.restype = None
    lib.fc_ticker_stop.argtypes = [ctypes.c_void_p]
    return lib


def start_ticker(engine: wasmtime.Engine, period_s: float, native: bool = True) -> Ticker:
    """With `native`: the native library's ticker thread, else the POSIX timer (both GIL-free);
    a Python thread when neither is available."""
    if native:
        lib = _native_library()
        if lib is not None:
            try:
                return NativeEpochTicker(lib, engine, period_s)
            except OSError:
                pass
        try:
            return PosixEpochTimer(engine, period_s)
        except (OSError, AttributeError):
            pass
    return EpochTicker(engine, period_s)
