"""WebAssembly components through the real server: the Python and JavaScript sample plugins.

The samples (plugins/components/, built by componentize-py and componentize-js) are large
(12-18 MB) and take about 15 s each to compile, so one service compiles each once for the
whole module; only the reload test compiles again (a new version must be compiled).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from wasmcore.client.launcher import RunningService, start_service
from wasmcore.protocol.errors import (
    BadRequest,
    Forbidden,
    InvalidModule,
    MemoryLimit,
    OutputLimit,
    PayloadTooLarge,
    PluginError,
    Timeout,
    Trap,
)

from .conftest import PLUGINS, wait_for

COMPONENTS = PLUGINS / "components"
SAMPLES = {"python": "upper_py.wasm", "js": "upper_js.wasm"}
LOG_LINE = {"python": "python plugin: 5 bytes in", "js": "js plugin: 5 bytes in"}
LOAD_TIMEOUT_S = 240.0  # a compile of ~15 s, on a machine that may be busy
# The first test waits for both compiles (the module's fixture), the reload test for another.
pytestmark = pytest.mark.timeout(600)


def _with_custom_section(wasm: bytes, payload: bytes) -> bytes:
    """The same component with a custom section appended: a new binary (new hash, new
    version), as a rebuild gives, without needing the toolchain in the tests."""
    name = b"wasm-core-test"
    body = bytes([len(name)]) + name + payload
    return wasm + b"\x00" + _leb128(len(body)) + body


def _leb128(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


@pytest.fixture(scope="module")
def svc() -> Iterator[RunningService]:
    # Fuel high enough that a loop in the (interpreted) JS engine meets the timeout first.
    running = start_service(workers=2, config={
        "limits": {"fuel": 10**13}, "compile": {"timeout_ms": 240_000},
        "binaries": {"py-stream-only": {"entries": ["process-stream"]}}})
    try:
        yield running
    finally:
        running.cleanup()


@pytest.fixture(scope="module")
def loaded(svc: RunningService, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """binary id per language, loaded by path from a private copy (the reload test rewrites
    the file)."""
    folder = tmp_path_factory.mktemp("components")
    ids = {}
    with svc.client(timeout_s=LOAD_TIMEOUT_S) as client:
        for language, name in SAMPLES.items():
            path = folder / name
            shutil.copyfile(COMPONENTS / name, path)
            ids[language] = client.load(path).binary_id
    return ids


@pytest.fixture(params=sorted(SAMPLES))
def language(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_component_kind_and_entries(svc: RunningService, loaded: dict[str, str],
                                    language: str) -> None:
    with svc.client() as client:
        info = next(b for b in client.list() if b.binary_id == loaded[language])
    assert info.kind == "component"
    assert info.exports == (["process", "process-stream", "process-file"]
                            if language == "python" else ["process"])


def test_output_env_and_logs(svc: RunningService, loaded: dict[str, str], language: str) -> None:
    with svc.client() as client:
        result = client.execute(loaded[language], b"hello", env={"SUFFIX": "!"})
        assert result.output == b"HELLO!"
        assert LOG_LINE[language] in result.logs
        assert result.metering.fuel_consumed > 0
        # No env, no suffix: nothing of another request's env is left behind.
        assert client.execute(loaded[language], b"abc").output == b"ABC"


def test_err_result_is_plugin_error(svc: RunningService, loaded: dict[str, str],
                                    language: str) -> None:
    with svc.client() as client, pytest.raises(PluginError) as caught:
        client.execute(loaded[language], b"fail")
    assert "asked to fail" in caught.value.message


def test_trap_is_trap_and_worker_survives(svc: RunningService, loaded: dict[str, str],
                                          language: str) -> None:
    with svc.client() as client:
        with pytest.raises(Trap) as caught:
            client.execute(loaded[language], b"trap")
        assert caught.value.details["logs"], "the guest's stderr (its traceback) is in the logs"
        assert client.execute(loaded[language], b"ok").output == b"OK"


def test_loop_is_timeout(svc: RunningService, loaded: dict[str, str], language: str) -> None:
    with svc.client() as client:
        with pytest.raises(Timeout):
            client.execute(loaded[language], b"loop", timeout_ms=300)
        assert client.execute(loaded[language], b"ok").output == b"OK"


def test_memory_limit_below_what_the_component_needs(svc: RunningService,
                                                     loaded: dict[str, str],
                                                     language: str) -> None:
    with svc.client() as client:
        with pytest.raises(MemoryLimit):
            client.execute(loaded[language], b"hi", memory_mb=4)
        assert client.execute(loaded[language], b"hi", memory_mb=32).output == b"HI"


def test_chain_mixes_component_and_core_module(svc: RunningService, loaded: dict[str, str],
                                               language: str) -> None:
    with svc.client() as client:
        rot13 = client.load(PLUGINS / "rot13.wat").binary_id
        chained = client.chain([rot13, loaded[language], rot13], b"hello")
        # rot13 -> "uryyb", upper -> "URYYB", rot13 -> "HELLO"
        assert chained.output == b"HELLO"
        assert [step.binary_id for step in chained.steps] == [rot13, loaded[language], rot13]


def test_large_input_round_trip(svc: RunningService, loaded: dict[str, str]) -> None:
    data = bytes(range(97, 123)) * 40_000  # ~1 MiB of a-z
    with svc.client() as client:
        assert client.execute(loaded["python"], data).output == data.upper()


def test_stream_entry_moves_large_payloads(svc: RunningService,
                                           loaded: dict[str, str]) -> None:
    """`process-stream`: the input is stdin, the output what the plugin writes to stdout."""
    data = bytes(range(97, 123)) * 80_000  # ~2 MiB of a-z
    with svc.client() as client:
        result = client.execute(loaded["python"], data, entry="process-stream",
                                env={"SUFFIX": "."})
        assert result.output == data.upper() + b"."
        assert "python plugin: 2080000 bytes in" in result.logs
        small = client.execute(loaded["python"], b"hello", entry="process-stream")
        assert small.output == b"HELLO"
        with pytest.raises(PluginError):
            client.execute(loaded["python"], b"fail", entry="process-stream")


def test_file_entry_moves_large_payloads(svc: RunningService, loaded: dict[str, str]) -> None:
    """`process-file`: the input is stdin, the output the file the plugin writes."""
    data = bytes(range(97, 123)) * 80_000  # ~2 MiB of a-z
    with svc.client() as client:
        result = client.execute(loaded["python"], data, entry="process-file",
                                env={"SUFFIX": "."})
        assert result.output == data.upper() + b"."
        assert client.execute(loaded["python"], b"", entry="process-file").output == b""
        with pytest.raises(PluginError):
            client.execute(loaded["python"], b"fail", entry="process-file")


def test_stream_output_is_capped(loaded: dict[str, str]) -> None:
    capped = start_service(workers=1, config={"limits": {"output_bytes": 4096}})
    try:
        with capped.client(timeout_s=LOAD_TIMEOUT_S) as client:
            binary = client.load(COMPONENTS / SAMPLES["python"]).binary_id
            with pytest.raises(OutputLimit):
                client.execute(binary, b"x" * 100_000, entry="process-stream")
            assert client.execute(binary, b"ok", entry="process-stream").output == b"OK"
    finally:
        capped.cleanup()


def test_bytes_as_values_keep_every_byte_value(svc: RunningService) -> None:
    """The hand-written echo component: list<u8> in and out, every byte value, any size."""
    with svc.client() as client:
        echo = client.load(COMPONENTS / "echo.wasm").binary_id
        for data in (b"", bytes(range(256)), bytes(range(256)) * 1000):
            assert client.execute(echo, data).output == data
        with pytest.raises(BadRequest) as caught:
            client.execute(echo, b"x", entry="nope")
        assert caught.value.details["available"] == ["process"]


def test_large_input_as_values_is_refused_with_what_to_do(svc: RunningService) -> None:
    """A list<u8> value costs the host tens of bytes per byte while wasmtime converts it: a
    big input to a values entry is refused at once, saying to use process-stream (before, 5 MiB
    spent ~2 s converting, then trapped on wasmtime's hostcall budget)."""
    with svc.client() as client:
        echo = client.load(COMPONENTS / "echo.wasm").binary_id
        with pytest.raises(PayloadTooLarge) as caught:
            client.execute(echo, b"x" * (5 * 1024 * 1024))
        assert "process-stream" in caught.value.message
        with pytest.raises(PayloadTooLarge):
            client.execute(echo, b"x" * (1024 * 1024 + 1))
        assert client.execute(echo, b"x" * (1024 * 1024)).output == b"x" * (1024 * 1024)


def test_component_importing_what_is_not_provided_is_refused_at_load(
        svc: RunningService) -> None:
    text = (COMPONENTS / "wat" / "echo.wat").read_text()
    foreign = text.replace("(component", '(component (import "wasi:http/types@0.2.0" (instance))',
                           1)
    with svc.client() as client, pytest.raises(InvalidModule) as caught:
        client.load(data=foreign.encode(), name="needs-http")
    assert caught.value.details["missing_imports"] == ["wasi:http/types@0.2.0"]


def test_entry_list_applies_to_components(svc: RunningService, loaded: dict[str, str]) -> None:
    """[binaries.<name>] entries: the same bytes under another name (no second compile) may
    only run `process-stream`, which calls without an entry get."""
    with svc.client() as client:
        binary = client.load(data=(COMPONENTS / SAMPLES["python"]).read_bytes(),
                             name="py-stream-only").binary_id
        big = b"a" * (2 * 1024 * 1024)  # over what `process` takes: only the stream entry can
        assert client.execute(binary, big).output == big.upper()
        with pytest.raises(Forbidden):
            client.execute(binary, b"x", entry="process")


def test_hot_reload_of_rebuilt_component_keeps_uuid(svc: RunningService, loaded: dict[str, str],
                                                    language: str) -> None:
    with svc.client(timeout_s=LOAD_TIMEOUT_S) as client:
        before = next(b for b in client.list() if b.binary_id == loaded[language])
        rebuilt = _with_custom_section((COMPONENTS / SAMPLES[language]).read_bytes(),
                                       b"rebuilt")
        Path(before.path).write_bytes(rebuilt)

        def reloaded() -> bool:
            now = next(b for b in client.list() if b.binary_id == loaded[language])
            return now.version > before.version

        wait_for(reloaded, LOAD_TIMEOUT_S, f"the rebuilt {language} component")
        result = client.execute(loaded[language], b"hi")
        assert result.output == b"HI"
        assert result.version == before.version + 1
        assert result.binary_id == before.binary_id
