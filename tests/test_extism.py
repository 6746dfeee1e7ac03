"""Extism PDK plugins through the real server: the C and AssemblyScript plugins built in
plugins/extism/ (see plugins/extism/build.sh), limits, isolation, hot reload and chains."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import PLUGINS, wait_for
from wasmcore.client.launcher import start_service
from wasmcore.protocol import errors
from wasmcore.protocol.limits import Limits
from wasmcore.sandbox_worker.runtime import Sandbox

EXTISM = PLUGINS / "extism"
C_GREET = EXTISM / "c" / "greet.wasm"
C_WASI = EXTISM / "c" / "wasi_words.wasm"
C_HOST_CALL = EXTISM / "c" / "host_call.wasm"
AS_GREET = EXTISM / "as_greet.wasm"
UPPER = EXTISM / "uppercase.wasm"


def _live_pids(client) -> set[int]:
    return {w.pid for w in client.stats().workers if w.state in ("idle", "busy")}


@pytest.mark.parametrize("plugin", [C_GREET, AS_GREET], ids=["c-pdk", "as-pdk"])
def test_input_output_config_and_logs(service, plugin: Path):
    with service.client() as c:
        loaded = c.load(plugin)
        assert loaded.kind == "extism" and "greet" in loaded.exports
        plain = c.execute(loaded.binary_id, "world", entry="greet")
        assert plain.output == b"Hello, world!"
        assert plain.logs and plain.logs[0].startswith("[info] greet: greeting")
        assert plain.metering.fuel_consumed > 0
        # The request's env is the plugin's config.
        configured = c.execute(loaded.binary_id, "world", entry="greet",
                               env={"greeting": "Bonjour"})
        assert configured.output == b"Bonjour, world!"


@pytest.mark.parametrize("plugin", [C_GREET, AS_GREET], ids=["c-pdk", "as-pdk"])
def test_error_set_with_nonzero_status_is_plugin_error_with_its_message(service, plugin: Path):
    with service.client() as c:
        binary = c.load(plugin).binary_id
        with pytest.raises(errors.PluginError) as info:
            c.execute(binary, "nope", entry="fail")
        assert info.value.message == "the input was refused: nope"
        assert info.value.details["plugin_code"] == 1
        assert info.value.details["logs"] == ["[warn] fail: refusing"]  # logs survive errors
        # The worker is fine: the next execution succeeds.
        assert c.execute(binary, "again", entry="greet").output == b"Hello, again!"


def test_vars_live_for_one_execution(service):
    with service.client() as c:
        c_binary = c.load(C_GREET).binary_id
        # `count` increments var "n" once per input byte: always from zero.
        assert c.execute(c_binary, "abcdef", entry="count").output == b"6"
        assert c.execute(c_binary, "abc", entry="count").output == b"3"
        as_binary = c.load(AS_GREET).binary_id
        assert c.execute(as_binary, "xyz", entry="vars").output == b"seen=xyz"


def test_http_request_is_refused_clearly(service):
    with service.client() as c:
        binary = c.load(C_GREET).binary_id
        with pytest.raises(errors.PluginError) as info:
            c.execute(binary, "", entry="fetch")
        assert "http_request is refused" in info.value.message
        assert "no network access" in info.value.message


@pytest.mark.parametrize("plugin", [C_GREET, AS_GREET], ids=["c-pdk", "as-pdk"])
def test_looping_plugin_is_stopped_by_its_timeout(service, plugin: Path):
    with service.client() as c:
        binary = c.load(plugin).binary_id
        pids = _live_pids(c)
        with pytest.raises(errors.Timeout):
            # A 50 ms limit: the default fuel lasts about 4 times longer on this loop.
            c.execute(binary, "", entry="spin", timeout_ms=50)
        with pytest.raises(errors.OutOfFuel):
            c.execute(binary, "", entry="spin", fuel=100_000)
        assert c.execute(binary, "x", entry="greet").output == b"Hello, x!"
        assert _live_pids(c) == pids  # stopped inside the worker, not by killing it


def test_kernel_memory_is_bounded_by_the_memory_limit(service):
    with service.client() as c:
        binary = c.load(C_GREET).binary_id
        with pytest.raises(errors.MemoryLimit) as info:
            c.execute(binary, "", entry="hoard", memory_mb=4)
        assert "Extism kernel" in info.value.message
        with pytest.raises(errors.MemoryLimit):  # an input larger than the limit
            c.execute(binary, b"x" * (2 << 20), entry="greet", memory_mb=2)


def test_crash_is_isolated(service):
    with service.client() as c:
        binary = c.load(C_GREET).binary_id
        pids = _live_pids(c)
        with pytest.raises(errors.Trap):
            c.execute(binary, "", entry="crash")
        assert c.execute(binary, "y", entry="greet").output == b"Hello, y!"
        assert _live_pids(c) == pids


def test_wasi_reactor_pdk_plugin(service):
    with service.client() as c:
        loaded = c.load(C_WASI)
        result = c.execute(loaded.binary_id, "the quick  brown fox")  # its one entry
        assert result.output == b"4 words"
        assert result.logs == ["words: counted 20 bytes"]  # stderr


def test_chain_with_a_core_module(service):
    with service.client() as c:
        upper = c.load(UPPER).binary_id  # Extism, one entry
        rot = c.load(PLUGINS / "rot13.wat").binary_id  # core
        words = c.load(C_WASI).binary_id  # Extism + WASI
        assert c.chain([upper, rot], "hello chain").output == b"URYYB PUNVA"
        assert c.chain([rot, upper, words], "a b c").output == b"3 words"


def test_user_imports_reach_the_operators_host_method_of_the_same_name():
    """`extism:host/user.echo` is the operator's `echo` method, called for the execution's
    tenant; a user function with no method behind it links (methods come and go with config
    reloads) and answers the plugin NOT_FOUND, which this plugin passes on as its error."""
    echo = {"target": "wasmcore.plugins.methods:echo", "tenants": ["alice"]}
    svc = start_service(workers=1, config={"host_methods": {"echo": echo}})
    try:
        with svc.client(tenant="alice") as alice, svc.client(tenant="bob") as bob:
            plugin = alice.load(C_HOST_CALL).binary_id
            assert alice.execute(plugin, b'{"n": 1}', entry="call_echo").output == b'{"n":1}'
            theirs = bob.load(C_HOST_CALL).binary_id
            with pytest.raises(errors.PluginError) as refused:
                bob.execute(theirs, b"{}", entry="call_echo")
            assert "NOT_ALLOWED" in refused.value.message
    finally:
        svc.cleanup()


def test_a_user_import_with_no_method_behind_it_loads_and_answers_not_found(service):
    with service.client() as c:
        plugin = c.load(C_HOST_CALL).binary_id
        with pytest.raises(errors.PluginError) as missing:
            c.execute(plugin, b"{}", entry="call_echo")
    assert "NOT_FOUND" in missing.value.message


def test_hot_reload(tmp_path: Path):
    svc = start_service(workers=2)
    try:
        target = tmp_path / "live.wasm"
        shutil.copyfile(UPPER, target)
        with svc.client() as c:
            loaded = c.load(target)
            assert c.execute(loaded.binary_id, "abc").output == b"ABC"
            # Replaced by another Extism plugin: its one entry serves the same id.
            shutil.copyfile(C_WASI, tmp_path / ".swap")
            (tmp_path / ".swap").replace(target)
            wait_for(lambda: c.execute(loaded.binary_id, "a b").output == b"2 words", 10,
                     "reloaded")
            # And by a core module.
            target.write_bytes((PLUGINS / "rot13.wasm").read_bytes())
            wait_for(lambda: c.execute(loaded.binary_id, "abc").output == b"nop", 10, "core")
    finally:
        svc.cleanup()


# --- the sandbox alone: the `extism:host/user` seam with a fake host-methods callable -------


def test_user_imports_call_the_host_methods_seam():
    calls: list[tuple[str, str, bytes]] = []

    def host_methods(tenant: str, name: str, request: bytes) -> tuple[bool, bytes]:
        calls.append((tenant, name, request))
        if request == b"bad":
            return False, b'{"error": "refused"}'
        return True, b'{"echo": "' + request + b'"}'

    with Sandbox(user_call=host_methods) as sandbox:
        module = sandbox.compile(C_HOST_CALL.read_bytes())
        assert module.kind == "extism"
        assert sandbox.execute(module, b"hi", tenant="alice").output == b'{"echo": "hi"}'
        with pytest.raises(errors.PluginError) as info:
            sandbox.execute(module, b"bad", tenant="bob")
        assert info.value.message == '{"error": "refused"}'
    assert calls == [("alice", "echo", b"hi"), ("bob", "echo", b"bad")]


def test_wrong_kernel_signature_is_refused_at_load():
    wat = """(module
      (import "extism:host/env" "alloc" (func (param i32) (result i32)))
      (func (export "run") (result i32) (i32.const 0)))"""
    with Sandbox() as sandbox, pytest.raises(errors.InvalidModule) as info:
        sandbox.compile(wat.encode())
    assert "extism:host/env.alloc must be (i64) -> (i64)" in info.value.message


def test_output_over_the_cap_is_output_limit():
    with Sandbox() as sandbox:
        module = sandbox.compile(UPPER.read_bytes())
        limits = Limits(output_bytes=4)
        with pytest.raises(errors.OutputLimit):
            sandbox.execute(module, b"too long", limits=limits)
        assert sandbox.execute(module, b"ok", limits=limits).output == b"OK"


# --- docs/plugin-abi.md's Extism worked examples, as written ---------------------------------


def _doc_block(heading: str, language: str) -> str:
    text = (PLUGINS.parent / "docs" / "plugin-abi.md").read_text()
    section = text.split(heading, 1)[1]
    return section.split(f"```{language}\n", 1)[1].split("```", 1)[0]


def test_doc_example_wat_runs_as_written(service):
    source = _doc_block("### Kind 4: Extism plugin in WAT (shout)", "wat")
    with service.client() as c:
        binary = c.load(data=source.encode(), name="shout").binary_id
        result = c.execute(binary, "ada")
        assert (result.output, result.logs) == (b"ADA", ["[info] shout: done"])
        assert c.execute(binary, "ada", env={"suffix": "?!"}).output == b"ADA?!"
        with pytest.raises(errors.PluginError, match="shout: empty input"):
            c.execute(binary, "")


def test_doc_example_c_builds_and_runs_as_written(service, tmp_path: Path):
    clang = shutil.which("clang")
    if clang is None:
        pytest.skip("clang is not installed (the C example needs it)")
    import subprocess

    (tmp_path / "hello.c").write_text(_doc_block("### Kind 4: Extism plugin in C (hello)", "c"))
    command = _doc_block("### Kind 4: Extism plugin in C (hello)", "sh")
    args = command.replace("\\\n", " ").replace("plugins/extism/c", str(EXTISM / "c")).split()
    subprocess.run(args, cwd=tmp_path, check=True, timeout=120)
    with service.client() as c:
        binary = c.load(tmp_path / "hello.wasm").binary_id
        result = c.execute(binary, "ada", env={"punct": "?"})
        assert (result.output, result.logs) == (b"Hello, ada?", ["[info] hello: greeted"])
        assert c.execute(binary, "ada").output == b"Hello, ada!"
        with pytest.raises(errors.PluginError, match="hello: empty input"):
            c.execute(binary, "")


def test_error_set_fails_the_call_even_with_status_zero():
    """As Extism's own runtime does: a plugin that sets an error has failed."""
    wat = """(module
      (import "extism:host/env" "alloc" (func $alloc (param i64) (result i64)))
      (import "extism:host/env" "store_u8" (func $store_u8 (param i64 i32)))
      (import "extism:host/env" "error_set" (func $error_set (param i64)))
      (func (export "run") (result i32)
        (local $k i64)
        (local.set $k (call $alloc (i64.const 1)))
        (call $store_u8 (local.get $k) (i32.const 33))
        (call $error_set (local.get $k))
        (i32.const 0)))"""
    with Sandbox() as sandbox:
        module = sandbox.compile(wat.encode())
        with pytest.raises(errors.PluginError) as info:
            sandbox.execute(module, b"")
    assert info.value.message == "!"
    assert info.value.details["plugin_code"] == 0


