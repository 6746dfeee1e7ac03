"""WASI commands that do real work, through the real server: arguments, a private scratch
directory at /tmp per execution (size-checked, removed after), the operator's read-only
directories, stderr in the logs. The tool is plugins/c/wasi_files.c (clang + wasi-libc)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from tests.conftest import PLUGINS, exchange, raw_dealer, readable_dir, wait_for
from wasmcore.client import AsyncClient
from wasmcore.client.launcher import RunningService, start_service
from wasmcore.protocol import messages as p
from wasmcore.protocol.errors import BadRequest, PluginError, ScratchLimit
from wasmcore.protocol.limits import MiB
from wasmcore.supervisor.config import ConfigError, parse_config

WORDS = "cat\nmat\non\nsat\nthe\n"
# A command with a core-ABI entry too: `_start` writes "started" to stdout; `process` (the
# core ABI) outputs "process:" and its input through host.output.
START_AND_PROCESS_WAT = """
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "host" "output" (func $output (param i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "started")
  (data (i32.const 16) "process:")
  (global $heap (mut i32) (i32.const 1024))
  (func (export "alloc") (param $len i32) (result i32)
    (local $ptr i32)
    (local.set $ptr (global.get $heap))
    (global.set $heap (i32.add (local.get $ptr) (local.get $len)))
    (local.get $ptr))
  (func (export "_start")
    (i32.store (i32.const 32) (i32.const 0))
    (i32.store (i32.const 36) (i32.const 7))
    (drop (call $fd_write (i32.const 1) (i32.const 32) (i32.const 1) (i32.const 40))))
  (func (export "process") (param i32 i32 i32 i32) (result i32)
    (call $output (i32.const 16) (i32.const 8))
    (call $output (local.get 0) (local.get 1))
    (i32.const 0)))
"""

# A core module in the shape of a WASI reactor: `_initialize` sets $ready; `process` writes
# "to stdout" through WASI (a core module's stdout is its log) and outputs "ready=N".
REACTOR_WAT = """
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "host" "output" (func $output (param i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "to stdout\\n")
  (data (i32.const 16) "ready=0")
  (global $ready (mut i32) (i32.const 0))
  (global $heap (mut i32) (i32.const 1024))
  (func (export "_initialize") (global.set $ready (i32.const 7)))
  (func (export "alloc") (param $len i32) (result i32)
    (local $ptr i32)
    (local.set $ptr (global.get $heap))
    (global.set $heap (i32.add (local.get $ptr) (local.get $len)))
    (local.get $ptr))
  (func (export "process") (param i32 i32 i32 i32) (result i32)
    (i32.store (i32.const 32) (i32.const 0))
    (i32.store (i32.const 36) (i32.const 10))
    (drop (call $fd_write (i32.const 1) (i32.const 32) (i32.const 1) (i32.const 40)))
    (i32.store8 (i32.const 22) (i32.add (i32.const 48) (global.get $ready)))
    (call $output (i32.const 16) (i32.const 7))
    (i32.const 0)))
