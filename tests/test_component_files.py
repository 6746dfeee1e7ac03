"""A component's WASI view through the real server, the WASI p1 policy: the request's
arguments (argv[0] the binary's name), a private size-capped /tmp per execution (emptied after,
SCRATCH_LIMIT over the cap) and the operator's read-only dirs; and host.call, the operator's
host methods. The component is the Python sample (plugins/components/python/app.py), driven
by env OP."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from wasmcore.client.launcher import RunningService, start_service
from wasmcore.protocol.errors import PluginError, ScratchLimit
from wasmcore.protocol.limits import MiB

from .conftest import PLUGINS, readable_dir

WORDS = "cat\nmat\non\nsat\nthe\n"
LOAD_TIMEOUT_S = 240.0  # the sample's compile takes ~15 s on a busy machine
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def dict_dir() -> Iterator[Path]:
    with readable_dir("wccdict", {"words.txt": WORDS}) as directory:
        yield directory


@pytest.fixture(scope="module")
def svc(dict_dir: Path) -> Iterator[RunningService]:
    running = start_service(workers=2, config={
        "wasi": {"scratch_mb": 1},
        "compile": {"timeout_ms": 240_000},
        "binaries": {"upper_py": {"dirs": {'"/data"': str(dict_dir)}}},
        "host_methods": {
            "echo": {"target": "wasmcore.plugins.methods:echo", "tenants": "*"},
            "whoami": {"target": "wasmcore.plugins.methods:whoami", "tenants": ["alice"]},
        },
    })
    try:
        yield running
    finally:
        running.cleanup()


@pytest.fixture(scope="module")
def py_id(svc: RunningService) -> str:
    with svc.client(timeout_s=LOAD_TIMEOUT_S) as client:
        return client.load(PLUGINS / "components" / "upper_py.wasm").binary_id


def scratch_contents(service: RunningService) -> list[str]:
    root = service.workdir / "data" / "scratch"
    return [name for kept in root.iterdir() for name in os.listdir(kept)]


def test_arguments_arrive_with_the_binary_name_as_argv0(svc, py_id):
    with svc.client() as client:
        done = client.execute(py_id, env={"OP": "args"}, args=["one", "two words", ""])
        assert done.output == b"upper_py\none\ntwo words\n\n"
        # and the next execution gets its own
        assert client.execute(py_id, env={"OP": "args"}).output == b"upper_py\n"


def test_the_existing_behaviour_stays(svc, py_id):
    with svc.client() as client:
        done = client.execute(py_id, b"hello", env={"SUFFIX": "!"}, args=["ignored"])
    assert done.output == b"HELLO!"
    assert done.logs == ["python plugin: 5 bytes in"]


def test_a_mapped_dir_is_readable(svc, py_id):
    with svc.client() as client:
        done = client.execute(py_id, env={"OP": "read", "PATH": "/data/words.txt"})
        assert done.output == WORDS.encode()
        listing = client.execute(py_id, env={"OP": "ls", "PATH": "/data"})
        assert listing.output == b"words.txt\n"


def test_a_mapped_dir_is_read_only(svc, py_id, dict_dir):
    with svc.client() as client:
        for path in ("/data/evil", "/data/words.txt"):
            with pytest.raises(PluginError) as err:
                client.execute(py_id, b"x", env={"OP": "write", "PATH": path})
            assert err.value.details["plugin_message"].startswith("write: ")
    assert sorted(os.listdir(dict_dir)) == ["words.txt"]
    assert (dict_dir / "words.txt").read_text() == WORDS


def test_no_other_host_path(svc, py_id):
    with svc.client() as client:
        for path in ("/", "/etc", "/tmp/..", "/data/.."):
            with pytest.raises(PluginError):
                client.execute(py_id, env={"OP": "ls", "PATH": path})


def test_scratch_works_within_a_run_and_vanishes_after(svc, py_id):
    with svc.client() as client:
        done = client.execute(py_id, b"some bytes", env={"OP": "write", "PATH": "/tmp/a"})
        assert done.output == b"wrote 10: some bytes"
        # Every later execution starts with an empty /tmp, on either worker.
        for _ in range(6):
            assert client.execute(py_id, env={"OP": "ls", "PATH": "/tmp"}).output == b""
            with pytest.raises(PluginError):
                client.execute(py_id, env={"OP": "read", "PATH": "/tmp/a"})
            client.execute(py_id, b"b", env={"OP": "write", "PATH": "/tmp/b"})
    assert scratch_contents(svc) == []


def test_over_the_scratch_cap_is_scratch_limit(svc, py_id):
    with svc.client() as client:
        with pytest.raises(ScratchLimit) as err:
            client.execute(py_id, env={"OP": "fill", "PATH": "/tmp/big", "SIZE": str(2 * MiB)})
        assert err.value.details["limit"] == MiB
        assert err.value.details["scratch_bytes"] > MiB
        # Under the cap is fine.
        done = client.execute(py_id, env={"OP": "fill", "PATH": "/tmp/s", "SIZE": str(MiB // 2)})
        assert done.output == b"filled"
    assert scratch_contents(svc) == []


def test_a_component_writing_on_past_the_cap_is_stopped_while_it_runs(svc, py_id):
    # Without SIZE it writes for ever: the scratch watch stops it through the epoch (not the
    # 60 s timeout) with SCRATCH_LIMIT.
    with svc.client() as client:
        with pytest.raises(ScratchLimit) as err:
            client.execute(py_id, env={"OP": "fill", "PATH": "/tmp/flood"}, timeout_ms=60_000)
        assert err.value.details["scratch_bytes"] > MiB
        assert err.value.details["wall_time_us"] < 60_000_000
        assert client.execute(py_id, env={"OP": "ls", "PATH": "/tmp"}).output == b""
    assert scratch_contents(svc) == []


def host_call(client, binary_id: str, method: str, request: str) -> tuple[str, object]:
    """("ok" or "err", decoded JSON) of one host.call the Python sample makes."""
    done = client.execute(binary_id, request.encode(), env={"OP": "call", "METHOD": method})
    tag, _, body = bytes(done.output).decode().partition(" ")
    return tag, json.loads(body)


def test_host_call_reaches_the_operators_methods(svc, py_id):
    request = {"text": "héllo", "n": [1, 2.5, None, True]}
    with svc.client() as client:
        assert host_call(client, py_id, "echo", json.dumps(request)) == ("ok", request)
        tag, error = host_call(client, py_id, "nope", "{}")
        assert tag == "err" and error["error"]["code"] == "NOT_FOUND"
        tag, error = host_call(client, py_id, "echo", "not json")
        assert tag == "err" and error["error"]["code"] == "BAD_REQUEST"
        # whoami is alice's only: another tenant is refused
        tag, error = host_call(client, py_id, "whoami", "{}")
        assert tag == "err" and error["error"]["code"] == "NOT_ALLOWED"
    with svc.client(tenant="alice", timeout_s=LOAD_TIMEOUT_S) as alice:
        mine = alice.load(PLUGINS / "components" / "upper_py.wasm").binary_id
        # The method is told the execution's tenant, never a name the plugin picks.
        assert host_call(alice, mine, "whoami", "{}") == (
            "ok", {"tenant": "alice", "method": "whoami"})
