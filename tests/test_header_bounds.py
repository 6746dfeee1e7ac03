"""Bounded headers: nothing a client puts in a header frame can stall the loop, blow up a reply,
or get healthy workers killed. Every attack goes through a raw DEALER, as an attacker would."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import msgspec
import pytest

from tests.conftest import HOSTILE, PLUGINS, exchange, raw_dealer, wait_for
from wasmcore.client.core import AsyncClient
from wasmcore.client.launcher import RunningService, start_service
from wasmcore.protocol import errors
from wasmcore.protocol import messages as p

UUID = "5cb99e8b-5f98-41c9-b877-7976f62188b9"
SMALL_REPLY = 4096  # an error reply is a few hundred bytes; anything echoing the attack is not


@pytest.fixture(scope="module")
def bounded() -> Any:
    """Two workers, default heartbeat settings; a slow binary for the request in flight."""
    running = start_service(workers=2, config={"limits": {"fuel": 10**13, "timeout_ms": 30_000}})
    try:
        with running.client(tenant="bystander") as c:
            hog = c.load(HOSTILE / "rss_hog.wat").binary_id
        with running.client() as c:  # the raw sockets' tenant's own binary: requests run
            upper = c.load(PLUGINS / "uppercase.wat").binary_id
        yield running, hog, upper
    finally:
        running.cleanup()


class InFlight:
    """Another tenant's request, running on a worker while the attack arrives."""

    def __init__(self, service: RunningService, hog: str) -> None:
        self.outcome: Any = None
        slow = (0).to_bytes(4, "little") + (3000).to_bytes(4, "little")  # seconds of spinning

        def run() -> None:
            try:
                with service.client(tenant="bystander", timeout_s=60) as c:
                    self.outcome = c.execute(hog, slow, timeout_ms=30_000, fuel=10**13)
            except Exception as exc:  # kept and asserted on below
                self.outcome = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def result(self) -> Any:
        self.thread.join(timeout=90)
        assert not self.thread.is_alive(), "the request in flight got no reply"
        return self.outcome


def _wait_busy(service: RunningService) -> None:
    with service.client() as c:
        wait_for(lambda: any(w.state == "busy" for w in c.stats().workers), 30,
                 "the request in flight to start")


def _huge_chain(binary_id: str) -> bytes:
    return msgspec.msgpack.encode(
        {"type": "chain", "id": 7, "binary_ids": [binary_id] * 3_000_000})  # 114 MB


def _huge_env(binary_id: str) -> bytes:
    env = {f"K{i:07d}": "v" * 40 for i in range(1_000_000)}  # about 50 MB
    return msgspec.msgpack.encode({"type": "execute", "id": 8, "binary_id": binary_id,
                                   "env": env})


def _huge_tenant(binary_id: str) -> bytes:
    return msgspec.msgpack.encode(
        {"type": "execute", "id": 9, "binary_id": UUID, "tenant": "t" * 100_000_000})


@pytest.mark.parametrize("build", [_huge_chain, _huge_env, _huge_tenant],
                         ids=["chain-3M-steps", "env-50MB", "tenant-100MB"])
def test_huge_header_gets_a_small_error_and_hurts_nobody(bounded, build) -> None:
    """A 114 MB chain, a 50 MB env, a 100 MB tenant name: each gets one small
    PAYLOAD_TOO_LARGE naming the limit, another tenant's request in flight meanwhile completes,
    and no worker is killed for missed heartbeats."""
    service, hog, upper = bounded
    header = build(upper)
    bystander = InFlight(service, hog)
    _wait_busy(service)
    with raw_dealer(service.endpoint) as sock:
        sock.send_multipart([header, b"input"])
        assert sock.poll(60_000), "no reply to the oversized header"
        frames = sock.recv_multipart()
    assert len(frames[0]) < SMALL_REPLY, f"a {len(frames[0])}-byte reply"
    reply = p.reply_decoder.decode(frames[0])
    assert isinstance(reply, p.ErrorReply) and reply.code == "PAYLOAD_TOO_LARGE", reply
    assert "server.max_header_bytes" in reply.message and "65536" in reply.message, reply
    assert reply.details["limit"] == 65536 and reply.details["size"] == len(header)
    outcome = bystander.result()
    assert not isinstance(outcome, Exception), outcome
    assert outcome.output == b"", outcome
    with service.client() as c:
        stats = c.stats()
    assert "heartbeat" not in stats.restarts_by_cause, stats.restarts_by_cause
    assert stats.restarts_by_cause.get("crash", 0) == 0, stats.restarts_by_cause


def test_oversized_header_echoes_its_id_when_readable(bounded) -> None:
    """A header over the limit but small enough to peek at keeps its request id, so a client
    matching replies by id gets the error instead of waiting for a reply that never comes."""
    service, _, _ = bounded
    header = msgspec.msgpack.encode(
        {"type": "execute", "binary_id": UUID, "env": {"K": "v" * 100_000}, "id": 77})
    with raw_dealer(service.endpoint) as sock:
        reply = exchange(sock, [header])
    assert isinstance(reply, p.ErrorReply) and reply.code == "PAYLOAD_TOO_LARGE", reply
    assert reply.id == 77


