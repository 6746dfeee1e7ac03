"""The pure pieces of host methods, in-process: the key-value store, the method table the
supervisor builds, the config checks, and HostMethods' answers (the real-server tests are in
test_host_methods.py)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from wasmcore.protocol.messages import HostMethodSpec, HostMethodTable
from wasmcore.sandbox_worker.host_methods import HostMethods
from wasmcore.sandbox_worker.kv_store import KvStore, QuotaExceeded, _prefix_end
from wasmcore.supervisor.config import ConfigError, parse_config
from wasmcore.supervisor.host_methods import method_table


def test_kv_store_scopes_by_tenant_and_counts_usage(tmp_path: Path):
    kv = KvStore(str(tmp_path / "kv.sqlite3"))
    kv.set("a", "k", b'"v1"', 0, 0)
    kv.set("a", "k", b'"value2"', 0, 0)
    assert kv.get("a", "k") == b'"value2"' and kv.get("b", "k") is None
    assert kv.usage("a") == (1, 1 + 8) and kv.usage("b") == (0, 0)
    assert kv.incr("a", "n", 5, 0, 0) == 5 and kv.incr("a", "n", -2, 0, 0) == 3
    with pytest.raises(ValueError):
        kv.incr("a", "k", 1, 0, 0)  # holds a string
    assert kv.delete("a", "k") and not kv.delete("a", "k")
    assert kv.usage("a") == (1, 1 + 1)
    kv.close()


def test_kv_store_quota_refuses_and_keeps_everything(tmp_path: Path):
    kv = KvStore(str(tmp_path / "kv.sqlite3"))
    kv.set("a", "one", b"1", 2, 20)
    kv.set("a", "two", b"2", 2, 20)
    with pytest.raises(QuotaExceeded) as refused:
        kv.set("a", "three", b"3", 2, 20)
    assert (refused.value.quota, refused.value.limit, refused.value.used) == ("kv_max_keys", 2, 3)
    with pytest.raises(QuotaExceeded):
        kv.set("a", "one", b'"a long value"', 2, 20)
    kv.set("a", "one", b"0", 2, 20)  # no larger: always allowed
    assert kv.get("a", "three") is None and kv.usage("a") == (2, 8)


def test_kv_list_pages_within_a_prefix(tmp_path: Path):
    kv = KvStore(str(tmp_path / "kv.sqlite3"))
    for key in ["a", "p", "p/1", "p/2", "p/3", "p0", "q"]:
        kv.set("t", key, b"1", 0, 0)
    kv.set("u", "p/9", b"1", 0, 0)
    assert kv.list("t", "p/", "", 2) == (["p/1", "p/2"], True)
    assert kv.list("t", "p/", "p/2", 2) == (["p/3"], False)
    assert kv.list("t", "", "", 100) == (["a", "p", "p/1", "p/2", "p/3", "p0", "q"], False)
    assert _prefix_end("ab") == "ac" and _prefix_end("") is None


def test_method_table_follows_the_config():
    config = parse_config(
        '[host_methods."geo.lookup"]\ntarget = "m.x:f"\ntenants = ["acme"]\ntimeout_ms = 5\n'
        '[host_methods.open]\ntarget = "m.y:g"\ntenants = "*"\n'
        "[tenants.default]\nkv_max_keys = 7\n[tenants.acme]\nkv_max_bytes = 9\n"
        '[server]\ndata_dir = "/srv/wc"\n')
    table = method_table(config)
    assert [(m.name, m.target, m.tenants, m.timeout_ms) for m in table.methods] == [
        ("geo.lookup", "m.x:f", ["acme"], 5), ("open", "m.y:g", ["*"], 1000)]
    assert table.kv_quotas == {"default": [7, 16 * 1024 * 1024], "acme": [10_000, 9]}
    assert table.kv_path == "/srv/wc/kv/state.sqlite3"


@pytest.mark.parametrize("text, key", [
    ('[host_methods."kv.get"]\ntarget = "m:f"\n', 'host_methods."kv.get"'),
    ('[host_methods.x]\ntarget = "not a target"\n', "target"),
    ('[host_methods.x]\ntarget = "m:f"\ntenants = "acme"\n', "tenants"),
    ('[host_methods.x]\ntarget = "m:f"\ntimeout_ms = 0\n', "timeout_ms"),
    ("[tenants.acme]\nkv_max_keys = -1\n", "kv_max_keys"),
])
def test_bad_method_config_is_refused(text: str, key: str):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_config(text)


def _methods(tmp_path: Path, preempt: bool = False, **spec: object) -> HostMethods:
    lines: list[str] = []
    table = HostMethodTable(
        methods=[HostMethodSpec(name="m", target=str(spec.pop("target")), tenants=["*"],
                                **spec)],  # type: ignore[arg-type]
        kv_path=str(tmp_path / "kv.sqlite3"), kv_quotas={"default": [0, 0]})
    methods = HostMethods(table, log=lines.append, preempt=preempt)
    methods.lines = lines  # type: ignore[attr-defined]
    return methods


def test_a_slow_method_is_interrupted_in_the_main_thread(tmp_path: Path):
    methods = _methods(tmp_path, preempt=True, target="wasmcore.plugins.methods:slow",
                       timeout_ms=50)
    ok, body = methods.call("t", "m", b'{"ms": 20000}')
    assert not ok and json.loads(body)["error"]["code"] == "TIMEOUT"
    assert methods.call("t", "m", b'{"ms": 1}') == (True, b'{"slept_ms":1}')


def test_outside_the_main_thread_a_late_result_is_dropped(tmp_path: Path):
    methods = _methods(tmp_path, target="wasmcore.plugins.methods:slow", timeout_ms=20)
    answers: list[tuple[bool, bytes]] = []
    thread = threading.Thread(target=lambda: answers.append(
        methods.call("t", "m", b'{"ms": 100}')))
    thread.start()
    thread.join(10)
    assert answers and not answers[0][0]
    assert json.loads(answers[0][1])["error"]["code"] == "TIMEOUT"


def test_failures_are_logged_but_rate_limited(tmp_path: Path):
    methods = _methods(tmp_path, target="wasmcore.plugins.methods:fail")
    for _ in range(50):
        ok, body = methods.call("t", "m", b"1")
        assert not ok and json.loads(body)["error"]["code"] == "METHOD_FAILED"
    assert len(methods.lines) == 20  # type: ignore[attr-defined]
    assert "RuntimeError: sample method failing on purpose" in methods.lines[0]  # type: ignore


def test_reconfigure_imports_new_targets_and_drops_removed_ones(tmp_path: Path):
    methods = _methods(tmp_path, target="wasmcore.plugins.methods:echo")
    assert methods.call("t", "m", b'["a"]') == (True, b'["a"]')
    methods.configure(HostMethodTable(methods=[
        HostMethodSpec(name="m", target="wasmcore.plugins.methods:shout", tenants=["t"])]))
    assert methods.call("t", "m", b'["a"]') == (True, b'["A"]')
    assert json.loads(methods.call("u", "m", b"1")[1])["error"]["code"] == "NOT_ALLOWED"
    assert json.loads(methods.call("t", "kv.get", b'{"key":"k"}')[1])["error"]["code"] == (
        "UNAVAILABLE")  # this table has no key-value database
    methods.configure(HostMethodTable())
    assert json.loads(methods.call("t", "m", b"1")[1])["error"]["code"] == "NOT_FOUND"


HOSTILE_CALLER = b"""
(module
  (import "host" "call" (func $call (param i32 i32 i32 i32) (result i64)))
  (import "host" "call_result" (func $result (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "echo")
  (func (export "name_out") (result i32)
    (drop (call $call (i32.const 65530) (i32.const 100) (i32.const 0) (i32.const 0)))
    (i32.const 0))
  (func (export "request_out") (result i32)
    (drop (call $call (i32.const 0) (i32.const 4) (i32.const -16) (i32.const 32)))
    (i32.const 0))
  (func (export "result_out") (result i32)
    (drop (call $call (i32.const 0) (i32.const 4) (i32.const 0) (i32.const 2)))
    (call $result (i32.const 65535) (i32.const 64)))
  (func (export "result_short") (result i32)
    (drop (call $call (i32.const 0) (i32.const 4) (i32.const 16) (i32.const 2)))
    (call $result (i32.const 100) (i32.const 1)))
  (data (i32.const 16) "[]")
)
"""


def test_pointers_outside_memory_trap_and_short_buffers_get_a_prefix(tmp_path: Path):
    from wasmcore.protocol.errors import PluginError, Trap
    from wasmcore.sandbox_worker.runtime import Sandbox

    methods = _methods(tmp_path, target="wasmcore.plugins.methods:echo")
    methods.configure(HostMethodTable(methods=[
        HostMethodSpec(name="echo", target="wasmcore.plugins.methods:echo", tenants=["*"])]))
    with Sandbox(methods=methods) as sandbox:
        module = sandbox.compile(HOSTILE_CALLER)
        for entry in ("name_out", "request_out", "result_out"):
            with pytest.raises(Trap, match="outside the plugin's memory"):
                sandbox.execute(module, b"", entry=entry, tenant="t")
        # call_result copies what fits and says how much: 1 byte of "[]" here.
        with pytest.raises(PluginError) as copied:
            sandbox.execute(module, b"", entry="result_short", tenant="t")
        assert copied.value.details["plugin_code"] == 1
