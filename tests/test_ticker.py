"""The epoch ticker at interpreter exit: every POSIX timer is stopped before objects are freed
(an engine freed before the timer calling into it crashed processes that never closed their
Sandbox, about one exit in fifteen with fast ticks)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import wasmtime

from wasmcore.sandbox_worker import ticker

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX timers: Linux only")
def test_the_exit_hook_disarms_every_live_timer():
    timers = [ticker.PosixEpochTimer(wasmtime.Engine(), 0.0001) for _ in range(3)]
    assert all(timer in ticker._live_timers for timer in timers)
    ticker._stop_timers_at_exit()
    assert not any(timer._armed for timer in timers)
    ticker._stop_timers_at_exit()  # idempotent: a stopped timer is not deleted twice


@pytest.mark.timeout(60)
def test_a_process_that_never_closes_its_sandboxes_exits_cleanly():
    script = textwrap.dedent("""
        from wasmcore.protocol.settings import SandboxConfig
        from wasmcore.sandbox_worker.runtime import Sandbox
        kept = []
        for _ in range(4):
            sandbox = Sandbox(SandboxConfig(epoch_tick_ms=0.02))
            sandbox.execute(sandbox.compile(open("plugins/uppercase.wasm", "rb").read()), b"x")
            kept.append(sandbox)  # never closed: left to interpreter exit
    """)
    for _ in range(5):
        done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                              text=True, timeout=30)
        assert done.returncode == 0, (done.returncode, done.stderr[-2000:])


def _task_count() -> int:
    return len(list(Path("/proc/self/task").iterdir()))


native_only = pytest.mark.skipif(ticker._native_library() is None,
                                 reason="the native library does not load here")


@native_only
def test_the_native_ticker_is_one_thread_that_is_gone_when_stop_returns():
    before = _task_count()
    engine = wasmtime.Engine(wasmtime.Config())
    timer = ticker.start_ticker(engine, 0.0001)
    assert isinstance(timer, ticker.NativeEpochTicker)
    assert _task_count() == before + 1
    timer.stop()
    assert _task_count() == before  # joined: nothing can call into the engine any more
    timer.stop()  # idempotent


@native_only
def test_engines_dropped_right_after_their_native_ticker_stops_are_safe():
    # The POSIX timer needed a grace period for this (a late expiry hit a freed engine);
    # the native ticker's stop joins its thread, so the engine may go at once.
    for _ in range(200):
        engine = wasmtime.Engine(wasmtime.Config())
        timer = ticker.NativeEpochTicker(ticker._native_library(), engine, 0.00002)
        timer.stop()
        del timer, engine


def test_without_the_native_path_the_posix_timer_or_a_thread_ticks(monkeypatch):
    monkeypatch.setenv("WASMCORE_NATIVE", "0")
    timer = ticker.start_ticker(wasmtime.Engine(wasmtime.Config()), 0.001)
    try:
        assert not isinstance(timer, ticker.NativeEpochTicker)
    finally:
        timer.stop()