def test_bench_extism_quick_run_has_every_row(tmp_path: Path):
    from bench import bench_extism, rows

    results = bench_extism.main(["--quick", "--workers", "1", "--iterations", "50",
                                 "--requests", "200", "--json", str(tmp_path / "r.json")])
    names = [row["row"] for row in results["rows"]]
    expected = ["wasm-core sandbox", "wasm-core 1 worker in flight"]
    if rows.extism is not None:
        expected = ["extism fresh plugin", "extism reused plugin", *expected]
    assert names == expected
    assert all(row["per_cpu_s"] > 0 and not row.get("errors") for row in results["rows"])
    assert (tmp_path / "r.json").exists()


def test_extism_plugin_with_other_imports_is_refused_at_load():
    """Imports no Extism plugin's store provides (here `host.log`, the core kinds' import) are
    refused at load, not at every execution."""
    wat = """(module
      (import "extism:host/env" "input_length" (func (result i64)))
      (import "host" "log" (func (param i32 i32)))
      (func (export "run") (result i32) (i32.const 0)))"""
    with Sandbox() as sandbox, pytest.raises(errors.InvalidModule) as info:
        sandbox.compile(wat.encode())
    assert "host::log" in info.value.message


def test_user_function_named_like_a_kernel_function_is_its_own():
    wat = """(module
      (import "extism:host/user" "log_info" (func $user (param i64) (result i64)))
      (import "extism:host/env" "length" (func $length (param i64) (result i64)))
      (import "extism:host/env" "output_set" (func $output_set (param i64 i64)))
      (func (export "run") (result i32)
        (local $r i64)
        (local.set $r (call $user (i64.const 0)))
        (call $output_set (local.get $r) (call $length (local.get $r)))
        (i32.const 0)))"""
    with Sandbox(user_call=lambda tenant, name, request: (True, name.encode())) as sandbox:
        module = sandbox.compile(wat.encode())
        assert sandbox.execute(module, b"").output == b"log_info"


