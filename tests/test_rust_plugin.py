"""The Rust sample plugins through the real service: plugins/rust/textkit (core ABI) and
plugins/rust/upper_component (a component; its tests run once the tree runs components)."""

from __future__ import annotations

import base64
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import PLUGINS
from wasmcore.protocol import errors

TEXTKIT = PLUGINS / "rust" / "textkit.wasm"


@pytest.fixture(scope="module")
def textkit(service) -> str:
    with service.client() as c:
        return c.load(TEXTKIT).binary_id


def test_word_stats_as_json_with_logs(service, textkit):
    text = "The cat and the hat.\nThe END, the end\nÉté été café"
    with service.client() as c:
        result = c.execute(textkit, text.encode())
    stats = json.loads(result.output)
    assert stats == {
        "bytes": len(text.encode()),
        "chars": len(text),
        "words": 12,
        "lines": 3,
        "distinct": 7,
        "top": [["the", 4], ["end", 2], ["été", 2]],
    }
    assert result.logs == ["textkit: 12 words, 7 distinct"]
    with service.client() as c:  # the exact bytes plugins/README.md shows
        assert c.execute(textkit, b"b a b").output == (
            b'{"bytes":5,"chars":5,"words":3,"lines":1,"distinct":2,"top":[["b",2],["a",1]]}')


def test_env_sets_how_many_words_are_ranked(service, textkit):
    with service.client() as c:
        everything = c.execute(textkit, b"b a b c", env={"TOP": "10"})
        none = c.execute(textkit, b"b a b c", env={"OTHER": "x", "TOP": "0"})
        empty = c.execute(textkit, b"")
    assert json.loads(everything.output)["top"] == [["b", 2], ["a", 1], ["c", 1]]
    assert json.loads(none.output)["top"] == []
    assert json.loads(empty.output) == {
        "bytes": 0, "chars": 0, "words": 0, "lines": 0, "distinct": 0, "top": [],
    }


def test_bad_env_value_is_a_plugin_error_with_its_code(service, textkit):
    with service.client() as c:
        with pytest.raises(errors.PluginError) as info:
            c.execute(textkit, b"words", env={"TOP": "many"})
    assert info.value.details["plugin_code"] == 2
    assert info.value.details["logs"] == ['textkit: TOP must be a non-negative integer, got "many"']


def test_other_entries(service, textkit):
    data = bytes(range(256)) * 3 + b"xy"
    with service.client() as c:
        assert c.execute(textkit, data, entry="base64").output == base64.b64encode(data)
        assert c.execute(textkit, b"", entry="base64").output == b""
        repeated = c.execute(textkit, b"ab-", entry="repeat", env={"TIMES": "4"})
    assert repeated.output == b"ab-ab-ab-ab-"
    assert repeated.logs == ["textkit: repeat 3 bytes 4 times"]


def test_panic_is_a_trap_and_its_message_is_logged(service, textkit):
    with service.client() as c:
        with pytest.raises(errors.Trap) as info:
            c.execute(textkit, b"not \xff UTF-8")
        # the worker that ran it is fine afterwards
        for _ in range(4):
            assert json.loads(c.execute(textkit, b"ok ok").output)["words"] == 2
    [line] = info.value.details["logs"]
    assert line.startswith("textkit panicked at src/lib.rs:")
    assert "input must be UTF-8 text" in line


def test_allocation_failure_under_a_small_memory_limit_fails_the_execution(service, textkit):
    """std's alloc error handler aborts (`unreachable`) when memory.grow is refused."""
    with service.client() as c:
        with pytest.raises((errors.Trap, errors.MemoryLimit)) as info:
            c.execute(textkit, b"x" * 1024, entry="repeat", env={"TIMES": "8192"}, memory_mb=4)
        assert info.value.details["logs"] == ["textkit: repeat 1024 bytes 8192 times"]
        # the same request under the default limit (64 MiB) succeeds: 8 MiB of output
        assert len(c.execute(textkit, b"x" * 1024, entry="repeat",
                             env={"TIMES": "8192"}).output) == 1024 * 8192


