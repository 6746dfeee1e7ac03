"""Out of memory reads MEMORY_LIMIT, not TRAP, through the real server (issue 13, Limits):
a plugin that fails after the memory limit refused one of its grows gets MEMORY_LIMIT with
the requested and allowed sizes in details, whatever its memory size when it failed; a trap
that has nothing to do with memory stays TRAP."""

from __future__ import annotations

import pytest

from tests.conftest import HOSTILE, PLUGINS, raw_dealer
from wasmcore.client.launcher import RunningService
from wasmcore.protocol import errors
from wasmcore.protocol import messages as p

MiB = 1024 * 1024
PAGE = 64 * 1024


def _refused(service: RunningService, plugin: str, data: bytes,
             memory_mb: int = 16) -> dict[str, object]:
    with service.client() as c:
        binary = c.load(PLUGINS / plugin).binary_id
        with pytest.raises(errors.MemoryLimit) as stopped:
            c.execute(binary, data, memory_mb=memory_mb)
    details = stopped.value.details
    assert details["allowed_bytes"] == details["memory_bytes"] == memory_mb * MiB
    assert details["requested_bytes"] > memory_mb * MiB
    assert "unreachable" in str(details["trap_message"])
    return details


def test_growing_16_pages_at_a_time(service: RunningService) -> None:
    """1 + 15 x 16 = 241 pages, then a grow to 257 is refused: memory ends below the cap
    (a size-only check read this as a plain TRAP)."""
    details = _refused(service, "hostile/grow16.wat", b"x")
    assert details["current_bytes"] == 241 * PAGE
    assert details["requested_bytes"] == 257 * PAGE


def test_one_large_allocation_refused(service: RunningService) -> None:
    details = _refused(service, "hostile/big_alloc.wat", b"x")
    assert details["current_bytes"] == PAGE
    assert details["requested_bytes"] == PAGE + 1024 * PAGE


def test_c_plugin_whose_malloc_fails(service: RunningService) -> None:
    """wasi-libc's malloc returns NULL when the grow is refused; the plugin calls
    __builtin_trap()."""
    details = _refused(service, "malloc_fail.wasm", b"x")
    assert details["current_bytes"] < 16 * MiB - PAGE  # below the cap: not a size guess


def test_c_plugin_one_large_malloc(service: RunningService) -> None:
    details = _refused(service, "malloc_fail.wasm", b"y" * 40)  # malloc(40 MiB)
    assert details["requested_bytes"] >= 40 * MiB
    with service.client() as c:  # the same allocation under a larger limit succeeds
        binary = c.load(PLUGINS / "malloc_fail.wasm").binary_id
        assert c.execute(binary, b"y" * 40, memory_mb=64).output == b""


def test_plain_traps_stay_traps(service: RunningService) -> None:
    with service.client() as c:
        for plugin in ("trap.wat", "trap_divzero.wat"):
            binary = c.load(HOSTILE / plugin).binary_id
            with pytest.raises(errors.Trap):
                c.execute(binary, "x", memory_mb=16)
        # a grow that succeeded is no reason either
        big = c.load(HOSTILE / "big_alloc.wat").binary_id
        assert c.execute(big, "x", memory_mb=80).output == b""


def test_memory_limit_on_the_wire(service: RunningService) -> None:
    """The reply itself: code MEMORY_LIMIT, the sizes in details."""
    with service.client() as c:
        binary = c.load(HOSTILE / "grow16.wat").binary_id
    with raw_dealer(service.endpoint) as sock:
        sock.send_multipart([p.encode(p.Execute(id=9, binary_id=binary, memory_mb=16)), b"x"])
        assert sock.poll(10_000)
        reply = p.reply_decoder.decode(sock.recv_multipart()[0])
    assert isinstance(reply, p.ErrorReply) and reply.code == "MEMORY_LIMIT"
    assert reply.details["requested_bytes"] == 257 * PAGE
    assert reply.details["allowed_bytes"] == 16 * MiB
