"""Python clients: `Client` (blocking) and `AsyncClient` (asyncio, many requests in flight).

Both speak DEALER to the supervisor's ROUTER, and both are transports only: each public
method builds its request as an `operations.Operation` (header, payload, reply wait, how to
unpack the reply) and runs it; they differ in how they send and wait. Errors come back as the
exception class of their code (see `wasmcore.protocol.errors`). Every wait is bounded; a reply
that arrives after its request timed out is recognised by its id and discarded.

With credentials (`credentials=` a file from `wasm-core tenant add`, or $WASM_CORE_CREDENTIALS)
the socket is a CURVE client: the server knows the tenant by its key. Both clients watch the
socket's handshakes (handshake.py), so a refused key raises `Unauthenticated` at once instead
of a timeout.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import msgspec
import zmq

from wasmcore.client import operations
from wasmcore.client.direct import (
    CHECK_MS,
    ClientLease,
    DirectLanes,
    Lane,
    LeaseKey,
    lease_key,
)
from wasmcore.client.handshake import HandshakeWatch
from wasmcore.client.operations import Exchange, Operation, Payload, encode_frames
from wasmcore.client.results import ChainExecution, Execution
from wasmcore.client.shared_memory import SharedMemory
from wasmcore.protocol import messages as p
from wasmcore.protocol.credentials import Credentials, apply_to_client, resolve_credentials
from wasmcore.protocol.endpoints import ENDPOINT_ENV, resolve_endpoint
from wasmcore.protocol.errors import (
    Unauthenticated,
    Unavailable,
    WasmCoreError,
    error_from_code,
)
from wasmcore.protocol.zmqopts import COPY_THRESHOLD, NOBLOCK

__all__ = ["AsyncClient", "ChainExecution", "Client", "Execution", "SharedMemory"]

T = TypeVar("T")
_NOT_SENT = float("inf")  # the deadline of a request `_flush` has not sent yet
# How long a new direct lane may take to connect before its execute goes through the server
# (ipc connects in well under a millisecond; a lane that does not has no worker behind it).
_LANE_CONNECT_MS = 100
_LANE_RETRY_S = 0.0005  # how often AsyncClient looks whether a new lane has connected
# How long to wait for the server's word on a worker that went away mid direct execute (it
# learns of a death at once through the worker's pidfd).
_LOST_WORD_S = 2.0
CredentialsArg = Credentials | str | os.PathLike[str] | None


def _settings(endpoint: str | None, tenant: str | None,
              credentials: CredentialsArg) -> tuple[str, str, Credentials | None]:
    """The endpoint, tenant and credentials a client uses. The endpoint: the argument, else
    $WASM_CORE_ENDPOINT, else the credentials', else the default socket. The tenant: the
    argument, else the credentials' (a key's tenant is what the server goes by anyway)."""
    creds = resolve_credentials(credentials)
    if creds is not None and not endpoint and not os.environ.get(ENDPOINT_ENV):
        endpoint = creds.endpoint or None
    tenant = tenant or (creds.tenant if creds is not None else p.DEFAULT_TENANT)
    return resolve_endpoint(endpoint), tenant, creds


def _socket(ctx: zmq.Context[Any], endpoint: str,
            creds: Credentials | None) -> tuple[zmq.Socket[Any], HandshakeWatch]:
    """A DEALER, a CURVE client if there are credentials, and its handshake watch; not yet
    connected (the caller sets its options first)."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.copy_threshold = COPY_THRESHOLD
    if creds is not None:
        apply_to_client(sock, creds)
    return sock, HandshakeWatch(sock, endpoint, curve=creds is not None)