# Each: a header under the size limit whose field is over its own bound; the field named in
# the error, and the bound.
FIELD_ATTACKS: list[tuple[str, dict[str, Any], str, int]] = [
    ("chain-steps", {"type": "chain", "binary_ids": [UUID] * 1025}, "binary_ids", 1024),
    ("tenant", {"type": "list", "tenant": "t" * 257}, "tenant", 256),
    ("binary-id", {"type": "execute", "binary_id": "b" * 65}, "binary_id", 64),
    ("entry", {"type": "execute", "binary_id": UUID, "entry": "e" * 257}, "entry", 256),
    ("load-name", {"type": "load", "name": "n" * 257}, "name", 256),
    ("load-path", {"type": "load", "path": "/" + "p" * 4096}, "path", 4096),
    ("env-entries", {"type": "execute", "binary_id": UUID,
                     "env": {f"K{i}": "v" for i in range(257)}}, "env", 256),
    ("env-key", {"type": "execute", "binary_id": UUID, "env": {"K" * 257: "v"}}, "env", 256),
    ("env-value", {"type": "execute", "binary_id": UUID, "env": {"K": "v" * 16_385}}, "env",
     16_384),
    ("batch-count", {"type": "execute_batch", "binary_id": UUID, "count": 4097}, "count", 4096),
    ("chain-step-id", {"type": "chain", "binary_ids": ["b" * 65]}, "binary_ids", 64),
]


@pytest.mark.parametrize("header,field,limit", [a[1:] for a in FIELD_ATTACKS],
                         ids=[a[0] for a in FIELD_ATTACKS])
def test_header_fields_are_bounded(bounded, header: dict[str, Any], field: str,
                                   limit: int) -> None:
    service, _, _ = bounded
    with raw_dealer(service.endpoint) as sock:
        reply = exchange(sock, [msgspec.msgpack.encode({**header, "id": 31})])
    assert isinstance(reply, p.ErrorReply) and reply.code == "BAD_REQUEST", reply
    assert reply.id == 31
    assert field in reply.message and str(limit) in reply.message, reply.message
    assert reply.details["limit"] == limit, reply.details


def test_execute_pack_count_is_bounded(bounded) -> None:
    """An xpack of more executes than the bound is refused whole, before any of them runs."""
    service, _, upper = bounded
    executes = [{"type": "execute", "id": i, "binary_id": upper} for i in range(8193)]
    header = msgspec.msgpack.encode({"type": "xpack", "executes": executes,
                                     "payloads": [None] * 8193})
    with raw_dealer(service.endpoint) as sock:
        sock.send_multipart([header])
        assert sock.poll(10_000)
        frames = sock.recv_multipart()
    reply = p.reply_decoder.decode(frames[0])
    if isinstance(reply, p.ReplyPack):
        assert len(reply.replies) == 1
        reply = reply.replies[0]
    assert isinstance(reply, p.ErrorReply) and reply.code == "BAD_REQUEST", reply
    assert "executes" in reply.message and "8192" in reply.message


def test_too_many_frames_refused_before_decoding(bounded) -> None:
    """More frames than any request may carry: refused on the count alone."""
    service, _, upper = bounded
    header = msgspec.msgpack.encode({"type": "execute_batch", "id": 12, "binary_id": upper,
                                     "count": 5000})
    with raw_dealer(service.endpoint) as sock:
        reply = exchange(sock, [header] + [b""] * 5000)
    assert isinstance(reply, p.ErrorReply) and reply.code == "BAD_REQUEST", reply
    assert "4096" in reply.message


def test_a_large_legitimate_pack_still_passes(bounded) -> None:
    """An xpack frame over max_header_bytes (its payloads ride inside it) is still a request."""
    service, _, upper = bounded
    pack = p.ExecutePack(executes=[p.Execute(id=i + 1, binary_id=upper) for i in range(8)],
                         payloads=[bytes([97 + i]) * 60_000 for i in range(8)])
    encoded = p.encode(pack)
    assert len(encoded) > 65536
    got: dict[int, bytes | None] = {}
    with raw_dealer(service.endpoint) as sock:
        sock.send_multipart([encoded])
        while len(got) < 8:
            assert sock.poll(10_000), f"only {sorted(got)} answered"
            frames = sock.recv_multipart()
            reply = p.reply_decoder.decode(frames[0])
            pairs = (zip(reply.replies, reply.payloads, strict=True)
                     if isinstance(reply, p.ReplyPack) else [(reply, frames[1])])
            for one, payload in pairs:
                assert isinstance(one, p.Executed), one
                got[one.id] = payload
    assert got == {i + 1: bytes([65 + i]) * 60_000 for i in range(8)}


def test_service_still_serves(bounded) -> None:
    service, _, upper = bounded
    with service.client() as c:
        assert c.execute(upper, b"fine").output == b"FINE"
    assert service.process.poll() is None


def test_one_execute_over_a_bound_fails_alone_in_its_pack(bounded) -> None:
    """An execute over a bound inside a pack is refused on its own (its id, BAD_REQUEST); the
    others in the same pack run. The real client packs every burst, so one caller's oversized
    env must not leave everybody else's requests in that burst unanswered."""
    service, _, upper = bounded

    async def burst() -> list[Any]:
        async with AsyncClient(service.endpoint, timeout_s=20) as c:
            return await asyncio.gather(
                c.execute(upper, b"one"),
                c.execute(upper, b"two", env={"K": "v" * (p.MAX_ENV_VALUE_CHARS + 1)}),
                c.execute(upper, b"three"),
                return_exceptions=True)

    one, two, three = asyncio.run(burst())
    assert one.output == b"ONE" and three.output == b"THREE"
    assert isinstance(two, errors.BadRequest), two
    assert two.details["limit"] == p.MAX_ENV_VALUE_CHARS and "env" in two.message