"""


@pytest.fixture(scope="module")
def dict_dir() -> Iterator[Path]:
    with readable_dir("wcdict", {"words.txt": WORDS}) as directory:
        yield directory


@pytest.fixture(scope="module")
def wasi_service(dict_dir: Path) -> Iterator[RunningService]:
    running = start_service(workers=2, config={
        "wasi": {"scratch_mb": 1},
        # The key quoted: render_toml writes keys as they are.
        "binaries": {"wasi_files": {"dirs": {'"/data"': str(dict_dir)}}},
    })
    try:
        yield running
    finally:
        running.cleanup()


@pytest.fixture(scope="module")
def files_id(wasi_service: RunningService) -> str:
    with wasi_service.client() as client:
        return client.load(PLUGINS / "wasi_files.wasm").binary_id


def scratch_root(service: RunningService) -> Path:
    return service.workdir / "data" / "scratch"


def scratch_contents(service: RunningService) -> list[str]:
    """What is left in the workers' scratch directories (each worker keeps one, empty
    between executions)."""
    return [name for kept in scratch_root(service).iterdir() for name in os.listdir(kept)]


def test_arguments_arrive_with_the_binary_name_as_argv0(wasi_service, files_id):
    with wasi_service.client() as client:
        done = client.execute(files_id, args=["args", "two words", "-x", "ünï", ""])
    assert done.output == "wasi_files\nargs\ntwo words\n-x\nünï\n\n".encode()
    assert done.logs == ["wasi_files: 1 commands"]  # stderr, in the logs


def test_a_real_tool_reads_a_mapped_dir_and_spools_through_its_scratch(wasi_service, files_id):
    with wasi_service.client() as client:
        done = client.execute(files_id, "The cat sat on the hat. The Dog!",
                              args=["check", "/data/words.txt"])
    assert done.output == b"hat\ndog\n"
    assert done.logs == ["wasi_files: 8 words, 2 unknown", "wasi_files: 1 commands"]


def test_scratch_files_work_within_a_run_and_vanish_after(wasi_service, files_id):
    with wasi_service.client() as client:
        done = client.execute(files_id, args=["put", "/tmp/a", "5", "get", "/tmp/a",
                                              "ls", "/tmp"])
        assert done.output == b"xxxxxa\n"
        # Every later execution starts with an empty /tmp, on either worker.
        for _ in range(6):
            later = client.execute(files_id, args=["ls", "/tmp", "put", "/tmp/b", "1"])
            assert later.output == b""
        batch = client.execute_batch(files_id, [b"", b"", b""],
                                     args=["ls", "/tmp", "put", "/tmp/c", "1"])
        assert [item.output for item in batch] == [b"", b"", b""]
    assert scratch_contents(wasi_service) == []


def test_another_execution_scratch_is_out_of_reach(wasi_service, files_id):
    with wasi_service.client() as client:
        for path in ("/tmp/..", "/tmp/../..", "/"):
            with pytest.raises(PluginError) as err:
                client.execute(files_id, args=["ls", path])
            assert err.value.details["plugin_code"] == 2, path


def test_writing_to_a_mapped_dir_fails(wasi_service, files_id, dict_dir):
    with wasi_service.client() as client:
        for attempt in (["put", "/data/evil", "3"], ["put", "/data/words.txt", "3"]):
            with pytest.raises(PluginError) as err:
                client.execute(files_id, args=attempt)
            assert err.value.details["plugin_code"] == 2
            assert f"wasi_files: put {attempt[1]}: " in err.value.details["logs"][0]
    assert sorted(os.listdir(dict_dir)) == ["words.txt"]
    assert (dict_dir / "words.txt").read_text() == WORDS


def test_over_the_scratch_cap_is_scratch_limit(wasi_service, files_id):
    with wasi_service.client() as client:
        with pytest.raises(ScratchLimit) as err:
            client.execute(files_id, args=["put", "/tmp/big", str(2 * MiB)])
        assert err.value.code == "SCRATCH_LIMIT"
        assert err.value.details["limit"] == MiB
        assert err.value.details["scratch_bytes"] > MiB
        # Stopped by the watch while writing (no summary line yet), or caught at the end.
        assert err.value.details["logs"] in ([], ["wasi_files: 1 commands"])
        # Under the cap is fine.
        client.execute(files_id, args=["put", "/tmp/small", str(MiB // 2)])
    assert scratch_contents(wasi_service) == []


def test_a_module_writing_on_past_the_cap_is_stopped_while_it_runs(wasi_service, files_id):
    # 1 GB asked for: the scratch watch stops it within a few MiB of the 1 MiB cap instead
    # of letting it fill the disk until the run ends.
    with wasi_service.client() as client:
        with pytest.raises(ScratchLimit) as err:
            client.execute(files_id, args=["put", "/tmp/flood", str(10**9)], timeout_ms=60_000)
        assert MiB < err.value.details["scratch_bytes"] < 10**9 // 4
        assert client.execute(files_id, args=["args"]).output == b"wasi_files\nargs\n"
    assert scratch_contents(wasi_service) == []


def test_arguments_to_a_module_without_wasi_are_refused(wasi_service):
    with wasi_service.client() as client:
        upper = client.load(PLUGINS / "uppercase.wat").binary_id
        with pytest.raises(BadRequest, match="does not import WASI"):
            client.execute(upper, "x", args=["a"])
        assert client.execute(upper, "x").output == b"X"


def test_argument_bounds_are_enforced_on_the_wire(wasi_service, files_id):
    with raw_dealer(wasi_service.endpoint) as sock:
        too_many = p.encode(p.Execute(id=1, binary_id=files_id, args=["a"] * (p.MAX_ARGS + 1)))
        reply = exchange(sock, [too_many, b""])
        assert reply.code == "BAD_REQUEST" and "args" in reply.message
        too_long = p.encode(p.Execute(id=2, binary_id=files_id,
                                      args=["a" * (p.MAX_ARG_CHARS + 1)]))
        reply = exchange(sock, [too_long, b""])
        assert reply.code == "BAD_REQUEST" and "args" in reply.message
        not_strings = msgspec.msgpack.encode({"type": "execute", "id": 3,
                                              "binary_id": files_id, "args": [1, 2]})
        assert exchange(sock, [not_strings, b""]).code == "BAD_REQUEST"
        nul = p.encode(p.Execute(id=4, binary_id=files_id, args=["a\0b"]))
        reply = exchange(sock, [nul, b""])
        assert reply.code == "BAD_REQUEST" and "NUL" in reply.message
        fine = p.encode(p.Execute(id=5, binary_id=files_id, args=["args", "ok"]))
        reply = exchange(sock, [fine, b""])
        assert isinstance(reply, p.Executed)


def test_async_client_and_chain_pass_arguments(wasi_service, files_id):
    async def run() -> tuple[bytes, bytes]:
        async with AsyncClient(wasi_service.endpoint) as client:
            done = await client.execute(files_id, args=["args", "async"])
            chained = await client.chain([files_id], args=["args", "chained"])
            return done.output, chained.output

    done, chained = asyncio.run(run())
    assert done == b"wasi_files\nargs\nasync\n"
    assert chained == b"wasi_files\nargs\nchained\n"


def test_cli_arg_is_repeatable(wasi_service, files_id):
    done = subprocess.run(
        [sys.executable, "-m", "wasmcore.client.cli", "--endpoint", wasi_service.endpoint,
         "execute", "--binary-id", files_id, "--arg", "args", "--arg", "x y", "--arg=-z"],
        capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"wasi_files\nargs\nx y\n-z\n"
    assert b"[log] wasi_files: 1 commands" in done.stderr


def test_entry_process_of_a_command_runs_process(service):
    with service.client() as client:
        loaded = client.load(data=START_AND_PROCESS_WAT.encode(), name="start_and_process")
        assert loaded.kind == "wasi" and loaded.exports == ["_start", "process"]
        assert client.execute(loaded.binary_id).output == b"started"
        done = client.execute(loaded.binary_id, "in", entry="process")
        assert done.output == b"process:in"


def test_dirs_in_the_config_are_checked():
    for guest, host in (("data", "/srv"), ("/tmp", "/srv"), ("/", "/srv"), ("/a/../b", "/srv"),
                        ("/data", "srv")):
        with pytest.raises(ConfigError, match="dirs"):
            parse_config(f'[binaries.x]\ndirs = {{ "{guest}" = "{host}" }}\n')
    config = parse_config('[tenants.acme.binaries.x]\ndirs = { "/models" = "/srv/models" }\n')
    assert config.binary("acme", "x").dirs == {"/models": "/srv/models"}


def test_a_c_plugin_built_by_build_sh_has_room_on_its_shadow_stack(wasi_service, files_id):
    # 512 KiB of locals: past wasm-ld's default 64 KiB stack, where the same source fails
    # with "memory fault at wasm address 0xfff9...." (docs/plugin-abi.md, the C shadow stack).
    with wasi_service.client() as client:
        done = client.execute(files_id, args=["stack", "512"])
    assert done.output == b"stack 512 KiB: sum 66846720\n"


def test_a_core_module_may_import_wasi_and_its_initialize_runs(service):
    with service.client() as client:
        loaded = client.load(data=REACTOR_WAT.encode(), name="reactor")
        assert loaded.kind == "core" and loaded.exports == ["process"]
        done = client.execute(loaded.binary_id, "x")
    assert done.output == b"ready=7"
    assert done.logs == ["to stdout"]


def test_dirs_and_scratch_cap_follow_a_config_reload(wasi_service, files_id, dict_dir):
    original = wasi_service.config_path.read_text()
    more = dict_dir / "more"
    more.mkdir(mode=0o755)
    (more / "note.txt").write_text("reloaded")
    os.chmod(more / "note.txt", 0o644)
    try:
        with wasi_service.client() as client:
            with pytest.raises(PluginError):
                client.execute(files_id, args=["get", "/more/note.txt"])
            assert "[binaries.wasi_files.dirs]\n" in original  # as the fixture wrote it
            wasi_service.config_path.write_text(
                original.replace("scratch_mb = 1", "scratch_mb = 4").replace(
                    "[binaries.wasi_files.dirs]\n",
                    f'[binaries.wasi_files.dirs]\n"/more" = "{more}"\n'))

            def reloaded() -> bool:
                try:
                    done = client.execute(files_id, args=["get", "/more/note.txt"])
                    return done.output == b"reloaded"
                except PluginError:
                    return False

            wait_for(reloaded, 20, "the new mapping")
            client.execute(files_id, args=["put", "/tmp/two", str(2 * MiB)])  # under 4 MiB now
            with pytest.raises(PluginError):
                client.execute(files_id, args=["put", "/more/x", "1"])  # read-only too
    finally:
        wasi_service.config_path.write_text(original)
        with wasi_service.client() as client:
            wait_for(lambda: _scratch_limited(client, files_id), 20, "the old config back")
        shutil.rmtree(more, ignore_errors=True)


def _scratch_limited(client, files_id: str) -> bool:
    try:
        client.execute(files_id, args=["put", "/tmp/two", str(2 * MiB)])
    except ScratchLimit:
        return True
    return False


def test_a_dead_worker_scratch_directory_is_removed(wasi_service, files_id):
    root = scratch_root(wasi_service)
    with wasi_service.client() as client:
        for _ in range(4):  # both workers have run a module with files by now, most likely
            client.execute(files_id, args=["ls", "/tmp"])
        kept = wait_for(lambda: os.listdir(root), 10, "a worker's scratch directory")
        pid = int(kept[0][1:].split("-")[0])  # s<worker pid>-<random>
        assert pid in {w.pid for w in client.stats().workers}
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: kept[0] not in os.listdir(root), 20, "the dead worker's directory gone")
        # The replacement works, with a directory of its own.
        wait_for(lambda: len([w for w in client.stats().workers if w.state == "idle"]) == 2,
                 30, "the pool back to 2 workers")
        assert client.execute(files_id, args=["ls", "/tmp"]).output == b""


def test_a_scratch_directory_is_handed_out_again_only_once_seen_empty(tmp_path, monkeypatch):
    from wasmcore.sandbox_worker import wasi

    dirs = wasi.ScratchDirs()
    first = wasi.Scratch(dirs, str(tmp_path), MiB)
    (Path(first.path) / "left").write_text("secret")
    (Path(first.path) / "sub").mkdir()
    monkeypatch.setattr(wasi, "scratch_usage", lambda path: 0)  # a measurement that erred
    assert first.finish() is None
    second = wasi.Scratch(dirs, str(tmp_path), MiB)
    assert os.listdir(second.path) == []
    monkeypatch.setattr(wasi, "_emptied", lambda path: False)  # cannot be emptied: dropped
    assert second.finish() is None
    third = wasi.Scratch(dirs, str(tmp_path), MiB)
    assert third.path != second.path and not os.path.exists(second.path)
    dirs.close()
