"""Per-binary `entries` apply to every step of a chain, as to execute: a chain cannot call an
entry the operator did not allow (before, each step ran its module's default entry whatever
the configured list said)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from wasmcore.client.launcher import RunningService, start_service
from wasmcore.protocol import errors

PLUGINS = Path(__file__).resolve().parent.parent / "plugins"


@pytest.fixture(scope="module")
def svc() -> Iterator[RunningService]:
    running = start_service(workers=1, config={"tenants": {"default": {"binaries": {
        # multi_entry: `process` echoes; `hello` (no arguments) outputs "hello".
        "greeter": {"entries": ["hello"]},
        "locked": {"entries": ["not-exported"]},
    }}}})
    try:
        yield running
    finally:
        running.cleanup()


def _load_as(client, name: str) -> str:
    return client.load(data=(PLUGINS / "multi_entry.wasm").read_bytes(), name=name).binary_id


def test_a_chain_step_runs_the_binarys_configured_entry(svc: RunningService) -> None:
    with svc.client() as c:
        greeter = _load_as(c, "greeter")
        upper = c.load(PLUGINS / "uppercase.wat").binary_id
        assert bytes(c.execute(greeter).output) == b"hello"
        # Step 1 is `hello` (configured), not the default `process` echo of the input.
        assert bytes(c.chain([greeter, upper], b"").output) == b"HELLO"


def test_a_chain_through_a_binary_with_no_allowed_entry_is_refused(svc: RunningService) -> None:
    with svc.client() as c:
        locked = _load_as(c, "locked")
        upper = c.load(PLUGINS / "uppercase.wat").binary_id
        with pytest.raises(errors.BadRequest) as refused:
            c.execute(locked, b"x")
        with pytest.raises(errors.BadRequest) as chained:
            c.chain([upper, locked], b"x")
        assert chained.value.details["allowed"] == refused.value.details["allowed"]
