"""Packing what one loop turn sends: many small messages become one frame.

ZeroMQ costs about 1.5 us per frame on each side, several times what packing costs, so the
jobs one turn gives a worker travel as one JobPack frame, and the replies one turn has for a
client that packs its requests travel as one ReplyPack frame. Headers already encoded are
spliced in with msgspec.Raw, never decoded again.
"""

from __future__ import annotations

from typing import Any

import msgspec

from wasmcore.protocol import messages as p
from wasmcore.supervisor.jobs import PendingJob


def worker_messages(identity: bytes, jobs: list[PendingJob]) -> list[list[Any]]:
    """The messages for one worker, its jobs in the order they were assigned: runs of small
    run jobs become one JobPack frame each, any other job keeps its own message."""
    out: list[list[Any]] = []
    run: list[PendingJob] = []
    for job in jobs:
        if job.packable:
            run.append(job)
            continue
        if run:
            out.append(_job_pack(identity, run))
            run = []
        frames: list[Any] = [identity, job.header]
        if job.payload is not None:
            frames.append(job.payload)
        elif job.extra:
            frames.extend(job.extra)
        out.append(frames)
    if run:
        out.append(_job_pack(identity, run))
    return out


def _job_pack(identity: bytes, jobs: list[PendingJob]) -> list[Any]:
    # Even one job is cheaper packed: one frame instead of two.
    pack = p.JobPack(jobs=[msgspec.Raw(job.header) for job in jobs],  # type: ignore[misc]
                     payloads=[b"" if job.payload is None else job.payload for job in jobs])
    return [identity, p.encode(pack)]


def client_messages(outgoing: list[list[Any]], packers: set[bytes],
                    packs: dict[bytes, p.ReplyPack] | None = None) -> list[list[Any]]:
    """Replies as sent: those for a connection in `packers` that fit in a pack are gathered
    into one ReplyPack per connection (after the unpacked ones, which keep their order),
    added to those of `packs` (replies already packed, per connection)."""
    if packs is None:
        packs = {}
    out: list[list[Any]] = []
    for frames in outgoing:
        if frames[0] in packers and _packable_reply(frames):
            pack = packs.get(frames[0])
            if pack is None:
                pack = packs[frames[0]] = p.ReplyPack(replies=[], payloads=[])
            pack.replies.append(msgspec.Raw(frames[1]))  # type: ignore[arg-type]
            pack.payloads.append(frames[2] if len(frames) == 3 else None)
        else:
            out.append(frames)
    for identity, pack in packs.items():
        out.append([identity, p.encode(pack)])
    return out


def _packable_reply(frames: list[Any]) -> bool:
    """[identity, header, optional payload], all plain bytes and the payload small.

    Only a reply whose envelope is exactly [identity] may be packed. A request that came with
    an empty delimiter (REQ style, even from a connection that also sends packs) is answered
    [identity, b"", header, ...] and must leave as it is: its empty frame is no header (an
    encoded header is never empty), and packed it would break the whole pack."""
    if type(frames[1]) is not bytes or not frames[1]:
        return False
    if len(frames) == 2:
        return True
    return len(frames) == 3 and p.fits_in_pack(frames[2])
