"""A worker's direct lane: its own ipc socket where the client holding its lease sends executes
without the supervisor in between.

The supervisor decides every lease (RunJob.lease_token) and can end it at any time (Revoke);
the worker keeps the lease only while it holds no other job, and ends it on its own when its
executions are used up or its time is over. While it lasts, executes of the leased binary with
the leased options come in on this socket as DirectExecute frames carrying the lease's token,
run exactly like the job that granted it (its RunJob is the template), and are answered on
this socket. What ran is reported back (LeaseReturned) for the supervisor's accounting.

Anyone who can reach the socket file may send anything: nothing is trusted. A frame that is
not a DirectExecute with the live token is answered (BAD_REQUEST, or LeaseEnded) and runs
nothing; frames over the size bound disconnect their sender (ZMQ_MAXMSGSIZE).
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import zmq

from wasmcore.protocol import messages as p
from wasmcore.protocol import shm
from wasmcore.protocol.errors import BadRequest
from wasmcore.protocol.zmqopts import COPY_THRESHOLD, NOBLOCK

# Direct executes one sender may have queued at the worker; past it ZeroMQ drops its frames
# (a client sends one at a time; a flood only delays its own lease).
_QUEUED_PER_SENDER = 64
_HEADER_ROOM = 4096  # a DirectExecute header is well under this
# Frames answered without running anything, at most, per call of `take`: a flood of junk
# waits its turn behind the supervisor's messages like anything else.
_REFUSED_PER_TAKE = 64


@dataclass(slots=True)
class WorkerLease:
    """The lease this worker holds: what the granting job looked like, and what ran on it."""

    token: bytes
    template: p.RunJob
    executions_left: int
    ends_at: float  # time.monotonic
    executions: int = 0
    busy_s: float = 0.0
    fuel_consumed: int = 0
    codes: list[str] = field(default_factory=list)

    def returned(self) -> p.LeaseReturned:
        return p.LeaseReturned(token=self.token, executions=self.executions,
                               busy_ms=self.busy_s * 1000, fuel_consumed=self.fuel_consumed,
                               codes=self.codes)


# (client identity, the job to run, its input); what `DirectLane.take` hands the worker.
DirectJob = tuple[bytes, p.RunJob, bytes]


class DirectLane:
    def __init__(self, ctx: zmq.Context[Any], endpoint: str, max_input_bytes: int,
                 shm_dir: str) -> None:
        """Bind the lane's socket; raises zmq.ZMQError when it cannot be bound (a path too
        long for a Unix socket, a directory gone): the worker then serves no lane."""
        self.max_input_bytes = max_input_bytes
        self._shm_on = bool(shm_dir)
        self.socket = ctx.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.socket.setsockopt(zmq.MAXMSGSIZE, max_input_bytes + _HEADER_ROOM)
        self.socket.setsockopt(zmq.RCVHWM, _QUEUED_PER_SENDER)
        self.socket.copy_threshold = COPY_THRESHOLD
        try:
            self.socket.bind(endpoint)
        except zmq.ZMQError:
            self.socket.close()
            raise
        self.endpoint = endpoint
        self.lease: WorkerLease | None = None

    # ------------------------------------------------------------------ the lease

    def grant(self, job: p.RunJob, now: float) -> p.DirectLease | None:
        """The job that offered a lease ran: hold it. A job of another shape (a chain, a
        batch, a unit) is never leased."""
        if job.chain or job.batch or job.unit or len(job.modules) != 1:
            return None
        template = msgspec.structs.replace(
            job, token=0, request_id=0, input_shm=None, output_shm_into="", lease_token=b"",
            lease_executions=0, lease_ms=0)
        self.lease = WorkerLease(job.lease_token, template, job.lease_executions,
                                 now + job.lease_ms / 1000)
        return p.DirectLease(endpoint=self.endpoint, token=job.lease_token,
                             executions=job.lease_executions,
                             max_input_bytes=self.max_input_bytes)

    def end(self, token: bytes | None = None) -> p.LeaseReturned | None:
        """End the lease (with `token`, or whichever is held): its report, or None if no
        such lease is held (ended already and reported)."""
        lease = self.lease
        if lease is None or (token is not None and not hmac.compare_digest(lease.token, token)):
            return None
        self.lease = None
        return lease.returned()

    def end_if_spent(self) -> p.LeaseReturned | None:
        """End the lease if it has no execution left (its report), else None."""
        if self.lease is not None and self.lease.executions_left <= 0:
            return self.end()
        return None

    def record(self, done: p.JobDone, busy_s: float) -> None:
        """A direct execute ended (its JobDone, as the worker built it)."""
        lease = self.lease
        if lease is None:
            return
        lease.executions += 1
        lease.busy_s += busy_s
        lease.fuel_consumed += done.fuel_consumed
        if done.code:
            lease.codes.append(done.code)

    # ------------------------------------------------------------------ requests

    def take(self, report: Callable[[p.LeaseReturned], None]) -> DirectJob | None:
        """The next direct execute to run, or None when none is waiting. Frames that are not
        one are answered here; a lease found used up or past its time is ended (`report`
        gets its LeaseReturned) and the request told LeaseEnded."""
        for _ in range(_REFUSED_PER_TAKE):
            try:
                frames = self.socket.recv_multipart(NOBLOCK)
            except zmq.Again:
                return None
            identity = frames[0]
            if len(frames) not in (2, 3):
                self._refuse(identity, p.peek_request_id(frames[1]) if len(frames) > 1 else 0,
                             f"a direct execute is a header frame and at most one payload "
                             f"frame; got {len(frames) - 1} frames")
                continue
            try:
                request = p.direct_decoder.decode(frames[1])
            except msgspec.DecodeError as exc:
                self._refuse(identity, p.peek_request_id(frames[1]),
                             f"malformed direct execute: {exc}")
                continue
            payload = frames[2] if len(frames) == 3 else b""
            lease = self.lease
            if lease is None or not hmac.compare_digest(lease.token, request.token):
                self.answer(identity, p.encode(p.LeaseEnded(id=request.id)))
                continue
            if lease.executions_left <= 0 or time.monotonic() >= lease.ends_at:
                returned = self.end()
                if returned is not None:
                    report(returned)
                self.answer(identity, p.encode(p.LeaseEnded(id=request.id)))
                continue
            if len(payload) > self.max_input_bytes:  # MAXMSGSIZE leaves room for the header
                self._refuse(identity, request.id,
                             f"a direct execute's input is at most {self.max_input_bytes} "
                             f"bytes; got {len(payload)}: send it through the server")
                continue
            into = request.output_shm_into
            if into and not (self._shm_on and shm.NAME.match(into)):
                self._refuse(identity, request.id, f"not a segment name: {into!r}")
                continue
            lease.executions_left -= 1
            job = msgspec.structs.replace(lease.template, request_id=request.id,
                                          output_shm_into=into)
            return identity, job, payload
        return None

    def _refuse(self, identity: bytes, request_id: int, message: str) -> None:
        self.answer(identity, p.encode(p.ErrorReply(id=request_id, code=BadRequest.code,
                                                     message=message)))

    def answer(self, identity: bytes, header: bytes, payload: Any = None) -> None:
        """A reply on the lane, in the same frames the server would send."""
        frames = [identity, header] if payload is None else [identity, header, payload]
        try:
            self.socket.send_multipart(frames, NOBLOCK, copy=False)
        except zmq.ZMQError:
            pass  # its sender is gone (ROUTER_MANDATORY) or not reading: nobody to tell

    def close(self) -> None:
        """Answer what is queued LeaseEnded (it goes through the server instead: a client
        that saw the lane close without an answer could not tell whether it ran), then
        close, giving those answers a moment to leave."""
        self.lease = None
        for _ in range(_QUEUED_PER_SENDER * 16):
            try:
                frames = self.socket.recv_multipart(NOBLOCK)
            except zmq.Again:
                break
            if len(frames) >= 2:
                self.answer(frames[0], p.encode(p.LeaseEnded(id=p.peek_request_id(frames[1]))))
        self.socket.setsockopt(zmq.LINGER, 500)
        self.socket.close()
