"""Load once, serve everywhere: shared artifacts, version catch-up, hot reload, durable registry."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import msgspec
import pytest
import zmq

from tests.conftest import HOSTILE, PLUGINS, wait_for
from wasmcore.client.launcher import render_toml, start_service
from wasmcore.protocol import errors
from wasmcore.protocol import messages as p
from wasmcore.protocol.settings import WorkerSettings


def test_compiled_once_then_deserialized_by_other_workers():
    svc = start_service(workers=2, config={"pool": {"heartbeat_interval_ms": 50}})
    try:
        with svc.client() as c:
            wordfreq = c.load(PLUGINS / "wordfreq.wasm").binary_id
            for _ in range(20):
                assert c.execute(wordfreq, "b a b").output.startswith(b"b 2\n")

            def counters():
                stats = c.stats()
                workers = stats.workers + stats.compile_workers
                return (sum(w.compiled for w in workers), sum(w.deserialized for w in workers))

            # One compile in the whole service, by the compile lane; both executing workers
            # only mapped the artifact.
            assert wait_for(lambda: counters() == (1, 2) and counters(), 5, "counters")
            art = list((svc.workdir / "art").glob("*.cwasm"))
            assert len(art) == 1 and art[0].name.startswith(
                hashlib.sha256((PLUGINS / "wordfreq.wasm").read_bytes()).hexdigest())
    finally:
        svc.cleanup()


def test_worker_that_missed_broadcasts_runs_only_current_versions(tmp_path: Path):
    """Drive a real worker process from the test, acting as its supervisor, and never
    broadcast: every job names its exact version and the worker catches up by itself."""
    run_dir = Path(tempfile.mkdtemp(prefix="wcw", dir="/tmp"))
    ctx = zmq.Context()
    back = ctx.socket(zmq.ROUTER)
    pub = ctx.socket(zmq.PUB)
    back.bind(f"ipc://{run_dir}/b")
    pub.bind(f"ipc://{run_dir}/p")
    settings = WorkerSettings(worker_id="wtest", back_endpoint=f"ipc://{run_dir}/b",
                              pub_endpoint=f"ipc://{run_dir}/p", parent_pid=os.getpid())
    worker = subprocess.Popen([sys.executable, "-m", "wasmcore.sandbox_worker",
                               msgspec.json.encode(settings).decode()])
    try:
        assert back.poll(30_000), "worker never said ready"
        identity, ready = back.recv_multipart()
        assert isinstance(p.event_decoder.decode(ready), p.Ready)

        def run(version: int, source: Path, token: int) -> bytes:
            blob = tmp_path / f"v{version}.wasm"
            shutil.copyfile(source, blob)
            sha = hashlib.sha256(blob.read_bytes()).hexdigest()
            ref = p.ModuleRef(binary_id="b", version=version, sha256=sha, blob_path=str(blob),
                              artifact_path=str(tmp_path / f"{sha}.cwasm"))
            job = p.RunJob(token=token, request_id=token, modules=[ref], timeout_ms=5000,
                           fuel=10**9, memory_bytes=16 * 2**20)
            back.send_multipart([identity, p.encode(job), b"abc"])
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                assert back.poll(30_000)
                frames = back.recv_multipart()
                event = p.event_decoder.decode(frames[1])
                if isinstance(event, p.DonePack):  # small replies come packed
                    (done,), (header,), (payload,) = event.done, event.replies, event.payloads
                    assert done.token == token and not done.code
                    reply = p.reply_decoder.decode(header)
                    assert reply.version == version and payload is not None
                    return payload
            raise AssertionError("no reply")

        assert run(1, PLUGINS / "uppercase.wasm", 1) == b"ABC"
        # A stale broadcast (version 1 again) arrives after the job for version 2 was sent:
        assert run(2, PLUGINS / "rot13.wasm", 2) == b"nop"
        pub.send(p.encode(p.Broadcast(sha256="0" * 64,
                                      artifact_path="/nonexistent")))
        assert run(2, PLUGINS / "rot13.wasm", 3) == b"nop"
        assert run(3, PLUGINS / "counter.wasm", 4) == b"bytes=3 words=1 lines=1"
    finally:
        worker.kill()
        worker.wait(timeout=10)
        back.close(0)
        pub.close(0)
        ctx.term()
        shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture
def reload_service():
    svc = start_service(workers=2)
    try:
        yield svc
    finally:
        svc.cleanup()


def test_hot_reload_in_place_and_by_rename(reload_service, tmp_path: Path):
    svc = reload_service
    target = tmp_path / "live.wat"
    shutil.copyfile(PLUGINS / "uppercase.wat", target)
    with svc.client() as c:
        loaded = c.load(target)
        assert c.execute(loaded.binary_id, "abc").output == b"ABC"
        # In-place write.
        target.write_bytes((PLUGINS / "rot13.wat").read_bytes())
        wait_for(lambda: c.execute(loaded.binary_id, "abc").output == b"nop", 10, "v2")
        v2 = c.list()[0].version
        assert v2 == loaded.version + 1
        # An editor's save: write a temp file beside it, rename it over the original.
        temp = tmp_path / ".live.wat.swp"
        temp.write_bytes((PLUGINS / "counter.wat").read_bytes())
        os.replace(temp, target)
        wait_for(lambda: c.execute(loaded.binary_id, "abc").output.startswith(b"bytes="), 10,
                 "v3")
        # Broken content: refused, the last good version keeps serving, the error is shown.
        target.write_bytes(b"(module (func")
        wait_for(lambda: c.list()[0].last_error, 10, "error recorded")
        assert c.execute(loaded.binary_id, "abc").output.startswith(b"bytes=")
        assert "INVALID_MODULE" in c.stats().binaries[0].last_error
        # Fixed again: serves, error cleared.
        target.write_bytes((PLUGINS / "uppercase.wat").read_bytes())
        wait_for(lambda: c.execute(loaded.binary_id, "abc").output == b"ABC", 10, "fixed")
        assert c.list()[0].last_error is None


def test_config_hot_reload(tmp_path: Path):
    svc = start_service(workers=1, config={"binaries": {"multi_entry": {"entries": ["hello"]}}})
    try:
        with svc.client() as c:
            multi = c.load(PLUGINS / "multi_entry.wat").binary_id
            assert c.execute(multi).output == b"hello"  # first allowed entry
            with pytest.raises(errors.Forbidden):
                c.execute(multi, entry="fail")
            config = tomllib.loads(svc.config_path.read_text())
            # A change: two workers, a lower timeout, another entry list.
            config["pool"]["workers"] = 2
            config["limits"] = {"timeout_ms": 250}
            config["binaries"]["multi_entry"]["entries"] = ["fail", "hello"]
            svc.config_path.write_text(render_toml(config))
            wait_for(lambda: len([w for w in c.stats().workers if w.state == "idle"]) == 2,
                     20, "pool grown to 2")
            with pytest.raises(errors.PluginError):
                c.execute(multi)  # "fail" now comes first
            loop = c.load(HOSTILE / "loop.wat").binary_id
            with pytest.raises(errors.Timeout) as stopped:
                c.execute(loop, "x")  # the new 250 ms default
            assert stopped.value.details["timeout_ms"] == 250
            # An invalid change is refused and the running config stays.
            good = svc.config_path.read_text()
            svc.config_path.write_text(good + "\n[pool2]\nworkerz = 3\n")
            error = wait_for(lambda: c.stats().config_error, 10, "refusal")
            assert "pool2" in error
            assert len(c.stats().workers) == 2
            with pytest.raises(errors.PluginError):
                c.execute(multi)
            svc.config_path.write_text(good)
            wait_for(lambda: c.stats().config_error is None, 10, "accepted again")
    finally:
        svc.cleanup()


def test_invalid_config_at_start_names_key_and_line(tmp_path: Path):
    config = tmp_path / "bad.toml"
    config.write_text(
        "[server]\nlog_level = 'info'\n\n[pool]\nworkers = 2\nheartbeat_intervl_ms = 5\n"
    )
    done = subprocess.run([sys.executable, "-m", "wasmcore.supervisor.cli_server", "--config",
                           str(config)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "heartbeat_intervl_ms" in done.stderr and "line 6" in done.stderr
    config.write_text("[limits]\ntimeout_ms = -5\n")
    done = subprocess.run([sys.executable, "-m", "wasmcore.supervisor.cli_server", "--config",
                           str(config)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "limits.timeout_ms" in done.stderr and "line 2" in done.stderr


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGKILL])
def test_registry_survives_restart(stop_signal):
    workdir = Path(tempfile.mkdtemp(prefix="wcr", dir="/tmp"))
    try:
        svc = start_service(workers=1, workdir=workdir)
        with svc.client() as c:
            upper = c.load(PLUGINS / "uppercase.wat")
            named = c.load(data=(PLUGINS / "rot13.wasm").read_bytes(), name="r13")
            named = c.load(data=(PLUGINS / "counter.wasm").read_bytes(), name="r13")
            assert named.version == 2
        svc.process.send_signal(stop_signal)
        svc.process.wait(timeout=30)
        if stop_signal == signal.SIGKILL:
            time.sleep(0.5)  # orphaned workers exit by themselves (PR_SET_PDEATHSIG)
        svc = start_service(workers=1, workdir=workdir)
        try:
            with svc.client() as c:
                listed = {b.binary_id: b for b in c.list()}
                assert listed[upper.binary_id].version == 1
                assert listed[named.binary_id].version == 2
                assert c.execute(upper.binary_id, "back").output == b"BACK"
                assert c.execute(named.binary_id, "a b").output == b"bytes=3 words=2 lines=1"
                again = c.load(data=(PLUGINS / "counter.wasm").read_bytes(), name="r13")
                assert again.binary_id == named.binary_id and not again.changed
        finally:
            svc.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(Path("/dev/shm") / workdir.name, ignore_errors=True)  # its payload dir
