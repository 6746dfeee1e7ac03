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
