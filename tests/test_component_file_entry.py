"""A component's `process-file` entry through the real service (wit/wasm-core.wit, world
`file-plugin`): the input and output as files in the execution's scratch /tmp, with the Rust
sample plugins/rust/upper_component.wasm. What the host must not trust: the guest decides what
is at the output's name (a symlink to a host file, say) and how much it writes there."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import PLUGINS
from wasmcore.client.launcher import RunningService, start_service
from wasmcore.protocol import errors

UPPER_COMPONENT = PLUGINS / "rust" / "upper_component.wasm"
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def svc() -> Iterator[RunningService]:
    running = start_service(workers=1, config={"limits": {"output_bytes": 2 * MiB}})
    try:
        yield running
    finally:
        running.cleanup()


@pytest.fixture(scope="module")
def upper(svc: RunningService) -> str:
    with svc.client() as c:
        return c.load(UPPER_COMPONENT).binary_id


def scratch_entries(svc: RunningService) -> list[str]:
    """Everything left in the service's scratch directories."""
    root = Path(svc.workdir) / "data" / "scratch"
    return [str(p) for p in root.rglob("*") if not p.is_dir()]


def test_file_entry_is_listed(svc: RunningService, upper: str) -> None:
    with svc.client() as c:
        info = next(b for b in c.list() if b.binary_id == upper)
    assert info.exports == ["process", "process-stream", "process-file"]


def test_one_mib_round_trip_through_files(svc: RunningService, upper: str) -> None:
    data = bytes(range(97, 123)) * (MiB // 26) + b"q" * (MiB % 26)
    with svc.client() as c:
        result = c.execute(upper, data, entry="process-file", env={"SUFFIX": "."})
    assert bytes(result.output) == data.upper() + b"."
    assert result.logs == [f"rust plugin: {MiB} bytes in"]
    assert scratch_entries(svc) == []  # input and output gone with the execution


def test_empty_input_and_small_output(svc: RunningService, upper: str) -> None:
    with svc.client() as c:
        assert c.execute(upper, b"", entry="process-file").output == b""
        assert c.execute(upper, b"", entry="process-file", env={"SUFFIX": "x"}).output == b"x"
        assert c.execute(upper, b"hi", entry="process-file").output == b"HI"
        with pytest.raises(errors.PluginError, match="asked to fail"):
            c.execute(upper, b"fail", entry="process-file")


def test_output_over_the_cap_is_output_limit(svc: RunningService, upper: str) -> None:
    """The same code as a stream entry's: OUTPUT_LIMIT, and the worker goes on."""
    with svc.client() as c:
        with pytest.raises(errors.OutputLimit):
            c.execute(upper, b"a" * (2 * MiB), entry="process-file", env={"SUFFIX": "!"})
        assert c.execute(upper, b"ok", entry="process-file").output == b"OK"
    assert scratch_entries(svc) == []


@pytest.mark.parametrize("target", ["/etc/hostname", "../../../../../../../../../../etc/hostname",
                                    "."])
def test_output_symlink_is_refused_not_followed(svc: RunningService, upper: str,
                                                target: str) -> None:
    """The guest makes its output a symlink (to a host file, or to /tmp itself): the host
    refuses it, PLUGIN_ERROR, and never returns what it points at."""
    host_file = Path("/etc/hostname").read_bytes() if os.path.exists("/etc/hostname") else b""
    with svc.client() as c:
        with pytest.raises(errors.PluginError) as refused:
            c.execute(upper, b"secret input", entry="process-file",
                      env={"OUTPUT_SYMLINK": target})
        assert c.execute(upper, b"after", entry="process-file").output == b"AFTER"
    message = refused.value.message
    if target.startswith("/"):  # WASI refuses to make an absolute link (NOTPERMITTED)
        assert "symlink /tmp/output" in message, message
    else:  # made, pointing out of /tmp or not: the host refuses to follow it
        assert "is a symlink" in message, message
    if host_file.strip():
        assert host_file.strip().decode() not in message
    assert "secret input" not in message
    assert scratch_entries(svc) == []