class Client:
    """A blocking client. One request at a time; not thread-safe (use one per thread).

    `zero_copy=True`: an output that came through shared memory is returned as a read-only
    memoryview over the mapped segment instead of being copied into bytes.
    `credentials`: a credentials file (or `Credentials`) for a server that requires keys;
    default $WASM_CORE_CREDENTIALS, if set.
    `direct`: take the direct lanes the server offers (executes of a binary sent straight to
    a worker it leased to this client; docs/protocol.md "Direct lane"). Default: on for an
    ipc endpoint without credentials, the only servers that offer them.
    """

    def __init__(self, endpoint: str | None = None, tenant: str | None = None,
                 timeout_s: float = 30.0, context: zmq.Context[Any] | None = None,
                 zero_copy: bool = False, credentials: CredentialsArg = None,
                 direct: bool | None = None) -> None:
        self.zero_copy = zero_copy
        self.timeout_s = timeout_s
        self.endpoint, self.tenant, self._credentials = _settings(endpoint, tenant, credentials)
        self._own_context = context is None
        self._ctx = context or zmq.Context()
        self._open()
        self._ids = itertools.count(1)
        self._shared: SharedMemory | None = None
        if direct is None:
            direct = self.endpoint.startswith("ipc://") and self._credentials is None
        self._lanes = DirectLanes(self._ctx) if direct else None
        self._asking: LeaseKey | None = None  # the execute in `_run` asked for a lease for this

    def _open(self) -> None:
        self._socket, self._watch = _socket(self._ctx, self.endpoint, self._credentials)
        self._socket.connect(self.endpoint)
        self._poller = zmq.Poller()
        self._poller.register(self._socket, zmq.POLLIN)
        self._poller.register(self._watch.socket, zmq.POLLIN)

    def _refused(self, refusal: Unauthenticated) -> Unauthenticated:
        """The server refused this client's handshake: start over on a new socket, so that
        nothing sent so far (queued by ZeroMQ, never delivered) is delivered later should a
        reconnect be accepted. Returns `refusal` to raise."""
        self._watch.close()
        self._socket.close()
        self._open()
        return refusal

    def close(self) -> None:
        if self._shared is not None:
            self._shared.close()
        if self._lanes is not None:
            self._lanes.close()
        self._watch.close()
        self._socket.close()
        if self._own_context:
            self._ctx.term()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, op: Operation[T]) -> T:
        """Send `op`, wait up to its wait for the reply with its id, and finish it."""
        request = op.request
        request.id = request_id = next(self._ids)
        try:
            # copy=False: frames below copy_threshold are copied anyway.
            self._socket.send_multipart(encode_frames(request, op.payload), copy=False)
            wait_ms = int(1000 * op.wait_s)
            deadline = time.monotonic() + op.wait_s
            while True:
                ready = self._poller.poll(max(0, int(1000 * (deadline - time.monotonic()))))
                if not ready:
                    raise Unavailable(
                        f"no reply from {self.endpoint} within {wait_ms} ms; "
                        "is `wasm-core` running?",
                        {"endpoint": self.endpoint},
                    )
                if not any(sock is self._socket for sock, _ in ready):
                    refusal = self._watch.update()  # a handshake event
                    if refusal is not None:
                        raise self._refused(refusal)
                    continue
                reply_frames = self._socket.recv_multipart()
                reply = p.reply_decoder.decode(reply_frames[0])
                if reply.id == request_id:
                    break
                if type(reply) is p.LeaseLost and self._lanes is not None:
                    self._lanes.forget(reply.token)  # a lane not in use: just gone
                # An older request's late reply (it timed out here): not ours, skip it.
        except BaseException:
            op.abandon()
            raise
        if self._asking is not None and type(reply) is p.Executed and reply.lease is not None:
            assert self._lanes is not None
            self._lanes.remember(self._asking, reply.lease)
        return op.finish(reply, reply_frames[1:])

    def _run_direct(self, op: operations.ExecuteOperation,
                    lease: ClientLease) -> Execution | None:
        """Send `op` on its lease's lane and wait for the worker's reply: the result, or None
        when the execute did not run there (the lease is over, or its worker went away
        before taking it): the caller then sends it through the server. The worker gone while
        it held the lease (the server's LeaseLost) fails the execute as the server would."""
        assert self._lanes is not None
        lane = self._lanes.lane(lease.endpoint)
        if not lane.writable(_LANE_CONNECT_MS):
            self._lanes.forget(lease.token)
            return None
        request = op.request
        request.id = request_id = next(self._ids)
        lease.left -= 1
        header = p.encode(p.DirectExecute(id=request_id, token=lease.token,
                                          output_shm_into=request.output_shm_into))
        try:
            try:
                lane.socket.send_multipart([header] if op.payload is None
                                           else [header, op.payload], NOBLOCK, copy=False)
            except zmq.Again:  # the connection went away just now: nothing left
                self._lanes.forget(lease.token)
                return None
            reply, frames = self._await_direct(lane, lease, request_id, op.wait_s)
        except BaseException:
            op.abandon()
            raise
        if reply is None:
            # Nothing ran: the caller sends the same operation through the server, its lent
            # segment still lent (abandoning it here would hand the server a removed one).
            return None
        return op.finish(reply, frames)

    def _await_direct(self, lane: Lane, lease: ClientLease, request_id: int,
                      wait_s: float) -> tuple[Any, list[bytes]]:
        """The worker's reply to direct execute `request_id` (None: it did not run there)."""
        assert self._lanes is not None
        deadline = time.monotonic() + wait_s
        while True:
            left_ms = int(1000 * (deadline - time.monotonic()))
            ready = lane.poller.poll(max(0, min(left_ms, CHECK_MS)))
            if not ready and left_ms <= CHECK_MS:
                self._lanes.forget(lease.token)
                raise Unavailable(
                    f"no reply from the worker serving this client's direct lane "
                    f"({lease.endpoint}) within {int(1000 * wait_s)} ms, nor word from the "
                    "server about it; is `wasm-core` running?", {"endpoint": lease.endpoint})
            answer = self._lane_reply(lane, request_id)
            if answer is not None:
                lane.answered = True
                reply, frames = answer
                if type(reply) is p.LeaseEnded:
                    self._lanes.forget(lease.token)
                    return None, []
                return reply, frames
            if not ready and lane.update():
                # The worker went away without answering. If it held the lease then, the
                # server says so (LeaseLost, at once: it watches its workers' pidfds) and
                # the execute may have run; if not, the lease had ended before and the
                # execute was never taken: it goes through the server.
                self._lanes.forget(lease.token)
                lost = self._lease_lost(lease.token, _LOST_WORD_S)
                if lost is not None:
                    raise lost
                return None, []

    def _lane_reply(self, lane: Lane, request_id: int) -> tuple[Any, list[bytes]] | None:
        """Our reply if the lane has it (earlier direct requests' late replies are dropped)."""
        while True:
            try:
                frames = lane.socket.recv_multipart(NOBLOCK)
            except zmq.Again:
                return None
            reply = p.reply_decoder.decode(frames[0])
            if reply.id == request_id:
                return reply, frames[1:]

    def _lease_lost(self, token: bytes, wait_s: float = 0.0) -> WasmCoreError | None:
        """Read the front socket (up to `wait_s`) for the server's word that the lease with
        `token` was lost: its error. Other leases' notices drop those leases; anything else
        there is a late reply to an earlier request."""
        assert self._lanes is not None
        deadline = time.monotonic() + wait_s
        while True:
            try:
                frames = self._socket.recv_multipart(NOBLOCK)
            except zmq.Again:
                left = deadline - time.monotonic()
                if left <= 0 or not self._socket.poll(int(left * 1000) + 1):
                    return None
                continue
            notice = p.reply_decoder.decode(frames[0])
            if type(notice) is p.LeaseLost:
                self._lanes.forget(notice.token)
                if notice.token == token:
                    return error_from_code(notice.code, notice.message, notice.details)

    def call(self, request: Any, payload: Payload = None,
             timeout_s: float | None = None) -> tuple[Any, list[bytes]]:
        """Send one request, wait for its reply: (reply header, payload frames)."""
        return self._run(Exchange(request, payload,
                                  self.timeout_s if timeout_s is None else timeout_s))

    def hello(self) -> p.Welcome:
        """What the server offers (limits, shared memory); asked once, then remembered."""
        welcome = self._run(operations.hello(self.tenant, self.timeout_s))
        self._shared = SharedMemory(welcome, self.zero_copy)
        return welcome

    def _shared_memory(self) -> SharedMemory:
        if self._shared is None:
            self.hello()
        assert self._shared is not None
        return self._shared

    def load(self, path: str | os.PathLike[str] | None = None, *, data: bytes | None = None,
             name: str | None = None) -> p.Loaded:
        return self._run(operations.load(self.tenant, self.timeout_s, path, data, name))

    def execute(self, binary_id: str, input: bytes | str = b"", *, timeout_ms: int | None = None,
                memory_mb: int | None = None, fuel: int | None = None,
                env: Mapping[str, str] | None = None, entry: str | None = None,
                args: Sequence[str] | None = None) -> Execution:
        """`args`: a WASI module's arguments, argv[1:] (argv[0] is the binary's name)."""
        op = operations.execute(self._shared_memory(), self.tenant, self.timeout_s, binary_id,
                                input, timeout_ms, memory_mb, fuel, env, entry, args)
        if self._lanes is None or op.request.input_shm is not None:
            return self._run(op)
        key = lease_key(binary_id, timeout_ms, memory_mb, fuel, env, entry, args)
        lease = self._lanes.usable(key, len(op.payload or b""))
        if lease is not None:
            result = self._run_direct(op, lease)
            if result is not None:
                return result
        op.request.direct = True
        self._asking = key
        try:
            return self._run(op)
        finally:
            self._asking = None

    def execute_batch(self, binary_id: str, inputs: Iterable[bytes | str], *,
                      timeout_ms: int | None = None, memory_mb: int | None = None,
                      fuel: int | None = None, env: Mapping[str, str] | None = None,
                      entry: str | None = None,
                      args: Sequence[str] | None = None) -> list[Execution | WasmCoreError]:
        """One request, one result per input in order: an `Execution`, or the error of that
        input (returned, not raised, so one bad input does not hide the others' results)."""
        return self._run(operations.execute_batch(self.tenant, self.timeout_s, binary_id,
                                                  inputs, timeout_ms, memory_mb, fuel, env,
                                                  entry, args))

    def chain(self, binary_ids: Iterable[str], input: bytes | str = b"", *,
              timeout_ms: int | None = None, memory_mb: int | None = None,
              fuel: int | None = None, env: Mapping[str, str] | None = None,
              args: Sequence[str] | None = None) -> ChainExecution:
        return self._run(operations.chain(self.tenant, self.timeout_s, binary_ids, input,
                                          timeout_ms, memory_mb, fuel, env, args))

    def list(self) -> list[p.BinaryInfo]:
        return self._run(operations.list_binaries(self.tenant, self.timeout_s))

    def unload(self, binary_id: str) -> None:
        self._run(operations.unload(self.tenant, self.timeout_s, binary_id))

    def stats(self, all_tenants: bool = False) -> p.StatsReply:
        """The service as this tenant may see it; `all_tenants` (admins only): every
        tenant's binaries."""
        return self._run(operations.stats(self.tenant, self.timeout_s, all_tenants))


