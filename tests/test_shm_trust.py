"""Shared-memory segments trust nothing a client says: no owner pid is taken from a request,
a lent segment is used only if it is a plain file of ours, and the sweep survives anything it
finds in the shared-memory directory."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from tests.conftest import PLUGINS, raw_dealer, wait_for
from wasmcore.client.launcher import RunningService, start_service
from wasmcore.protocol import messages as p
from wasmcore.protocol import shm
from wasmcore.supervisor.config import Config, ServerConfig, resolved

# Owner pids an attacker may claim: past what os.kill takes, past a 64-bit pid, and ones a
# liveness check always finds alive (-1: every process; 1: init).
FORGED_PIDS = [2**31, 2**63 - 1, -1, 1]
BIG = 300 * 1024  # above the default 256 KiB threshold: the output would go to a segment
FAST_POOL = {"heartbeat_interval_ms": 100, "heartbeat_timeout_ms": 1000}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(timeout=30)
    return child.pid


def _segment_name(pid: int) -> str:
    return f"wc-{pid}-{secrets.token_hex(16)}"


def _wait_for_a_sweep(shm_dir: Path) -> None:
    """Until the supervisor has swept `shm_dir` once more: a dead process's segment, placed
    now, is gone."""
    canary = shm_dir / _segment_name(_dead_pid())
    canary.write_bytes(b"canary")
    wait_for(lambda: not canary.exists(), 15, "a sweep to remove a dead pid's segment")


def _forged_execute(request_id: int, binary_id: str, pid: int) -> bytes:
    # Encoded by hand: the field is no longer part of Execute, and an old or hostile client
    # may still send it.
    return msgspec.msgpack.encode({"type": "execute", "id": request_id, "binary_id": binary_id,
                                   "output_shm_pid": pid})


@pytest.fixture
def workdir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="wc", dir="/tmp"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        shutil.rmtree(Path("/dev/shm") / directory.name, ignore_errors=True)


def _start(workdir: Path, endpoint: str | None, config: dict | None) -> RunningService:
    return start_service(workers=2, workdir=workdir, endpoint=endpoint, config=config)


@pytest.mark.parametrize("transport", ["ipc", "tcp"])
def test_forged_output_shm_pid_cannot_hurt_the_service(transport: str, workdir: Path) -> None:
    endpoint = f"tcp://127.0.0.1:{_free_port()}" if transport == "tcp" else None
    # Plain tcp (no keys): what is tested here is what a forged pid can do to the server.
    svc = _start(workdir, endpoint, {"pool": FAST_POOL,
                                     "server": {"allow_unauthenticated_tcp": True}})
    try:
        with svc.client() as c:
            upper = c.load(PLUGINS / "uppercase.wat").binary_id
        data = b"x" * BIG
        with raw_dealer(svc.endpoint) as sock:
            for request_id, pid in enumerate(FORGED_PIDS, start=1):
                sock.send_multipart([_forged_execute(request_id, upper, pid), data])
                assert sock.poll(30_000), f"no reply for output_shm_pid={pid}"
                frames = sock.recv_multipart()
                reply = p.reply_decoder.decode(frames[0])
                # No segment of its own for a client that lent none: the output comes inline.
                assert isinstance(reply, p.Executed) and reply.id == request_id, reply
                assert reply.output_shm is None and frames[1:] == [data.upper()]
        _wait_for_a_sweep(svc.shm_dir)
        assert svc.process.poll() is None, "the supervisor died"
        names = os.listdir(svc.shm_dir)
        assert not [n for n in names for pid in FORGED_PIDS if n.startswith(f"wc-{pid}-")]
        with svc.client() as other:
            assert other.execute(upper, data).output == data.upper()
            assert other.execute(upper, "after").output == b"AFTER"
        assert svc.stop() == 0
        again = _start(workdir, svc.endpoint, None)  # same config file, same shm dir
        try:
            with again.client() as c:
                assert c.execute(upper, "restarted").output == b"RESTARTED"
        finally:
            again.stop()
    finally:
        svc.stop()


def test_sweep_survives_what_it_finds_in_the_shm_dir(workdir: Path, tmp_path: Path) -> None:
    svc = _start(workdir, None, {"pool": FAST_POOL})
    try:
        with svc.client() as c:
            upper = c.load(PLUGINS / "uppercase.wat").binary_id
        dead = _dead_pid()
        (svc.shm_dir / _segment_name(dead)).mkdir()  # a directory named like a segment
        target = tmp_path / "not-a-segment"
        target.write_bytes(b"keep me")
        (svc.shm_dir / _segment_name(dead)).symlink_to(target)
        _wait_for_a_sweep(svc.shm_dir)
        assert svc.process.poll() is None, "the supervisor died"
        assert target.read_bytes() == b"keep me"
        with svc.client() as c:
            assert c.execute(upper, b"y" * BIG).output == b"Y" * BIG
        assert svc.stop() == 0
        again = _start(workdir, svc.endpoint, None)
        again.stop()
    finally:
        svc.stop()


def test_output_goes_only_into_a_plain_segment_of_the_callers(workdir: Path,
                                                              tmp_path: Path) -> None:
    """A lent segment that is a directory, a symlink, a hard link or missing is left alone:
    the output comes back inline."""
    svc = _start(workdir, None, {"pool": FAST_POOL})
    try:
        directory = svc.shm_dir
        outside = tmp_path / "outside"
        outside.write_bytes(b"outside")
        linked = shm.write(directory, os.getpid(), b"hard-linked")
        os.link(directory / linked.name, directory / "second-name")  # same filesystem
        as_dir = _segment_name(os.getpid())
        (directory / as_dir).mkdir()
        as_symlink = _segment_name(os.getpid())
        (directory / as_symlink).symlink_to(outside)
        data = b"z" * BIG
        with svc.client() as c:
            upper = c.load(PLUGINS / "uppercase.wat").binary_id
            for lent in (as_dir, as_symlink, linked.name, _segment_name(os.getpid())):
                reply, frames = c.call(p.Execute(binary_id=upper, output_shm_into=lent), data)
                assert isinstance(reply, p.Executed) and reply.output_shm is None, lent
                assert frames == [data.upper()]
        assert outside.read_bytes() == b"outside"
        assert (directory / "second-name").read_bytes() == b"hard-linked"
        assert svc.process.poll() is None
    finally:
        svc.stop()


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