# A plugin that overwrites the kernel's heap top (kernel memory is the plugin's to write,
# header included) so that the next allocation returns an offset far outside kernel memory,
# then makes the host write there (config_get copies the value into a new block).
_CORRUPT_TOP = """(module
  (import "extism:host/env" "alloc" (func $alloc (param i64) (result i64)))
  (import "extism:host/env" "store_u8" (func $store_u8 (param i64 i32)))
  (import "extism:host/env" "store_u64" (func $store_u64 (param i64 i64)))
  (import "extism:host/env" "config_get" (func $config_get (param i64) (result i64)))
  (import "extism:host/env" "output_set" (func $output_set (param i64 i64)))
  (func (export "run") (result i32)
    (local $key i64)
    (local.set $key (call $alloc (i64.const 1)))
    (call $store_u8 (local.get $key) (i32.const 107))
    (call $store_u64 (i64.const 40) (i64.const 0x1000000000000))
    (call $output_set (call $config_get (local.get $key)) (i64.const 3))
    (i32.const 0)))"""


def test_corrupted_kernel_heap_never_makes_the_host_write_outside_kernel_memory(service):
    with service.client() as c:
        binary = c.load(data=_CORRUPT_TOP.encode(), name="corrupt_top").binary_id
        pids = _live_pids(c)
        with pytest.raises((errors.Trap, errors.MemoryLimit)):
            c.execute(binary, "", env={"k": "abc"})
        assert _live_pids(c) == pids  # the worker did not crash
        assert c.execute(c.load(UPPER).binary_id, "ok").output == b"OK"


