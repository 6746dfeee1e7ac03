"""Packed replies (rpack) only where they belong: a reply is packed only when its envelope is
exactly [identity]; a REQ-style request from a connection that packs gets its reply as is."""

from __future__ import annotations

from tests.conftest import PLUGINS, raw_dealer
from wasmcore.protocol import messages as p


def test_req_style_request_after_a_pack_gets_an_unpacked_reply(service) -> None:
    """Issue 11 item 12: a DEALER that has sent an xpack sends [b"", header] (a REQ-style
    envelope), then more packs. Every reply decodes and each request gets its own reply; the
    REQ-style one comes unpacked, behind its empty delimiter."""
    with service.client() as c:
        upper = c.load(PLUGINS / "uppercase.wat").binary_id
    ids: list[int] = []
    next_id = iter(range(1, 10_000))

    def pack(n: int) -> bytes:
        executes = []
        for _ in range(n):
            ids.append(next(next_id))
            executes.append(p.Execute(id=ids[-1], binary_id=upper))
        return p.encode(p.ExecutePack(executes=executes, payloads=[b"abc"] * n))

    got: dict[int, bytes | None] = {}
    with raw_dealer(service.endpoint) as sock:
        sock.send_multipart([pack(3)])
        req_ids = []
        for _ in range(3):
            req_ids.append(next(next_id))
            ids.append(req_ids[-1])
            sock.send_multipart([b"", p.encode(p.Execute(id=req_ids[-1], binary_id=upper)),
                                 b"req"])
            sock.send_multipart([pack(4)])
        sock.send_multipart([b"", p.encode(p.Hello(id=9999))])
        ids.append(9999)
        while len(got) < len(ids):
            assert sock.poll(10_000), f"missing replies: {sorted(set(ids) - set(got))}"
            frames = sock.recv_multipart()
            delimited = frames[0] == b""
            if delimited:
                frames = frames[1:]
            reply = p.reply_decoder.decode(frames[0])  # must decode, packed or not
            pairs = (list(zip(reply.replies, reply.payloads, strict=True))
                     if isinstance(reply, p.ReplyPack)
                     else [(reply, frames[1] if len(frames) > 1 else None)])
            for one, payload in pairs:
                assert one.id not in got, f"two replies for {one.id}"
                assert delimited == (one.id in req_ids or one.id == 9999), one
                got[one.id] = payload
        assert not sock.poll(200), "an extra reply"
    assert sorted(got) == sorted(ids)
    for request_id in req_ids:
        assert got[request_id] == b"REQ"
    assert all(got[i] == b"ABC" for i in ids if i not in req_ids and i != 9999)
