"""Host methods through the real server: a plugin calls the operator's methods by name with
JSON, and every failure is a JSON error the plugin handles while its worker lives on; the
built-in key-value state is per tenant, shared by all workers, durable and bounded."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.conftest import PLUGINS, wait_for
from wasmcore.client import AsyncClient
from wasmcore.client.launcher import RunningService, render_toml, start_service
from wasmcore.protocol import errors

CALLER = PLUGINS / "call_method.wat"
SAMPLES = "wasmcore.plugins.methods"

METHODS = {
    "echo": {"target": f"{SAMPLES}:echo", "tenants": "*"},
    "whoami": {"target": f"{SAMPLES}:whoami", "tenants": ["alice"]},
    "fail": {"target": f"{SAMPLES}:fail", "tenants": "*"},
    "refuse": {"target": f"{SAMPLES}:refuse", "tenants": "*"},
    "slow": {"target": f"{SAMPLES}:slow", "tenants": "*", "timeout_ms": 200},
    "not_json": {"target": f"{SAMPLES}:not_json", "tenants": "*"},
    "small_in": {"target": f"{SAMPLES}:echo", "tenants": "*", "max_request_bytes": 16},
    "small_out": {"target": f"{SAMPLES}:echo", "tenants": "*", "max_response_bytes": 16},
    "missing": {"target": "wasmcore.plugins.no_such_module:f", "tenants": "*"},
}


def call(client, binary_id: str, method: str, request: object | str) -> tuple[bool, object, int]:
    """(ok, decoded JSON, worker pid) of one host call made by the call_method plugin."""
    body = request if isinstance(request, str) else json.dumps(request)
    result = client.execute(binary_id, f"{method}\n{body}".encode())
    assert result.logs in (["ok"], ["error"]), result.logs
    return result.logs == ["ok"], json.loads(bytes(result.output)), result.worker_pid


@pytest.fixture(scope="module")
def methods_service(tmp_path_factory) -> RunningService:
    log = tmp_path_factory.mktemp("log") / "stderr.txt"
    handle = log.open("wb")
    svc = start_service(workers=1, config={"host_methods": METHODS}, stderr=handle)
    svc.stderr_path = log  # type: ignore[attr-defined]
    try:
        yield svc
    finally:
        svc.cleanup()
        handle.close()


def test_plugin_calls_a_method_and_gets_its_json_back(methods_service):
    with methods_service.client(tenant="alice") as c:
        caller = c.load(CALLER).binary_id
        request = {"text": "héllo", "n": [1, 2.5, None, True]}
        assert call(c, caller, "echo", request)[:2] == (True, request)
        # The method is told who called: the execution's tenant, never a name the plugin picks.
        assert call(c, caller, "whoami", {})[:2] == (True, {"tenant": "alice",
                                                             "method": "whoami"})


def test_every_failure_is_a_json_error_and_the_worker_survives(methods_service):
    with methods_service.client(tenant="alice") as c:
        caller = c.load(CALLER).binary_id
        pid = call(c, caller, "echo", 1)[2]
        expected = {
            "fail": "METHOD_FAILED",
            "slow": "TIMEOUT",
            "not_json": "BAD_RESPONSE",
            "nope": "NOT_FOUND",
            "missing": "UNAVAILABLE",
            "refuse": "REFUSED",
        }
        for method, code in expected.items():
            ok, answer, worker = call(c, caller, method, {"ms": 5000})
            assert not ok and answer["error"]["code"] == code, (method, answer)
            assert worker == pid, f"{method}: the worker was replaced"
        assert call(c, caller, "refuse", {})[1]["error"]["message"].startswith("refused")
        ok, answer, _ = call(c, caller, "echo", "{not json")
        assert not ok and answer["error"]["code"] == "BAD_REQUEST"
        ok, answer, _ = call(c, caller, "small_in", ["x" * 40])
        assert not ok and answer["error"]["code"] == "REQUEST_TOO_LARGE"
        ok, answer, _ = call(c, caller, "small_out", ["x" * 40])
        assert not ok and answer["error"]["code"] == "RESPONSE_TOO_LARGE"
        # A raised exception's text stays in the operator's log, not in the plugin's error.
        assert "on purpose" not in json.dumps(call(c, caller, "fail", 1)[1])
        assert call(c, caller, "echo", [1])[:3] == (True, [1], pid)
    log_text = wait_for(lambda: (t := methods_service.stderr_path.read_text())
                        and "RuntimeError: sample method failing on purpose" in t and t,
                        10, "the failure in the worker log")
    assert "host method 'slow' (tenant 'alice'): timed out" in log_text
    assert "host method 'not_json'" in log_text
    assert "wasmcore.plugins.no_such_module" in log_text


def test_a_tenant_not_allowed_is_refused(methods_service):
    with methods_service.client(tenant="bob") as c:
        caller = c.load(CALLER).binary_id
        ok, answer, _ = call(c, caller, "whoami", {})
        assert not ok and answer["error"]["code"] == "NOT_ALLOWED"
        assert "alice" not in json.dumps(answer)


def test_reload_adds_removes_and_repoints_methods(tmp_path: Path):
    svc = start_service(workers=2, config={"host_methods": {"echo": METHODS["echo"]}})
    try:
        def rewrite(methods: dict) -> None:
            sections = {"server": {"endpoint": svc.endpoint,
                                   "data_dir": str(svc.workdir / "data"),
                                   "artifact_dir": str(svc.workdir / "art"),
                                   "shm_dir": str(svc.shm_dir)},
                        "pool": {"workers": 2}, "host_methods": methods}
            svc.config_path.write_text(render_toml(sections))

        with svc.client() as c:
            caller = c.load(CALLER).binary_id

            def answers(method: str) -> set[str]:
                """What a few calls got, as ok:<json> or the error code (both workers)."""
                seen = set()
                for _ in range(6):
                    ok, answer, _ = call(c, caller, method, ["a"])
                    seen.add(f"ok:{json.dumps(answer)}" if ok else answer["error"]["code"])
                return seen

            assert answers("shout") == {"NOT_FOUND"}
            rewrite({"echo": METHODS["echo"],
                     "shout": {"target": f"{SAMPLES}:shout", "tenants": "*"}})
            wait_for(lambda: answers("shout") == {'ok:["A"]'}, 20, "shout added")
            rewrite({"shout": {"target": f"{SAMPLES}:echo", "tenants": "*"}})  # re-pointed
            wait_for(lambda: answers("shout") == {'ok:["a"]'}, 20, "shout re-pointed")
            assert answers("echo") == {"NOT_FOUND"}  # removed in the same reload
            assert c.stats().config_error is None
    finally:
        svc.cleanup()


# --------------------------------------------------------------------------- key-value state


async def concurrent_calls(endpoint: str, tenant: str, binary_id: str,
                           inputs: list[str]) -> list[tuple[bytes, int]]:
    async with AsyncClient(endpoint, tenant=tenant, timeout_s=60) as client:
        done = await asyncio.gather(*(client.execute(binary_id, text.encode())
                                      for text in inputs))
    return [(bytes(result.output), result.worker_pid) for result in done]


def kv(client, binary_id: str, method: str, request: object) -> tuple[bool, object, int]:
    return call(client, binary_id, f"kv.{method}", request)


def test_kv_is_shared_by_workers_scoped_by_tenant_bounded_and_durable():
    config = {"tenants": {"alice": {"kv_max_keys": 3, "kv_max_bytes": 200}}}
    svc = start_service(workers=2, config=config)
    try:
        with svc.client(tenant="alice") as alice, svc.client(tenant="bob") as bob:
            a_caller = alice.load(CALLER).binary_id
            b_caller = bob.load(CALLER).binary_id
            assert kv(alice, a_caller, "set", {"key": "page:home", "value": {"n": 41}})[0]
            # Both workers at once: each reads what the other wrote, no increment is lost.
            results = asyncio.run(concurrent_calls(svc.endpoint, "alice", a_caller, [
                f"kv.{method}\n{json.dumps(request)}"
                for _ in range(100)
                for method, request in (("incr", {"key": "hits"}),
                                        ("get", {"key": "page:home"}))]))
            assert {pid for _, pid in results} == {w.pid for w in alice.stats().workers}
            assert len({pid for _, pid in results}) == 2
            assert all(json.loads(out) == {"found": True, "value": {"n": 41}}
                       for out, _ in results[1::2])
            assert kv(alice, a_caller, "get", {"key": "hits"})[1] == {"found": True,
                                                                      "value": 100}
            assert kv(alice, a_caller, "delete", {"key": "hits"})[1] == {"deleted": True}

            # Another tenant sees none of alice's keys, and its own writes stay its own.
            assert kv(bob, b_caller, "get", {"key": "page:home"})[1] == {"found": False}
            assert kv(bob, b_caller, "list", {"prefix": ""})[1] == {"keys": [], "more": False}
            assert kv(bob, b_caller, "set", {"key": "page:home", "value": "bob's"})[0]
            assert kv(alice, a_caller, "get", {"key": "page:home"})[1]["value"] == {"n": 41}
            assert kv(bob, b_caller, "delete", {"key": "page:home"})[1] == {"deleted": True}
            assert kv(alice, a_caller, "get", {"key": "page:home"})[1]["found"] is True

            # Quota: three keys; a fourth is refused, overwriting one is not.
            assert kv(alice, a_caller, "set", {"key": "page:a", "value": 1})[0]
            assert kv(alice, a_caller, "set", {"key": "page:b", "value": 2})[0]
            ok, answer, _ = kv(alice, a_caller, "set", {"key": "page:c", "value": 3})
            assert not ok and answer["error"]["code"] == "QUOTA_EXCEEDED"
            assert answer["error"]["quota"] == "kv_max_keys"
            assert kv(alice, a_caller, "set", {"key": "page:a", "value": 10})[0]
            ok, answer, _ = kv(alice, a_caller, "set", {"key": "page:b", "value": "x" * 300})
            assert not ok and answer["error"]["quota"] == "kv_max_bytes"
            assert kv(alice, a_caller, "list", {"prefix": "page:"})[1] == {
                "keys": ["page:a", "page:b", "page:home"], "more": False}
            assert kv(alice, a_caller, "list", {"prefix": "page:", "limit": 1,
                                                "after": "page:a"})[1] == {
                "keys": ["page:b"], "more": True}
            # Bob has no quota table: the default one, far from full.
            assert kv(bob, b_caller, "set", {"key": "x", "value": 1})[0]

        assert svc.stop() == 0
        again = start_service(workers=2, config=config, workdir=svc.workdir)
        try:
            with again.client(tenant="alice") as alice:
                caller = alice.load(CALLER).binary_id
                assert kv(alice, caller, "get", {"key": "page:a"})[1] == {"found": True,
                                                                          "value": 10}
                assert kv(alice, caller, "get", {"key": "page:home"})[1]["value"] == {"n": 41}
        finally:
            again.stop()
    finally:
        svc.cleanup()


def test_visit_counter_sample_counts_per_tenant():
    svc = start_service(workers=2)
    try:
        with svc.client(tenant="alice") as alice, svc.client(tenant="bob") as bob:
            a_counter = alice.load(PLUGINS / "visit_counter.wasm").binary_id
            b_counter = bob.load(PLUGINS / "visit_counter.wasm").binary_id
            outputs = [bytes(alice.execute(a_counter, b"home").output) for _ in range(5)]
            assert outputs == [f"home: {n} visits".encode() for n in range(1, 6)]
            assert bytes(bob.execute(b_counter, b"home").output) == b"home: 1 visits"
            assert bytes(alice.execute(a_counter, b"about").output) == b"about: 1 visits"
    finally:
        svc.cleanup()


# --------------------------------------------------------------------------- entry fallback


def test_entry_fallback_tries_the_next_entry_on_a_trap_or_an_error():
    entries = ["primary", "secondary", "backup"]
    svc = start_service(workers=1, config={"tenants": {
        "alice": {"binaries": {"fallback": {"entries": entries, "entry_fallback": True}}},
        "bob": {"binaries": {"fallback": {"entries": entries}}},
    }})
    try:
        with svc.client(tenant="alice") as alice, svc.client(tenant="bob") as bob:
            a_binary = alice.load(PLUGINS / "fallback.wat").binary_id
            b_binary = bob.load(PLUGINS / "fallback.wat").binary_id
            # primary traps, secondary returns 3, backup succeeds.
            assert bytes(alice.execute(a_binary).output) == b"backup"
            assert [bytes(item.output) for item in alice.execute_batch(a_binary, [b"", b""])] == [
                b"backup", b"backup"]
            # Without the option: today's rule, the first exported entry, and its failure.
            with pytest.raises(errors.Trap):
                bob.execute(b_binary)
            # An entry named by the request is the only one tried.
            with pytest.raises(errors.PluginError):
                alice.execute(a_binary, entry="secondary")
    finally:
        svc.cleanup()


def test_entry_fallback_reports_every_attempt_when_all_fail():
    svc = start_service(workers=1, config={"tenants": {"default": {"binaries": {
        "fallback": {"entries": ["primary", "secondary"], "entry_fallback": True}}}}})
    try:
        with svc.client() as c:
            binary = c.load(PLUGINS / "fallback.wat").binary_id
            with pytest.raises(errors.PluginError) as failed:
                c.execute(binary)
            attempts = failed.value.details["attempts"]
            assert [(a["entry"], a["code"]) for a in attempts] == [
                ("primary", "TRAP"), ("secondary", "PLUGIN_ERROR")]
    finally:
        svc.cleanup()


def test_a_method_of_the_operators_own_module_imported_after_a_reload(monkeypatch):
    """The operator's module (on the service's PYTHONPATH, outside wasm-core) named only by a
    reload: the workers import it then, already confined (sandbox user, seccomp)."""
    workdir = Path(tempfile.mkdtemp(prefix="wc", dir="/tmp"))
    modules = workdir / "operator"
    modules.mkdir(mode=0o755)
    (modules / "operator_methods.py").write_text(
        "def hello(request, context):\n"
        "    return {'hello': request, 'tenant': context.tenant}\n")
    (modules / "operator_methods.py").chmod(0o644)
    monkeypatch.setenv("PYTHONPATH", str(modules))
    svc = start_service(workers=1, workdir=workdir, config={"host_methods": {}})
    try:
        with svc.client(tenant="alice") as c:
            caller = c.load(CALLER).binary_id
            assert call(c, caller, "hello", 1)[1]["error"]["code"] == "NOT_FOUND"
            text = svc.config_path.read_text()
            svc.config_path.write_text(text + '\n[host_methods."hello"]\n'
                                       'target = "operator_methods:hello"\ntenants = "*"\n')
            wait_for(lambda: call(c, caller, "hello", 1)[0], 20, "the method after the reload")
            assert call(c, caller, "hello", [1])[1] == {"hello": [1], "tenant": "alice"}
    finally:
        svc.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(svc.shm_dir, ignore_errors=True)
