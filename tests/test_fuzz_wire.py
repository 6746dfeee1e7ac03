"""Fuzzing the wire protocol against a real service (hypothesis, bounded and reproducible).

Messages are built the way docs/protocol.md describes them and then bent: every request kind
with random types and values in every field (or the field left out), xpack with random executes
and payload lists, random numbers of payload frames, a REQ-style empty delimiter or not,
mutated encodings and plain garbage. All of it goes through one raw DEALER, as an attacker
would send it. The property: every message gets exactly the replies the protocol promises (one,
or one per execute of a well-formed pack), every reply decodes (packed or not), the service
stays up, and another client's ordinary execute works afterwards. Frames stay far below
ZMQ_MAXMSGSIZE (a frame over it drops the connection, by design, with no reply).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import PLUGINS, raw_dealer
from wasmcore.client.launcher import RunningService, start_service
from wasmcore.protocol import messages as p

REPLY_WAIT_MS = 20_000
SENTINEL_BASE = -(2**62)  # ids the generated requests never use (they stay >= -2**31)


@dataclass
class Target:
    service: RunningService
    sock: zmq.Socket
    upper: str  # the fuzzing tenant's ("default") own binary, so some requests really run
    sentinels: Iterator[int]


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    service = start_service(workers=2, config={"limits": {"timeout_ms": 2000}})
    try:
        with service.client() as c:
            upper = c.load(PLUGINS / "uppercase.wat").binary_id
        with raw_dealer(service.endpoint) as sock:
            t = Target(service, sock, upper, iter(range(SENTINEL_BASE, 0)))
            # This connection packs from the start, so any of its replies may come packed
            # (and a REQ-style one must not).
            first = p.ExecutePack(executes=[p.Execute(id=1, binary_id=upper)], payloads=[b"a"])
            exchange_and_count(t, [[p.encode(first)]])
            yield t
    finally:
        service.cleanup()


# --------------------------------------------------------------------------- strategies

UPPER = "<upper>"  # replaced by the real binary id when a message is built

junk = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(), st.text(max_size=12), st.binary(max_size=12),
    st.lists(st.integers(min_value=-5, max_value=5), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(min_value=0, max_value=9), max_size=2),
)


def either(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a value of the right type, sometimes anything at all."""
    return st.one_of(valid, valid, valid, junk)


ids = either(st.integers(min_value=-(2**31), max_value=2**31))
tenants = either(st.sampled_from(["default", "other"]) | st.text(max_size=8)
                 | st.just("t" * 300))
binary_ids = either(st.just(UPPER) | st.text(max_size=40) | st.just("b" * 70))
small_ints = either(st.none() | st.integers(min_value=-10, max_value=10**7))
envs = either(st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=4)
              | st.just({"K" * 300: "v"}) | st.just({f"K{i}": "v" for i in range(300)}))
entries = either(st.none() | st.sampled_from(["process", "_start", "nope"]) | st.text(max_size=8))
shm_refs = either(st.none() | st.tuples(st.text(max_size=40), st.integers(-5, 10**9))
                  .map(list))
pids = either(st.sampled_from([0, os.getpid(), 1, 2**31]))
shm_names = either(st.just("") | st.text(max_size=40))

args = either(st.lists(st.text(max_size=8), max_size=4) | st.just(["x" * 5000])
              | st.just(["a"] * 300) | st.just(["nul\x00"]))
RUN_OPTIONS = {"timeout_ms": small_ints, "memory_mb": small_ints, "fuel": small_ints,
               "env": envs, "args": args}
FIELDS: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "execute": {"binary_id": binary_ids, "entry": entries, "input_shm": shm_refs,
                "output_shm_pid": pids, "output_shm_into": shm_names, **RUN_OPTIONS},
    "execute_batch": {"binary_id": binary_ids, "entry": entries,
                      "count": either(st.integers(min_value=-2, max_value=6)), **RUN_OPTIONS},
    "chain": {"binary_ids": either(st.lists(binary_ids, max_size=4) | st.just([UPPER] * 1025)),
              **RUN_OPTIONS},
    "load": {"path": either(st.sampled_from([None, "/nonexistent/m.wat", "/", "", "/tmp"])
                            | st.text(max_size=8).map(lambda t: "/nonexistent/" + t)),
             "name": either(st.none() | st.text(max_size=8))},
    "list": {}, "unload": {"binary_id": binary_ids}, "stats": {}, "hello": {},
}


def request_map(kind: str) -> st.SearchStrategy[dict[str, Any]]:
    """A map of one request kind: each field present or not, its value valid or not; the tag
    itself now and then something else."""
    tag = st.just(kind) if kind != "junk-tag" else either(st.sampled_from(["nope", "rpack"]))
    fields = FIELDS.get(kind, {})
    return st.fixed_dictionaries({"type": tag},
                                 optional={"id": ids, "tenant": tenants, **fields})


executes = either(request_map("execute"))
payload_items = either(st.none() | st.binary(max_size=64))
any_packs = st.fixed_dictionaries({"type": st.just("xpack")}, optional={
    "executes": either(st.lists(executes, max_size=6)),
    "payloads": either(st.lists(payload_items, max_size=7)),
})


@st.composite
def well_formed_packs(draw: st.DrawFn) -> dict[str, Any]:
    """As many payloads as executes: the pack is taken, each execute answered on its own."""
    items = draw(st.lists(executes, min_size=1, max_size=5))
    payloads = draw(st.lists(payload_items, min_size=len(items), max_size=len(items)))
    return {"type": "xpack", "executes": items, "payloads": payloads}


