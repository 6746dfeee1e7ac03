"""Shared fixtures: a real supervisor with real workers on ipc endpoints in a short temp dir."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from wasmcore.supervisor.launcher import RunningService, start_service

PLUGINS = Path(__file__).resolve().parent.parent / "plugins"
HOSTILE = PLUGINS / "hostile"


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
