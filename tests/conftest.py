"""Shared fixtures: a real supervisor with real workers on ipc endpoints in a short temp dir."""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import zmq

from wasmcore.client.launcher import RunningService, start_service
from wasmcore.protocol import messages as p

PLUGINS = Path(__file__).resolve().parent.parent / "plugins"
HOSTILE = PLUGINS / "hostile"
# A pool that notices a dead or stuck worker and replaces it quickly (fault tests).
FAST_POOL = {
    "heartbeat_interval_ms": 100,
    "heartbeat_timeout_ms": 1000,
    "watchdog_interval_ms": 100,
    "deadline_grace_ms": 500,
    "restart_backoff_initial_ms": 50,
}

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout_s: float, what: str) -> T:
    """Poll until `predicate` returns something truthy, and return it; the error on timeout
    names what was awaited and the last value seen."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what} (last: {last!r})")


@contextlib.contextmanager
def readable_dir(prefix: str, files: dict[str, str]) -> Iterator[Path]:
    """A directory of text files that the workers can read (they run as nobody when the tests
    run as root), for mapping into a plugin's view; removed afterwards."""
    directory = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        os.chmod(directory, 0o755)
        for name, text in files.items():
            (directory / name).write_text(text)
            os.chmod(directory / name, 0o644)
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def raw_dealer(endpoint: str) -> Iterator[zmq.Socket[bytes]]:
    """A bare DEALER on the service, for frames the real client would never send."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        yield sock
    finally:
        sock.close()


def exchange(sock: zmq.Socket[bytes], frames: list[bytes], timeout_ms: int = 10_000) -> Any:
    """Send raw frames and decode the one reply, within a bound."""
    sock.send_multipart(frames)
    assert sock.poll(timeout_ms), f"no reply to {frames!r}"
    return p.reply_decoder.decode(sock.recv_multipart()[0])


@pytest.fixture(scope="module")
def service() -> Iterator[RunningService]:
    """One service per test module: 2 workers, default limits."""
    running = start_service(workers=2)
    try:
        yield running
    finally:
        running.cleanup()


@pytest.fixture
def plugin_copy(tmp_path: Path):
    """Copy a plugin to a private path so a test can rewrite it."""

    def copy(name: str, to: str | None = None) -> Path:
        target = tmp_path / (to or Path(name).name)
        shutil.copyfile(PLUGINS / name, target)
        return target

    return copy


def spin_input(millions: int) -> bytes:
    """hostile/rss_hog's input: touch no memory, spin `millions` million iterations."""
    return struct.pack("<II", 0, millions)


@pytest.fixture(scope="module")
def lane_service() -> Iterator[RunningService]:
    """A service for direct-lane tests: 2 workers (a lease needs another idle), leases that
    end after 300 ms (so what ran on them is counted within the tests' waits), fast fault
    detection, and a host method that sleeps as long as it is asked."""
    svc = start_service(workers=2, config={
        "pool": {**FAST_POOL, "lease_ms": 300},
        "host_methods": {"slow": {"target": "wasmcore.plugins.methods:slow", "tenants": "*",
                                  "timeout_ms": 60_000}},
    })
    try:
        yield svc
    finally:
        svc.cleanup()