headers = st.one_of(*(request_map(kind) for kind in [*FIELDS, "junk-tag"]), any_packs,
                    well_formed_packs(), well_formed_packs())


@st.composite
def messages(draw: st.DrawFn) -> list[Any]:
    """Frames as a client would send them (the real binary id still a placeholder)."""
    shape = draw(st.sampled_from(["map", "map", "map", "mutated", "garbage"]))
    extra = draw(st.lists(st.binary(max_size=128), max_size=4))
    if shape == "garbage":
        header: Any = draw(st.binary(max_size=96))
    else:
        header = draw(headers)
        if header["type"] == "execute_batch" and draw(st.booleans()):
            header["count"] = len(extra)
        if header["type"] == "xpack" and draw(st.integers(0, 3)):
            extra = []  # a pack is a single frame
        if shape == "mutated":
            header = ("mutate", header, draw(st.integers(0, 2**16)), draw(st.sampled_from(
                ["flip", "truncate", "insert", "append"])), draw(st.binary(min_size=1, max_size=4)))
    delimited = draw(st.integers(0, 4)) == 0
    return [delimited, header, extra]


def _encode(header: Any, upper: str) -> bytes:
    if isinstance(header, bytes):
        return header
    if isinstance(header, tuple):  # ("mutate", map, where, how, bytes)
        _, inner, where, how, noise = header
        data = bytearray(_encode(inner, upper))
        at = where % len(data)
        if how == "flip":
            data[at] ^= noise[0] or 0xFF
        elif how == "truncate":
            del data[at:]
        elif how == "insert":
            data[at:at] = noise
        else:
            data += noise
        return bytes(data)
    return msgspec.msgpack.encode(_with_upper(header, upper))


def _with_upper(value: Any, upper: str) -> Any:
    if value == UPPER:
        return upper
    if isinstance(value, list):
        return [_with_upper(v, upper) for v in value]
    if isinstance(value, dict):
        return {k: _with_upper(v, upper) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------- the oracle


def expected_replies(frames: list[bytes]) -> int:
    """How many replies the protocol promises for these frames: one per execute of a
    well-formed pack (even when some of its executes do not decode), else exactly one."""
    body = frames[1:] if len(frames) > 1 and frames[0] == b"" else frames
    header = body[0]
    try:
        request = p.request_decoder.decode(header)
    except msgspec.DecodeError:
        try:
            request = p.undecoded_pack_decoder.decode(header)
        except msgspec.DecodeError:
            return 1
    if not isinstance(request, p.ExecutePack | p.UndecodedPack):
        return 1
    if len(body) != 1 or not request.executes or len(request.executes) != len(request.payloads):
        return 1
    return len(request.executes)


def receive_replies(sock: zmq.Socket) -> list[Any]:
    """One message's replies, each decoded (a ReplyPack counts as its members)."""
    frames = sock.recv_multipart()
    if frames[0] == b"":  # the reply to a REQ-style request: behind its delimiter, unpacked
        frames = frames[1:]
    reply = p.reply_decoder.decode(frames[0])  # every reply must decode
    if isinstance(reply, p.ReplyPack):
        assert len(reply.replies) == len(reply.payloads), reply
        return list(reply.replies)
    return [reply]


def exchange_and_count(t: Target, sent: list[list[bytes]]) -> None:
    """Send the messages back to back (their replies may share packs), collect exactly the
    promised replies, then prove there is no extra one: a hello with a fresh sentinel id must
    be the next reply to arrive."""
    want = sum(expected_replies(frames) for frames in sent)
    for frames in sent:
        t.sock.send_multipart(frames)
    got: list[Any] = []
    while len(got) < want:
        assert t.sock.poll(REPLY_WAIT_MS), f"{len(got)} of {want} replies to {sent!r}"
        got.extend(receive_replies(t.sock))
    assert len(got) == want, f"{len(got)} replies, {want} expected, to {sent!r}: {got!r}"
    sentinel = next(t.sentinels)
    t.sock.send_multipart([p.encode(p.Hello(id=sentinel))])
    assert t.sock.poll(REPLY_WAIT_MS), "no reply to the sentinel hello"
    after = receive_replies(t.sock)
    assert [r.id for r in after] == [sentinel], f"extra reply to {sent!r}: {after!r}"


# --------------------------------------------------------------------------- the properties


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(batch=st.lists(messages(), min_size=1, max_size=3))
def test_every_message_gets_exactly_its_replies(target: Target, batch: list[list[Any]]) -> None:
    sent = []
    for delimited, header, extra in batch:
        frames = [_encode(header, target.upper), *extra]
        sent.append([b"", *frames] if delimited else frames)
    exchange_and_count(target, sent)


def test_service_serves_others_after_the_fuzzing(target: Target) -> None:
    """Runs after the fuzzing (same module, same service): it is up, nothing arrives late on
    the fuzzing socket, and another tenant's ordinary execute works."""
    assert target.service.process.poll() is None, "the service exited"
    assert not target.sock.poll(500), f"a late reply: {receive_replies(target.sock)!r}"
    with target.service.client(tenant="checker") as c:
        upper = c.load(PLUGINS / "uppercase.wat").binary_id
        assert c.execute(upper, b"still here").output == b"STILL HERE"
        stats = c.stats()
    assert stats.restarts_by_cause.get("crash", 0) == 0, stats.restarts_by_cause
    assert stats.restarts_by_cause.get("heartbeat", 0) == 0, stats.restarts_by_cause