class ReplyFuture(asyncio.Future):  # type: ignore[type-arg]
    """What `AsyncClient.execute` returns: the future of a request already queued.

    A future, so `asyncio.gather` and `ensure_future` take it as it is instead of wrapping it
    in a task; and a coroutine too (`send`, `throw`, `close` step through its own `__await__`),
    so `asyncio.create_task(client.execute(...))` and `TaskGroup.create_task` keep working as
    they did when `execute` was a coroutine function."""

    _steps: Any = None

    def send(self, value: Any) -> Any:
        if self._steps is None:
            self._steps = self.__await__()
        return self._steps.send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        if self._steps is None:
            self._steps = self.__await__()
        return self._steps.throw(typ if val is None else val)

    def close(self) -> None:
        if self._steps is not None:
            self._steps.close()


def _as_reply_future(coroutine: Any) -> ReplyFuture:
    """`coroutine` run as a task, its outcome in a ReplyFuture (cancelling one cancels
    the other)."""
    reply = ReplyFuture(loop=asyncio.get_running_loop())
    task = asyncio.ensure_future(coroutine)

    def settle(done: asyncio.Future[Any]) -> None:
        if reply.done():
            return
        if done.cancelled():
            reply.cancel()
        elif done.exception() is not None:
            reply.set_exception(done.exception())  # type: ignore[arg-type]
        else:
            reply.set_result(done.result())

    task.add_done_callback(settle)
    reply.add_done_callback(lambda r: task.cancel() if r.cancelled() else None)
    return reply


