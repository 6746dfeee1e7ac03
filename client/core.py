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
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

import msgspec
import zmq

from wasmcore.client import operations
from wasmcore.client.handshake import HandshakeWatch
from wasmcore.client.operations import Exchange, Operation, Payload, encode_frames
from wasmcore.client.results import ChainExecution, Execution
from wasmcore.client.shared_memory import SharedMemory
from wasmcore.protocol import messages as p
from wasmcore.protocol.credentials import Credentials, apply_to_client, resolve_credentials
from wasmcore.protocol.endpoints import ENDPOINT_ENV, resolve_endpoint
from wasmcore.protocol.errors import Unauthenticated, Unavailable, WasmCoreError
from wasmcore.protocol.zmqopts import COPY_THRESHOLD, NOBLOCK

__all__ = ["AsyncClient", "ChainExecution", "Client", "Execution", "SharedMemory"]

T = TypeVar("T")
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
    """

    def __init__(self, endpoint: str | None = None, tenant: str | None = None,
                 timeout_s: float = 30.0, context: zmq.Context[Any] | None = None,
                 zero_copy: bool = False, credentials: CredentialsArg = None) -> None:
        self.zero_copy = zero_copy
        self.timeout_s = timeout_s
        self.endpoint, self.tenant, self._credentials = _settings(endpoint, tenant, credentials)
        self._own_context = context is None
        self._ctx = context or zmq.Context()
        self._open()
        self._ids = itertools.count(1)
        self._shared: SharedMemory | None = None

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
                # An older request's late reply (it timed out here): not ours, skip it.
        except BaseException:
            op.abandon()
            raise
        return op.finish(reply, reply_frames[1:])

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
        return self._run(operations.execute(self._shared_memory(), self.tenant, self.timeout_s,
                                            binary_id, input, timeout_ms, memory_mb, fuel, env,
                                            entry, args))

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


class AsyncClient:
    """An asyncio client: any number of requests in flight on one connection.

    Built on a plain ZeroMQ socket watched with `loop.add_reader`, not on zmq.asyncio: its
    per-message futures cost more than the rest of a request. The socket's FD is
    edge-triggered, so every drain runs until a receive finds nothing left, and every burst
    of sends is followed by a drain (a send can consume the edge of a waiting reply).
    """

    def __init__(self, endpoint: str | None = None, tenant: str | None = None,
                 timeout_s: float = 30.0, zero_copy: bool = False,
                 credentials: CredentialsArg = None) -> None:
        self.timeout_s = timeout_s
        self.zero_copy = zero_copy
        self.endpoint, self.tenant, self._credentials = _settings(endpoint, tenant, credentials)
        self._ctx = zmq.Context()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._open()
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[tuple[Any, list[bytes]]]] = {}
        self._shared: SharedMemory | None = None
        self._hello: asyncio.Future[p.Welcome] | None = None
        self._outbox: list[Operation[Any]] = []
        self._flush_scheduled = False

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
        self._unwatch()
        self._loop = None
        for future in self._pending.values():
            if not future.done():
                future.set_exception(Unavailable("client closed"))
        self._pending.clear()
        self._watch.close()
        self._socket.close()
        self._ctx.term()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _drain(self) -> None:
        recv, pending = self._socket.recv_multipart, self._pending
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
                for one, payload in zip(reply.replies, reply.payloads, strict=False):
                    future = pending.pop(one.id, None)
                    if future is not None and not future.done():
                        future.set_result((one, [] if payload is None else [payload]))
                continue
            future = pending.pop(reply.id, None)
            if future is not None and not future.done():
                future.set_result((reply, frames[1:]))

    def _on_handshake(self) -> None:
        """A handshake event: if the server refused this client, every request waiting for a
        reply gets the reason now (none would ever come), and the client starts over on a
        new socket, so that nothing sent so far is delivered later should a reconnect be
        accepted."""
        if self._watch.update() is None:
            return
        watch = self._watch
        self._outbox.clear()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(watch.refusal() or Unavailable("refused"))
        self._pending.clear()
        self._unwatch()
        watch.close()
        self._socket.close()
        self._open()

    def _flush(self) -> None:
        """Send every request made since the last turn of the event loop, back to back: a send
        that finds ZeroMQ's I/O thread asleep costs ~8 us here, one in a burst ~0.5 us."""
        self._flush_scheduled = False
        outbox, self._outbox = self._outbox, []
        send = self._socket.send_multipart
        pack = p.ExecutePack(executes=[], payloads=[])
        packed_bytes = 0
        for op in outbox:
            request, payload = op.request, op.payload
            if type(request) is p.Execute and p.fits_in_pack(payload):
                header = msgspec.Raw(p.encode(request))  # encoded once, spliced into the pack
                size = len(header) + (len(payload) if payload else 0) + 16
                full = (packed_bytes + size > p.EXECUTE_PACK_MAX_BYTES
                        or len(pack.executes) >= p.MAX_PACK_EXECUTES)
                if full and pack.executes:
                    send([p.encode(pack)])
                    pack = p.ExecutePack(executes=[], payloads=[])
                    packed_bytes = 0
                pack.executes.append(header)  # type: ignore[arg-type]
                pack.payloads.append(payload)  # type: ignore[arg-type]
                packed_bytes += size
            else:
                send(encode_frames(request, payload), copy=False)  # copied below copy_threshold
        if pack.executes:
            send([p.encode(pack)])
        self._drain()  # a send can consume the FD's edge of a reply that is already waiting

    def _expire(self, request_id: int, wait: float) -> None:
        future = self._pending.pop(request_id, None)
        if future is not None and not future.done():
            future.set_exception(Unavailable(
                f"no reply from {self.endpoint} within {wait:.1f} s", {"endpoint": self.endpoint}))

    async def _run(self, op: Operation[T]) -> T:
        """Queue `op` for the next burst, wait up to its wait for its reply, and finish it."""
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            self._watch_on(loop)
        op.request.id = request_id = next(self._ids)
        future: asyncio.Future[tuple[Any, list[bytes]]] = loop.create_future()
        self._pending[request_id] = future
        self._outbox.append(op)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        # One timer handle per request: cheaper than wait_for's extra task.
        timer = loop.call_later(op.wait_s, self._expire, request_id, op.wait_s)
        try:
            reply, frames = await future
        except BaseException:
            op.abandon()
            raise
        finally:
            timer.cancel()
            self._pending.pop(request_id, None)
        return op.finish(reply, frames)

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

    async def execute(self, binary_id: str, input: bytes | str = b"", *,
                      timeout_ms: int | None = None, memory_mb: int | None = None,
                      fuel: int | None = None, env: Mapping[str, str] | None = None,
                      entry: str | None = None,
                      args: Sequence[str] | None = None) -> Execution:
        """`args`: a WASI module's arguments, argv[1:] (argv[0] is the binary's name)."""
        return await self._run(operations.execute(
            self._shared or await self._shared_memory(), self.tenant, self.timeout_s,
            binary_id, input, timeout_ms, memory_mb, fuel, env, entry, args))

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
