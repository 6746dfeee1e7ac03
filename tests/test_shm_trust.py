"""The shared-memory sweep survives anything it finds in the shared-memory directory, and each
instance has a directory of its own."""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import sys
from pathlib import Path

from wasmcore.protocol import shm
from wasmcore.supervisor.config import Config, ServerConfig, resolved


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(timeout=30)
    return child.pid


def _segment_name(pid: int) -> str:
    return f"wc-{pid}-{secrets.token_hex(16)}"


# --------------------------------------------------------------------------- the sweep itself


def test_sweep_handles_each_entry_on_its_own(tmp_path: Path, caplog) -> None:
    dead = _dead_pid()
    garbage = [_segment_name(dead), _segment_name(2**31), _segment_name(2**63 - 1),
               _segment_name(0), _segment_name(10**30)]
    for name in garbage:
        (tmp_path / name).write_bytes(b"g")
    alive = _segment_name(os.getpid())
    (tmp_path / alive).write_bytes(b"mine")
    not_ours = ["wc--1-" + secrets.token_hex(16), "notes.txt", _segment_name(dead) + ".tmp"]
    for name in not_ours:
        (tmp_path / name).write_bytes(b"n")
    as_dir = _segment_name(dead)
    (tmp_path / as_dir).mkdir()
    (tmp_path / as_dir / "inside").write_bytes(b"i")
    target = tmp_path / "target"
    target.mkdir()
    (target / "file").write_bytes(b"t")
    as_symlink = _segment_name(dead)
    (tmp_path / as_symlink).symlink_to(target)
    with caplog.at_level(logging.WARNING):
        assert shm.sweep(tmp_path) == len(garbage)
    left = set(os.listdir(tmp_path))
    assert left == {alive, *not_ours, as_dir, as_symlink, "target"}
    assert (target / "file").read_bytes() == b"t"
    assert "not a regular file" in caplog.text
    assert shm.sweep(tmp_path) == 0  # and again: nothing more, nothing raised


def test_sweep_of_a_missing_or_unreadable_dir_returns_nothing(tmp_path: Path) -> None:
    assert shm.sweep(tmp_path / "missing") == 0
    not_a_dir = tmp_path / "file"
    not_a_dir.write_bytes(b"")
    assert shm.sweep(not_a_dir) == 0


def test_sweep_survives_an_unlink_that_fails(tmp_path: Path, monkeypatch) -> None:
    names = [_segment_name(_dead_pid()) for _ in range(3)]
    for name in names:
        (tmp_path / name).write_bytes(b"g")
    real_unlink = os.unlink
    calls: list[str] = []

    def flaky_unlink(path, *args, **kwargs):
        calls.append(str(path))
        if len(calls) == 1:
            raise PermissionError(13, "Permission denied", str(path))
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", flaky_unlink)
    assert shm.sweep(tmp_path) == 2
    assert len(os.listdir(tmp_path)) == 1


# --------------------------------------------------------------------------- one dir per instance


def test_each_instance_has_its_own_default_shm_dir() -> None:
    one = resolved(Config(server=ServerConfig(endpoint="ipc:///tmp/a/wasm-core.sock")))
    two = resolved(Config(server=ServerConfig(endpoint="tcp://127.0.0.1:5555")))
    three = resolved(Config(server=ServerConfig(endpoint="tcp://127.0.0.1:5556")))
    dirs = {one.server.shm_dir, two.server.shm_dir, three.server.shm_dir}
    assert len(dirs) == 3
    again = resolved(Config(server=ServerConfig(endpoint="tcp://127.0.0.1:5555")))
    assert again.server.shm_dir == two.server.shm_dir  # a restart finds its own dir again
    explicit = resolved(Config(server=ServerConfig(endpoint="tcp://127.0.0.1:5555",
                                                   shm_dir="/dev/shm/mine")))
    assert explicit.server.shm_dir == "/dev/shm/mine"