class _DirectCall:
    """`AsyncClient`'s execute on a direct lane, waiting for the worker's reply."""

    __slots__ = ("request_id", "op", "lane", "lease", "sent", "connect_by", "word_timer")

    def __init__(self, request_id: int, op: Operation[Any], lane: Lane,
                 lease: ClientLease) -> None:
        self.request_id = request_id
        self.op = op
        self.lane = lane
        self.lease = lease
        self.sent = False  # False while a new lane is still connecting
        self.connect_by = 0.0
        # Set once the lane's worker went away without answering: the wait for the server's
        # word (LeaseLost) before the execute goes through the server.
        self.word_timer: asyncio.TimerHandle | None = None


class AsyncClient:
    """An asyncio client: any number of requests in flight on one connection.

    Built on a plain ZeroMQ socket watched with `loop.add_reader`, not on zmq.asyncio: its
    per-message futures cost more than the rest of a request. The socket's FD is
    edge-triggered, so every drain runs until a receive finds nothing left, and every burst
    of sends is followed by a drain (a send can consume the edge of a waiting reply).

    `direct`: as `Client`'s, for an application that awaits one execute before sending the
    next: an execute sent while nothing else of this client is in flight may take a direct
    lane (docs/protocol.md "Direct lane"); anything more in flight goes through the server,
    packed, as always. Default: on for an ipc endpoint without credentials.
    """

    def __init__(self, endpoint: str | None = None, tenant: str | None = None,
                 timeout_s: float = 30.0, zero_copy: bool = False,
                 credentials: CredentialsArg = None, direct: bool | None = None) -> None:
        self.timeout_s = timeout_s
        self.zero_copy = zero_copy
        self.endpoint, self.tenant, self._credentials = _settings(endpoint, tenant, credentials)
        self._ctx = zmq.Context()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._open()
        self._ids = itertools.count(1)
        # Requests awaiting their reply: the caller's future and the operation that turns the
        # reply into its result (finished by the reader, `_drain`), which also holds the
        # request's reply deadline once it is sent (`_flush`).
        self._pending: dict[int, tuple[asyncio.Future[Any], Operation[Any]]] = {}
        self._shared: SharedMemory | None = None
        self._hello: asyncio.Future[p.Welcome] | None = None
        self._outbox: list[Operation[Any]] = []
        self._flush_scheduled = False
        # Reply waits: one timer for the earliest deadline, not a timer per request. A timer
        # handle per request cost about a quarter of the client's time at 512 in flight
        # (each one pushed onto and popped off the loop's heap with Python comparisons).
        # Each deadline lives on its operation (`op.deadline`), not in a dict of its own: a
        # second entry to add and remove per request cost more than the rare sweep's scan.
        self._sweeper: asyncio.TimerHandle | None = None
        self._sweep_at = 0.0
        if direct is None:
            direct = self.endpoint.startswith("ipc://") and self._credentials is None
        self._lanes = DirectLanes(self._ctx, on_close=self._unwatch_lane) if direct else None
        self._watched_lanes: set[Lane] = set()  # lanes whose FDs the loop watches
        self._direct: _DirectCall | None = None  # the execute on a lane, at most one
        self._asking: tuple[int, LeaseKey] | None = None  # the execute that asked for a lease

    def _open(self) -> None:
        self._socket, self._watch = _socket(self._ctx, self.endpoint, self._credentials)
        self._socket.setsockopt(zmq.SNDHWM, 0)  # sends never block: nothing waits in a send
        self._socket.setsockopt(zmq.RCVHWM, 0)
        self._socket.connect(self.endpoint)
        self._fd = self._socket.getsockopt(zmq.FD)
        self._watch_fd = self._watch.socket.getsockopt(zmq.FD)
        if self._loop is not None:
            self._watch_on(self._loop)

    def _watch_on(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_reader(self._fd, self._drain)
        loop.add_reader(self._watch_fd, self._on_handshake)
        self._on_handshake()  # events from before the reader was added

    def _unwatch(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._fd)
            self._loop.remove_reader(self._watch_fd)

    async def close(self) -> None:
        if self._shared is not None:
            self._shared.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self._end_direct()
        if self._lanes is not None:
            self._lanes.close()
        self._unwatch()
        self._loop = None
        self._fail_pending(lambda: Unavailable("client closed"))
        self._watch.close()
        self._socket.close()
        self._ctx.term()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _fail_pending(self, error: Any) -> None:
        """Every request waiting for a reply fails with `error()`; none will come."""
        pending, self._pending = self._pending, {}
        for future, op in pending.values():
            op.abandon()
            if not future.done():
                future.set_exception(error())

    def _answer(self, request_id: int, reply: Any, frames: list[bytes]) -> None:
        """Finish the request `request_id` with its reply (if it still waits for one)."""
        entry = self._pending.pop(request_id, None)
        if entry is None:
            if type(reply) is p.LeaseLost:
                self._on_lease_lost(reply)
            return  # expired, or not ours
        future, op = entry
        if self._asking is not None and self._asking[0] == request_id:
            self._on_asked(reply)
        if future.done():  # the caller cancelled: the request is over
            op.abandon()
            return
        try:
            future.set_result(op.finish(reply, frames))
        except BaseException as exc:  # noqa: BLE001 - the caller's to see, not the reader's
            future.set_exception(exc)

    def _drain(self) -> None:
        recv, answer = self._socket.recv_multipart, self._answer
        while True:
            # Until a dry recv: its Again also means libzmq has processed every pending
            # command, which re-arms the FD's edge just as asking ZMQ_EVENTS would, and
            # costs less than asking before every message.
            try:
                frames = recv(NOBLOCK)
            except zmq.Again:
                return
            try:
                reply = p.reply_decoder.decode(frames[0])
            except Exception:  # noqa: BLE001 - a garbled reply must not kill the reader
                continue
            if type(reply) is p.ReplyPack:
                self._answer_pack(reply)
                continue
            answer(reply.id, reply, frames[1:])

    def _answer_pack(self, pack: p.ReplyPack) -> None:
        """`_answer` for each reply of a pack, inlined: packs carry most of the load, and
        this saves a method call per reply."""
        take = self._pending.pop
        for reply, payload in zip(pack.replies, pack.payloads, strict=False):
            entry = take(reply.id, None)
            if entry is None:
                continue  # expired, or not ours
            future, op = entry
            if future.done():  # the caller cancelled: the request is over
                op.abandon()
                continue
            try:
                future.set_result(op.finish(reply, [] if payload is None else [payload]))
            except BaseException as exc:  # noqa: BLE001 - the caller's to see
                future.set_exception(exc)

    def _on_handshake(self) -> None:
        """A handshake event: if the server refused this client, every request waiting for a
        reply gets the reason now (none would ever come), and the client starts over on a
        new socket, so that nothing sent so far is delivered later should a reconnect be
        accepted."""
        if self._watch.update() is None:
            return
        watch = self._watch
        self._outbox.clear()
        self._fail_pending(lambda: watch.refusal() or Unavailable("refused"))
        self._unwatch()
        watch.close()
        self._socket.close()
        self._open()

    def _flush(self) -> None:
        """Send every request made since the last turn of the event loop, back to back: a send
        that finds ZeroMQ's I/O thread asleep costs ~8 us here, one in a burst ~0.5 us."""
        self._flush_scheduled = False
        outbox, self._outbox = self._outbox, []
        if not outbox:
            self._drain()
            return
        # Every reply wait starts now, before any send (so that none is left without one
        # should a send fail): one clock reading per burst, not one per request.
        loop = self._loop
        if loop is None:  # closed meanwhile: its requests have failed already
            return
        # One execute and nothing else in flight: a direct lane may take it.
        if (len(outbox) == 1 and self._lanes is not None and len(self._pending) == 1
                and self._direct is None and self._send_alone(loop, outbox[0])):
            self._drain()
            return
        now = loop.time()
        earliest = float("inf")
        for op in outbox:
            op.deadline = deadline = now + op.wait_s
            if deadline < earliest:
                earliest = deadline
        if self._sweeper is None or earliest < self._sweep_at:
            self._watch_deadline(loop, earliest)
        send = self._socket.send_multipart
        encode, raw = p.encode, msgspec.Raw
        execute, packable = p.Execute, p.PACKED_PAYLOAD_MAX_BYTES
        max_bytes, max_count = p.EXECUTE_PACK_MAX_BYTES, p.MAX_PACK_EXECUTES
        executes: list[Any] = []
        payloads: list[bytes | None] = []
        packed_bytes = 0
        for op in outbox:
            request, payload = op.request, op.payload
            # p.fits_in_pack, inlined (once per request).
            if type(request) is execute and (payload is None or (
                    type(payload) is bytes and len(payload) <= packable)):
                header = encode(request)  # encoded once, spliced into the pack (Raw)
                size = len(header) + (len(payload) if payload else 0) + 16
                if executes and (packed_bytes + size > max_bytes
                                 or len(executes) >= max_count):
                    send([encode(p.ExecutePack(executes=executes, payloads=payloads))])
                    executes, payloads, packed_bytes = [], [], 0
                executes.append(raw(header))
                payloads.append(payload)
                packed_bytes += size
            else:
                send(encode_frames(request, payload), copy=False)  # copied below copy_threshold
        if executes:
            send([encode(p.ExecutePack(executes=executes, payloads=payloads))])
        self._drain()  # a send can consume the FD's edge of a reply that is already waiting

    def _expire(self, request_id: int) -> None:
        call = self._direct
        if call is not None and call.request_id == request_id:
            assert self._lanes is not None
            self._lanes.forget(call.lease.token)  # no word from its worker nor the server
            self._end_direct()
        entry = self._pending.pop(request_id, None)
        if entry is None:
            return
        future, op = entry
        op.abandon()
        if not future.done():
            future.set_exception(Unavailable(
                f"no reply from {self.endpoint} within {op.wait_s:.1f} s",
                {"endpoint": self.endpoint}))

    def _watch_deadline(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        """Make sure the sweep runs by `deadline`."""
        if self._sweeper is None or deadline < self._sweep_at:
            if self._sweeper is not None:
                self._sweeper.cancel()
            self._sweep_at = deadline
            self._sweeper = loop.call_at(deadline, self._sweep)

    def _sweep(self) -> None:
        """Fail the requests whose wait is over; then sleep until the earliest other deadline
        (usually that of a request sent one client timeout after the ones that set this one:
        with equal waits, a sweep runs about once per timeout, not once per request)."""
        self._sweeper = None
        loop = self._loop
        if loop is None:
            return
        now = loop.time()
        # A request not sent yet has no deadline: its wait starts when `_flush` sends it.
        deadlines = {request_id: getattr(op, "deadline", _NOT_SENT)
                     for request_id, (_, op) in self._pending.items()}
        for request_id, deadline in deadlines.items():
            if deadline <= now:
                self._expire(request_id)
        waiting = [deadline for request_id, deadline in deadlines.items()
                   if deadline > now and deadline is not _NOT_SENT]
        if waiting:
            self._watch_deadline(loop, min(waiting))

    # ---------------------------------------------------------------- direct lanes

    def _send_alone(self, loop: asyncio.AbstractEventLoop, op: Operation[Any]) -> bool:
        """Send `op`, this client's only request in flight, if it is an execute: on its
        lease's lane if one is held and usable, else through the server asking for a lease
        (unpacked: the server leases only with a lone execute). False: not an execute that
        can; the caller sends it as usual."""
        request = op.request
        if type(request) is not p.Execute or request.input_shm is not None:
            return False
        assert self._lanes is not None
        key = lease_key(request.binary_id, request.timeout_ms, request.memory_mb,
                        request.fuel, request.env, request.entry, request.args)
        payload = op.payload
        lease = self._lanes.usable(key, len(payload) if payload else 0)
        if lease is not None and self._send_direct(loop, op, lease):
            return True
        request.direct = True
        self._asking = (request.id, key)
        op.deadline = deadline = loop.time() + op.wait_s
        self._watch_deadline(loop, deadline)
        self._socket.send_multipart(encode_frames(request, payload), copy=False)
        return True

    def _send_direct(self, loop: asyncio.AbstractEventLoop, op: Operation[Any],
                     lease: ClientLease) -> bool:
        """Send `op` on `lease`'s lane; False if the lane cannot take it (its worker is
        gone): the execute goes through the server. A new lane still connecting is waited
        for on the loop, up to `_LANE_CONNECT_MS` (`_connecting`), never in a blocking poll."""
        assert self._lanes is not None
        lane = self._lanes.lane(lease.endpoint)
        self._watch_lane(loop, lane)
        if lane.update():
            self._lanes.forget(lease.token)
            return False
        call = self._direct = _DirectCall(op.request.id, op, lane, lease)
        if lane.answered or lane.socket.poll(0, zmq.POLLOUT):
            if not self._transmit(call):
                self._direct = None
                return False
        else:
            call.connect_by = loop.time() + _LANE_CONNECT_MS / 1000
            loop.call_later(_LANE_RETRY_S, self._connecting, call)
        op.deadline = deadline = loop.time() + op.wait_s
        self._watch_deadline(loop, deadline)
        return True

    def _transmit(self, call: _DirectCall) -> bool:
        """The direct execute onto its lane; False if the connection went away just now."""
        assert self._lanes is not None
        lane, lease, op = call.lane, call.lease, call.op
        header = p.encode(p.DirectExecute(id=call.request_id, token=lease.token,
                                          output_shm_into=op.request.output_shm_into))
        try:
            lane.socket.send_multipart([header] if op.payload is None
                                       else [header, op.payload], NOBLOCK, copy=False)
        except zmq.Again:  # nothing left of the connection: the execute never left
            self._lanes.forget(lease.token)
            return False
        lease.left -= 1
        call.sent = True
        self._drain_lane(lane)  # a send can consume the FD's edge of a waiting reply
        return True

    def _connecting(self, call: _DirectCall) -> None:
        """A direct execute waiting for its new lane to connect: send it once connected;
        through the server if the worker is gone or the lane does not connect in time."""
        loop = self._loop
        if self._direct is not call or loop is None:
            return  # over (expired, lost, or the client closed)
        lane = call.lane
        if not lane.update() and lane.socket.poll(0, zmq.POLLOUT):
            if self._transmit(call):
                return
        elif not lane.gone and loop.time() < call.connect_by:
            loop.call_later(_LANE_RETRY_S, self._connecting, call)
            return
        assert self._lanes is not None
        self._lanes.forget(call.lease.token)
        self._direct = None
        self._resend(call.op)

    def _watch_lane(self, loop: asyncio.AbstractEventLoop, lane: Lane) -> None:
        if lane in self._watched_lanes:
            return
        self._watched_lanes.add(lane)
        loop.add_reader(lane.socket.getsockopt(zmq.FD), self._drain_lane, lane)
        loop.add_reader(lane.monitor.getsockopt(zmq.FD), self._on_lane_event, lane)

    def _unwatch_lane(self, lane: Lane) -> None:
        """DirectLanes closes `lane`: the loop stops watching its FDs first."""
        if lane not in self._watched_lanes:
            return
        self._watched_lanes.discard(lane)  # never one in use: a lane in use is kept
        if self._loop is not None:
            self._loop.remove_reader(lane.socket.getsockopt(zmq.FD))
            self._loop.remove_reader(lane.monitor.getsockopt(zmq.FD))

    def _drain_lane(self, lane: Lane) -> None:
        """The lane's replies, until a receive finds none (its FD is edge-triggered too).
        Only the waiting direct execute's reply counts; a late one to an earlier is dropped."""
        while True:
            try:
                frames = lane.socket.recv_multipart(NOBLOCK)
            except zmq.Again:
                return
            try:
                reply = p.reply_decoder.decode(frames[0])
            except Exception:  # noqa: BLE001 - a garbled reply must not kill the reader
                continue
            call = self._direct
            if call is None or call.lane is not lane or reply.id != call.request_id:
                continue
            self._direct = None
            lane.answered = True
            if type(reply) is p.LeaseEnded:  # nothing ran: through the server
                assert self._lanes is not None
                self._lanes.forget(call.lease.token)
                self._resend(call.op)
                continue
            self._answer(call.request_id, reply, frames[1:])

    def _on_lane_event(self, lane: Lane) -> None:
        """The lane's monitor: once its worker's end has closed, an execute waiting on it
        waits for the server's word. If the worker held the lease then, the server says so
        at once (LeaseLost: it watches its workers' pidfds) and the execute fails with its
        code; if no word comes, the lease had ended before and the execute never ran: it
        goes through the server."""
        if not lane.update():
            return
        call = self._direct
        loop = self._loop
        if call is None or call.lane is not lane or call.word_timer is not None or loop is None:
            return
        assert self._lanes is not None
        self._lanes.forget(call.lease.token)
        if not call.sent:  # the execute never reached the worker
            self._direct = None
            self._resend(call.op)
            return
        call.word_timer = loop.call_later(_LOST_WORD_S, self._no_word, call)
        self._drain()  # the word may be waiting already

    def _no_word(self, call: _DirectCall) -> None:
        if self._direct is call:
            self._direct = None
            self._resend(call.op)

    def _on_lease_lost(self, notice: p.LeaseLost) -> None:
        """The server's word that a lease's worker died (or was killed) holding it: the
        execute waiting on it, if any, fails with its code; the lease is gone either way."""
        if self._lanes is None:  # never leased: not about this client
            return
        self._lanes.forget(notice.token)
        call = self._direct
        if call is None or call.lease.token != notice.token:
            return
        self._end_direct()
        if not call.sent:  # about the worker, not this execute: it never reached it
            self._resend(call.op)
            return
        entry = self._pending.pop(call.request_id, None)
        if entry is None:
            return
        future, op = entry
        op.abandon()
        if not future.done():
            future.set_exception(error_from_code(notice.code, notice.message, notice.details))

    def _on_asked(self, reply: Any) -> None:
        """The reply to the execute that asked for a lease: remember a granted one, and start
        connecting its lane now (so that it is up for the next execute)."""
        assert self._lanes is not None and self._asking is not None
        key = self._asking[1]
        self._asking = None
        if type(reply) is not p.Executed or reply.lease is None:
            return
        self._lanes.remember(key, reply.lease)
        lease = self._lanes.usable(key, 0)
        if lease is not None and self._loop is not None:
            self._watch_lane(self._loop, self._lanes.lane(lease.endpoint))

    def _resend(self, op: Operation[Any]) -> None:
        """An execute that did not run on its lane goes through the server (still waiting
        under its id; its wait starts again when it is sent, as the blocking client's does)."""
        entry = self._pending.get(op.request.id)
        if entry is None:  # expired meanwhile
            return
        if entry[0].done():  # the caller cancelled: nothing to resend
            del self._pending[op.request.id]
            op.abandon()
            return
        self._outbox.append(op)
        if not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _end_direct(self) -> None:
        call, self._direct = self._direct, None
        if call is not None and call.word_timer is not None:
            call.word_timer.cancel()

    def _submit(self, op: Operation[T]) -> asyncio.Future[T]:
        """Queue `op` for the next burst; the future resolves with its result (or its error)
        when the reply is in, or fails when its wait is over. A future, not a coroutine:
        `asyncio.gather` and `ensure_future` take it as it is, without wrapping it in a task
        (a task per execute cost the client a quarter more CPU per request in waves of
        gather). Cancelling the future abandons the request: its reply is dropped."""
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            self._watch_on(loop)
        op.request.id = request_id = next(self._ids)
        future: asyncio.Future[T] = ReplyFuture(loop=loop)
        self._pending[request_id] = (future, op)
        self._outbox.append(op)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return future

    async def _run(self, op: Operation[T]) -> T:
        """Send `op` and wait for its result."""
        return await self._submit(op)

    async def call(self, request: Any, payload: Payload = None,
                   timeout_s: float | None = None) -> tuple[Any, list[bytes]]:
        """Send one request, wait for its reply: (reply header, payload frames)."""
        return await self._run(Exchange(request, payload,
                                        self.timeout_s if timeout_s is None else timeout_s))

    async def hello(self) -> p.Welcome:
        welcome = await self._run(operations.hello(self.tenant, self.timeout_s))
        self._shared = SharedMemory(welcome, self.zero_copy)
        return welcome

    async def _shared_memory(self) -> SharedMemory:
        # Many requests may start at once: they share one hello.
        if self._hello is None:
            self._hello = asyncio.ensure_future(self.hello())
        try:
            await asyncio.shield(self._hello)
        except BaseException:
            self._hello = None
            raise
        assert self._shared is not None
        return self._shared

    async def load(self, path: str | os.PathLike[str] | None = None, *,
                   data: bytes | None = None, name: str | None = None) -> p.Loaded:
        return await self._run(operations.load(self.tenant, self.timeout_s, path, data, name))

    def execute(self, binary_id: str, input: bytes | str = b"", *,
                timeout_ms: int | None = None, memory_mb: int | None = None,
                fuel: int | None = None, env: Mapping[str, str] | None = None,
                entry: str | None = None,
                args: Sequence[str] | None = None) -> Awaitable[Execution]:
        """Send an execute now; await the returned future for its result. (A future rather
        than a coroutine: the request is queued at once, and gathering many costs no task
        each.) `args`: a WASI module's arguments, argv[1:] (argv[0] is the binary's name)."""
        if self._shared is None:  # the first execute: hello first
            return _as_reply_future(self._execute_after_hello(
                binary_id, input, timeout_ms, memory_mb, fuel, env, entry, args))
        try:
            op = operations.execute(self._shared, self.tenant, self.timeout_s, binary_id,
                                    input, timeout_ms, memory_mb, fuel, env, entry, args)
        except Exception as exc:  # noqa: BLE001 - raised where the caller awaits, as before
            failed: asyncio.Future[Execution] = ReplyFuture(loop=asyncio.get_running_loop())
            failed.set_exception(exc)
            return failed
        return self._submit(op)

    async def _execute_after_hello(self, binary_id: str, input: bytes | str,
                                   timeout_ms: int | None, memory_mb: int | None,
                                   fuel: int | None, env: Mapping[str, str] | None,
                                   entry: str | None,
                                   args: Sequence[str] | None) -> Execution:
        shared = self._shared or await self._shared_memory()
        return await self._submit(operations.execute(shared, self.tenant, self.timeout_s,
                                                     binary_id, input, timeout_ms, memory_mb,
                                                     fuel, env, entry, args))

    async def execute_many(self, binary_id: str, inputs: Iterable[bytes | str], *,
                           concurrency: int = 512, timeout_ms: int | None = None,
                           memory_mb: int | None = None, fuel: int | None = None,
                           env: Mapping[str, str] | None = None,
                           entry: str | None = None,
                           args: Sequence[str] | None = None,
                           ) -> list[Execution | WasmCoreError]:
        """One execute per input, `concurrency` in flight, one result per input in order: an
        `Execution`, or the error of that input (returned, not raised).

        The cheapest way to run many executes from one coroutine: `concurrency` lanes each
        send their next execute when their reply is in, so there is no task and no
        semaphore wait per request (an `asyncio.gather` over thousands of coroutines bounded
        by an `asyncio.Semaphore` costs the client about twice the CPU per request:
        docs/performance.md). Keep `concurrency` under the tenant's `max_pending`."""
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        items = list(inputs)
        results: list[Any] = [None] * len(items)
        todo = iter(enumerate(items))  # shared by the lanes: each takes the next input

        if self._shared is None and items:
            try:
                await self._shared_memory()
            except WasmCoreError:
                pass  # each execute below asks again, and returns the error as its result

        async def lane() -> None:
            shared = self._shared
            if shared is None:  # no hello: `execute` tries it again for each input
                for index, data in todo:
                    try:
                        results[index] = await self.execute(
                            binary_id, data, timeout_ms=timeout_ms, memory_mb=memory_mb,
                            fuel=fuel, env=env, entry=entry, args=args)
                    except WasmCoreError as exc:
                        results[index] = exc
                return
            # What `execute` does, without its keyword arguments per input.
            make, submit = operations.execute, self._submit
            tenant, client_timeout_s = self.tenant, self.timeout_s
            for index, data in todo:
                try:
                    results[index] = await submit(make(
                        shared, tenant, client_timeout_s, binary_id, data, timeout_ms,
                        memory_mb, fuel, env, entry, args))
                except WasmCoreError as exc:
                    results[index] = exc

        await asyncio.gather(*(lane() for _ in range(min(concurrency, len(items)))))
        return results

    async def execute_batch(self, binary_id: str, inputs: Iterable[bytes | str], *,
                            timeout_ms: int | None = None, memory_mb: int | None = None,
                            fuel: int | None = None, env: Mapping[str, str] | None = None,
                            entry: str | None = None, args: Sequence[str] | None = None
                            ) -> list[Execution | WasmCoreError]:
        """One request, one result per input in order: an `Execution`, or the error of that
        input (returned, not raised, so one bad input does not hide the others' results)."""
        return await self._run(operations.execute_batch(self.tenant, self.timeout_s, binary_id,
                                                        inputs, timeout_ms, memory_mb, fuel,
                                                        env, entry, args))

    async def chain(self, binary_ids: Iterable[str], input: bytes | str = b"", *,
                    timeout_ms: int | None = None, memory_mb: int | None = None,
                    fuel: int | None = None,
                    env: Mapping[str, str] | None = None,
                    args: Sequence[str] | None = None) -> ChainExecution:
        return await self._run(operations.chain(self.tenant, self.timeout_s, binary_ids, input,
                                                timeout_ms, memory_mb, fuel, env, args))

    async def list(self) -> list[p.BinaryInfo]:
        return await self._run(operations.list_binaries(self.tenant, self.timeout_s))

    async def unload(self, binary_id: str) -> None:
        await self._run(operations.unload(self.tenant, self.timeout_s, binary_id))

    async def stats(self, all_tenants: bool = False) -> p.StatsReply:
        return await self._run(operations.stats(self.tenant, self.timeout_s, all_tenants))