def test_vars_are_bounded_per_execution():
    wat = """(module
      (import "extism:host/env" "alloc" (func $alloc (param i64) (result i64)))
      (import "extism:host/env" "store_u8" (func $store_u8 (param i64 i32)))
      (import "extism:host/env" "var_set" (func $var_set (param i64 i64)))
      (func (export "run") (result i32)
        (local $key i64) (local $value i64) (local $i i32)
        (local.set $value (call $alloc (i64.const 300000)))
        (loop $more
          (local.set $key (call $alloc (i64.const 1)))
          (call $store_u8 (local.get $key) (i32.add (i32.const 65) (local.get $i)))
          (call $var_set (local.get $key) (local.get $value))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br_if $more (i32.lt_u (local.get $i) (i32.const 10))))
        (i32.const 0)))"""
    with Sandbox() as sandbox:
        module = sandbox.compile(wat.encode())
        with pytest.raises(errors.PluginError, match="vars exceed"):
            sandbox.execute(module, b"")


@pytest.mark.parametrize(("plugin", "entry", "data", "config"), [
    (C_GREET, "greet", b"world", {"greeting": "Hi"}),
    (C_GREET, "count", b"abcdef", {}),
    (AS_GREET, "greet", b"world", {"greeting": "Hi"}),
    (AS_GREET, "vars", b"xyz", {}),
    (UPPER, "upper", b"Hello, Extism!", {}),
], ids=["c-greet", "c-count", "as-greet", "as-vars", "wat-upper"])
def test_same_output_as_the_extism_sdk(plugin: Path, entry: str, data: bytes,
                                       config: dict[str, str]):
    """The test plugins are real Extism plugins: the Extism SDK (the `bench` extra) runs them
    to the same output."""
    extism = pytest.importorskip("extism")
    sdk = extism.Plugin(plugin.read_bytes(), wasi=False, config=config)
    with Sandbox() as sandbox:
        ours = sandbox.execute(sandbox.compile(plugin.read_bytes()), data, entry=entry,
                               env=config).output
    assert ours == bytes(sdk.call(entry, data))


def test_user_import_of_an_unknown_method_is_refused_at_load_when_names_are_known():
    with Sandbox(user_call=lambda t, n, r: (True, b""), user_known={"time"}.__contains__) as sb:
        with pytest.raises(errors.InvalidModule) as info:
            sb.compile(C_HOST_CALL.read_bytes())
    assert "no host method named 'echo'" in info.value.message
    assert info.value.details["missing_imports"] == ["extism:host/user.echo"]