def test_endless_loop_times_out(service, textkit):
    with service.client() as c:
        with pytest.raises(errors.Timeout):
            c.execute(textkit, b"", entry="spin", timeout_ms=200)
        assert c.execute(textkit, b"", entry="base64").output == b""


# ---------------------------------------------------------------- the Rust component

UPPER_COMPONENT = PLUGINS / "rust" / "upper_component.wasm"
needs_components = pytest.mark.skipif(
    importlib.util.find_spec("wasmcore.sandbox_worker.component") is None,
    reason="this tree's service does not run components yet (they come with the components "
           "branch: wit/wasm-core.wit, sandbox_worker/component.py)",
)


@pytest.fixture(scope="module")
def upper_component(service, tmp_path_factory) -> str:
    """Loaded by path from a private copy (the reload test rewrites the file)."""
    path = tmp_path_factory.mktemp("rust-component") / UPPER_COMPONENT.name
    shutil.copyfile(UPPER_COMPONENT, path)
    with service.client() as c:
        return c.load(path).binary_id


@needs_components
def test_component_kind_entries_output_env_and_logs(service, upper_component):
    with service.client() as c:
        info = next(b for b in c.list() if b.binary_id == upper_component)
        result = c.execute(upper_component, b"hello", env={"SUFFIX": "!"})
        plain = c.execute(upper_component, b"abc")
    assert (info.kind, info.exports) == ("component", ["process", "process-stream", "process-file"])
    assert result.output == b"HELLO!"
    assert result.logs == ["rust plugin: 5 bytes in"]
    assert plain.output == b"ABC"


@needs_components
def test_component_err_trap_and_loop(service, upper_component):
    with service.client() as c:
        with pytest.raises(errors.PluginError) as failed:
            c.execute(upper_component, b"fail")
        with pytest.raises(errors.Trap) as trapped:
            c.execute(upper_component, b"trap")
        with pytest.raises(errors.Timeout):
            c.execute(upper_component, b"loop", timeout_ms=300)
        assert c.execute(upper_component, b"ok").output == b"OK"
    assert "asked to fail" in failed.value.message
    panic_line = trapped.value.details["logs"][-1]
    assert panic_line.startswith("rust plugin panicked at src/lib.rs:")
    assert panic_line.endswith(": asked to trap")


@needs_components
def test_component_stream_entry_and_a_chain_with_a_core_module(service, upper_component):
    data = bytes(range(97, 123)) * 80_000  # ~2 MiB of a-z
    with service.client() as c:
        streamed = c.execute(upper_component, data, entry="process-stream", env={"SUFFIX": "."})
        rot13 = c.load(PLUGINS / "rot13.wat").binary_id
        chained = c.chain([rot13, upper_component, textkit_id(c)], b"hello world")
    assert streamed.output == data.upper() + b"."
    assert streamed.logs == [f"rust plugin: {len(data)} bytes in"]
    # rot13 -> "uryyb jbeyq", upper -> "URYYB JBEYQ", textkit counts the words
    assert json.loads(chained.output)["top"] == [["jbeyq", 1], ["uryyb", 1]]


@needs_components
def test_component_rebuilt_in_place_keeps_its_uuid(service, upper_component):
    with service.client() as c:
        before = next(b for b in c.list() if b.binary_id == upper_component)
        # A new binary, as a rebuild gives: the same component with a custom section appended.
        name = b"wasm-core-test"
        body = bytes([len(name)]) + name + b"rebuilt"
        Path(before.path).write_bytes(UPPER_COMPONENT.read_bytes() + b"\x00" + bytes([len(body)])
                                      + body)
        reloaded = c.load(before.path)
        result = c.execute(upper_component, b"hi")
    assert reloaded.binary_id == upper_component and reloaded.version == before.version + 1
    assert (result.output, result.version) == (b"HI", reloaded.version)


def textkit_id(client) -> str:
    return client.load(TEXTKIT).binary_id
