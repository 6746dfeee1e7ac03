"""The Rust sample plugin (plugins/rust/textkit, core ABI) through the real service."""

from __future__ import annotations

import base64
import json

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
