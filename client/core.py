"""Python clients: `Client` (blocking) and `AsyncClient` (asyncio, many requests in flight).

Both speak DEALER to the supervisor's ROUTER. Errors come back as the exception class of their
code (see `wasmcore.protocol.errors`). Every wait is bounded by the client's timeout; a reply
that arrives after its request timed out is recognised by its id and discarded.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import zmq

from wasmcore.protocol import messages as p
from wasmcore.protocol import shm
from wasmcore.protocol.endpoints import resolve_endpoint
from wasmcore.protocol.errors import Unavailable, WasmCoreError, error_from_code
from wasmcore.protocol.shm import ShmRef

_NOBLOCK = int(zmq.NOBLOCK)  # a plain int: pyzmq does enum arithmetic on Flag values


@dataclass(slots=True)
class Execution:
    """The result of one execute: the plugin's output, its logs and its metering."""

    output: bytes  # a read-only memoryview for shared-memory outputs of a zero_copy client
    logs: list[str]
    metering: p.Metering
    binary_id: str = ""
    version: int = 0
    worker_pid: int = 0
    logs_truncated: bool = False


@dataclass(slots=True)
class ChainExecution:
    output: bytes
    steps: list[p.StepResult] = field(default_factory=list)
    worker_pid: int = 0


def _execute_request(binary_id: str, input: bytes | str, tenant: str, timeout_ms: int | None,
                     memory_mb: int | None, fuel: int | None, env: Mapping[str, str] | None,
                     entry: str | None) -> tuple[p.Execute, bytes]:
    data = input.encode() if isinstance(input, str) else bytes(input)
    request = p.Execute(binary_id=binary_id, tenant=tenant, timeout_ms=timeout_ms,
                        memory_mb=memory_mb, fuel=fuel, env=dict(env or {}), entry=entry)
    return request, data


def _batch_request(binary_id: str, inputs: Iterable[bytes | str], tenant: str,
                   timeout_ms: int | None, memory_mb: int | None, fuel: int | None,
                   env: Mapping[str, str] | None,
                   entry: str | None) -> tuple[p.ExecuteBatch, list[bytes]]:
    frames = [i.encode() if isinstance(i, str) else bytes(i) for i in inputs]
    if not frames:
        raise ValueError("execute_batch needs at least one input")
    request = p.ExecuteBatch(binary_id=binary_id, tenant=tenant, count=len(frames),
                             timeout_ms=timeout_ms, memory_mb=memory_mb, fuel=fuel,
                             env=dict(env or {}), entry=entry)
    return request, frames


def _reply_wait_s(client_timeout_s: float, timeout_ms: int | None) -> float:
    """How long to wait for an execute's reply: the client's timeout, or longer when the
    request allows the plugin more time (plus the server's grace to answer TIMEOUT)."""
    return max(client_timeout_s, (timeout_ms or 0) / 1000 + 5)


def _frames(request: Any, payload: bytes | list[bytes] | None) -> list[bytes]:
    header = p.encode(request)
    if payload is None:
        return [header]
    if isinstance(payload, list):
        return [header, *payload]
    return [header, payload]


def _load_request(path: str | os.PathLike[str] | None, data: bytes | None, name: str | None,
                  tenant: str) -> tuple[p.Load, bytes | None]:
    if path is not None and data is not None:
        raise ValueError("load takes a path or data, not both")
    if path is not None:
        # A path means the server's filesystem; on one host, the caller's cwd is what a user
        # means by a relative path.
        return p.Load(tenant=tenant, path=str(Path(path).absolute()), name=name), None
    if data is None:
        raise ValueError("load needs a path or data")
    if not name:
        raise ValueError("loading bytes needs a name")
    return p.Load(tenant=tenant, name=name), bytes(data)


def _unpack(reply: Any, frames: list[bytes], shared: SharedMemory | None = None) -> Any:
    payload = frames[0] if frames else b""
    match reply:
        case p.ErrorReply():
            raise error_from_code(reply.code, reply.message, reply.details)
        case p.Executed():
            if reply.output_shm is not None:
                if shared is None:
                    raise Unavailable("the server sent a shared-memory output to a client "
                                      "that did not ask for one")
                payload = shared.take_output(reply.output_shm)
            return Execution(output=payload, logs=reply.logs, metering=reply.metering,
                             binary_id=reply.binary_id, version=reply.version,
                             worker_pid=reply.worker_pid, logs_truncated=reply.logs_truncated)
        case p.Chained():
            return ChainExecution(output=payload, steps=reply.steps, worker_pid=reply.worker_pid)
        case p.BatchExecuted():
            results: list[Execution | WasmCoreError] = []
            for item, output in zip(reply.items, frames, strict=False):
                if item.code:
                    results.append(error_from_code(item.code, item.message, item.details))
                else:
                    results.append(Execution(output=output, logs=item.logs,
                                             metering=item.metering, binary_id=reply.binary_id,
                                             version=reply.version, worker_pid=reply.worker_pid))
            return results
        case _:
            return reply


class SharedMemory:
    """The client's side of shared-memory payloads, settled once per client by `hello`.

    Used only when the server's boot id matches this host's and its segment directory is
    writable here. Segments are recycled through a small free list: a large input is written
    over a spare segment, and the request lends that segment (or a spare one) to the worker
    for a large output, which overwrites it in place once the input is read. Reused tmpfs
    pages cost no allocation, zeroing or freeing. A segment goes back to the free list only
    after a successful reply (the worker is then done with it); after anything else it is
    removed. A `zero_copy` output is a read-only view of its segment's mapping: the segment
    returns to the free list when the caller drops the last reference to that view. Whatever
    a crash leaves behind, the server sweeps (segments carry this process's pid).
    """

    _KEEP = 4

    def __init__(self, welcome: p.Welcome, zero_copy: bool = False) -> None:
        self.pid = os.getpid()
        self.zero_copy = zero_copy
        self.directory: str | None = None
        self.threshold = welcome.shm_threshold_bytes
        if (welcome.shm_dir and welcome.boot_id and welcome.boot_id == shm.boot_id()
                and os.access(welcome.shm_dir, os.W_OK)):
            self.directory = welcome.shm_dir
        self._free: list[str] = []
        self._lent: set[str] = set()  # lent to requests in flight
        self._viewed: set[str] = set()  # behind zero-copy views the caller still holds
        self._closed = False

    @property
    def enabled(self) -> bool:
        return self.directory is not None

    def wants(self, data: bytes) -> bool:
        return self.directory is not None and len(data) >= self.threshold

    def put(self, data: bytes) -> ShmRef:
        assert self.directory is not None
        while self._free:
            name = self._free.pop()
            try:
                return shm.overwrite(self.directory, name, data)
            except OSError:
                continue  # swept or removed: make a new one
        return shm.write(self.directory, self.pid, data)

    def attach(self, request: p.Execute, data: bytes) -> tuple[bytes | None, str]:
        """Ready `request` for shared memory. Returns (the inline payload, or None when the
        input went into a segment; the name of the segment lent to the request, or "").
        Hand the reply and that name to `finish`, or the name to `release` on failure."""
        if self.directory is None:
            return data, ""
        request.output_shm_pid = self.pid
        if self.wants(data):
            request.input_shm = self.put(data)
            lent, payload = request.input_shm.name, None
        else:
            lent, payload = (self._free.pop() if self._free else ""), data
        if lent:
            self._lent.add(lent)
            request.output_shm_into = lent
        return payload, lent

    def finish(self, reply: Any, frames: list[bytes], lent: str) -> Any:
        """Unpack the reply, then take the lent segment back."""
        reusable = False
        try:
            result = _unpack(reply, frames, self)
            reusable = isinstance(reply, p.Executed)
            return result
        finally:
            self.release(lent, reusable)

    def release(self, name: str, reusable: bool = False) -> None:
        if self.directory is None or not name:
            return
        self._lent.discard(name)
        if name not in self._viewed:  # else it comes back when its view is dropped
            self._keep(name, reusable)

    def _keep(self, name: str, reusable: bool) -> None:
        assert self.directory is not None
        if reusable and not self._closed and len(self._free) < self._KEEP:
            self._free.append(name)
        else:
            shm.remove(self.directory, name)

    def take_output(self, ref: ShmRef) -> bytes:
        if self.directory is None:
            raise Unavailable("shared-memory output without a shared-memory directory")
        if self.zero_copy:
            return self._view(ref)  # type: ignore[return-value]
        if ref.name in self._lent:
            return shm.read(self.directory, ref)  # ours: `finish` takes it back
        reusable = False
        try:
            data = shm.read(self.directory, ref)
            reusable = True
            return data
        finally:
            self._keep(ref.name, reusable)

    def _view(self, ref: ShmRef) -> memoryview:
        assert self.directory is not None
        try:
            region = shm.map_readonly(self.directory, ref)
        except BaseException:
            if ref.name not in self._lent:
                shm.remove(self.directory, ref.name)
            raise
        if region is None:
            if ref.name not in self._lent:
                self._keep(ref.name, True)
            return memoryview(b"")
        self._viewed.add(ref.name)
        weakref.finalize(region, self._view_dropped, ref.name)
        return memoryview(region)

    def _view_dropped(self, name: str) -> None:
        self._viewed.discard(name)
        if name not in self._lent:
            self._keep(name, True)

    def close(self) -> None:
        self._closed = True
        if self.directory is not None:
            # Views still held stay readable: a mapping outlives its name.
            for name in [*self._free, *self._viewed]:
                shm.remove(self.directory, name)
        self._free.clear()


class Client:
    """A blocking client. One request at a time; not thread-safe (use one per thread).

    `zero_copy=True`: an output that came through shared memory is returned as a read-only
    memoryview over the mapped segment instead of being copied into bytes.
    """

    def __init__(self, endpoint: str | None = None, tenant: str = p.DEFAULT_TENANT,
                 timeout_s: float = 30.0, context: zmq.Context[Any] | None = None,
                 zero_copy: bool = False) -> None:
        self.endpoint = resolve_endpoint(endpoint)
        self.zero_copy = zero_copy
        self.tenant = tenant
        self.timeout_s = timeout_s
        self._own_context = context is None
        self._ctx = context or zmq.Context()
        self._socket = self._ctx.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        # pyzmq's zero-copy sends track each frame through a helper thread: only worth it
        # for large frames.
        self._socket.copy_threshold = 1024 * 1024
        self._socket.connect(self.endpoint)
        self._ids = itertools.count(1)
        self._shared: SharedMemory | None = None

    def close(self) -> None:
        if self._shared is not None:
            self._shared.close()
        self._socket.close()
        if self._own_context:
            self._ctx.term()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, request: Any, payload: bytes | list[bytes] | None = None,
             timeout_s: float | None = None) -> tuple[Any, list[bytes]]:
        """Send one request, wait for its reply: (reply header, payload frames)."""
        request.id = next(self._ids)
        frames = _frames(request, payload)
        self._socket.send_multipart(frames, copy=False)  # copied below copy_threshold
        wait_ms = int(1000 * (self.timeout_s if timeout_s is None else timeout_s))
        while True:
            if not self._socket.poll(wait_ms):
                raise Unavailable(
                    f"no reply from {self.endpoint} within {wait_ms} ms; is `wasm-core` running?",
                    {"endpoint": self.endpoint},
                )
            reply_frames = self._socket.recv_multipart()
            reply = p.reply_decoder.decode(reply_frames[0])
            if reply.id == request.id:
                return reply, reply_frames[1:]
            # An older request's late reply (it timed out here): not ours, skip it.

    def hello(self) -> p.Welcome:
        """What the server offers (limits, shared memory); asked once, then remembered."""
        welcome = _unpack(*self.call(p.Hello(tenant=self.tenant), None, min(self.timeout_s, 10)))
        self._shared = SharedMemory(welcome, self.zero_copy)
        return welcome

    def _shared_memory(self) -> SharedMemory:
        if self._shared is None:
            self.hello()
        assert self._shared is not None
        return self._shared


    def load(self, path: str | os.PathLike[str] | None = None, *, data: bytes | None = None,
             name: str | None = None) -> p.Loaded:
        request, payload = _load_request(path, data, name, self.tenant)
        return _unpack(*self.call(request, payload, max(self.timeout_s, 120)))

    def execute(self, binary_id: str, input: bytes | str = b"", *, timeout_ms: int | None = None,
                memory_mb: int | None = None, fuel: int | None = None,
                env: Mapping[str, str] | None = None, entry: str | None = None) -> Execution:
        request, data = _execute_request(binary_id, input, self.tenant, timeout_ms, memory_mb,
                                         fuel, env, entry)
        shared = self._shared_memory()
        payload, lent = shared.attach(request, data)
        try:
            reply, frames = self.call(request, payload, _reply_wait_s(self.timeout_s, timeout_ms))
        except BaseException:
            shared.release(lent)
            raise
        return shared.finish(reply, frames, lent)

    def execute_batch(self, binary_id: str, inputs: Iterable[bytes | str], *,
                      timeout_ms: int | None = None, memory_mb: int | None = None,
                      fuel: int | None = None, env: Mapping[str, str] | None = None,
                      entry: str | None = None) -> list[Execution | WasmCoreError]:
        """One request, one result per input in order: an `Execution`, or the error of that
        input (returned, not raised, so one bad input does not hide the others' results)."""
        request, frames = _batch_request(binary_id, inputs, self.tenant, timeout_ms, memory_mb,
                                         fuel, env, entry)
        timeout = self.timeout_s + len(frames) * (timeout_ms or 0) / 1000
        return _unpack(*self.call(request, frames, timeout))

    def chain(self, binary_ids: Iterable[str], input: bytes | str = b"", *,
              timeout_ms: int | None = None, memory_mb: int | None = None,
              fuel: int | None = None, env: Mapping[str, str] | None = None) -> ChainExecution:
        ids = list(binary_ids)
        data = input.encode() if isinstance(input, str) else bytes(input)
        request = p.Chain(binary_ids=ids, tenant=self.tenant, timeout_ms=timeout_ms,
                          memory_mb=memory_mb, fuel=fuel, env=dict(env or {}))
        timeout = self.timeout_s + len(ids) * (timeout_ms or 0) / 1000
        return _unpack(*self.call(request, data, timeout))

    def list(self) -> list[p.BinaryInfo]:
        return _unpack(*self.call(p.ListBinaries(tenant=self.tenant))).binaries

    def unload(self, binary_id: str) -> None:
        _unpack(*self.call(p.Unload(tenant=self.tenant, binary_id=binary_id)))

    def stats(self) -> p.StatsReply:
        return _unpack(*self.call(p.Stats(tenant=self.tenant)))


class AsyncClient:
    """An asyncio client: any number of requests in flight on one connection.

    Built on a plain ZeroMQ socket watched with `loop.add_reader`, not on zmq.asyncio: its
    per-message futures cost more than the rest of a request. The socket's FD is
    edge-triggered, so every drain runs until a receive finds nothing left, and every burst
    of sends is followed by a drain (a send can consume the edge of a waiting reply).
    """

    def __init__(self, endpoint: str | None = None, tenant: str = p.DEFAULT_TENANT,
                 timeout_s: float = 30.0, zero_copy: bool = False) -> None:
        self.endpoint = resolve_endpoint(endpoint)
        self.tenant = tenant
        self.timeout_s = timeout_s
        self.zero_copy = zero_copy
        self._ctx = zmq.Context()
        self._socket = self._ctx.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SNDHWM, 0)  # sends never block: nothing waits in a send
        self._socket.setsockopt(zmq.RCVHWM, 0)
        self._socket.copy_threshold = 1024 * 1024  # zero-copy only pays off for large frames
        self._socket.connect(self.endpoint)
        self._fd = self._socket.getsockopt(zmq.FD)
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[tuple[Any, list[bytes]]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._shared: SharedMemory | None = None
        self._hello: asyncio.Future[p.Welcome] | None = None
        self._outbox: list[tuple[Any, bytes | list[bytes] | None]] = []
        self._flush_scheduled = False

    async def close(self) -> None:
        if self._shared is not None:
            self._shared.close()
        if self._loop is not None:
            self._loop.remove_reader(self._fd)
            self._loop = None
        for future in self._pending.values():
            if not future.done():
                future.set_exception(Unavailable("client closed"))
        self._pending.clear()
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
                frames = recv(_NOBLOCK)
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

    def _flush(self) -> None:
        """Send every request made since the last turn of the event loop, back to back: a send
        that finds ZeroMQ's I/O thread asleep costs ~8 us here, one in a burst ~0.5 us."""
        self._flush_scheduled = False
        outbox, self._outbox = self._outbox, []
        send = self._socket.send_multipart
        pack = p.ExecutePack(executes=[], payloads=[])
        packed_bytes = 0
        for request, payload in outbox:
            if type(request) is p.Execute and p.fits_in_pack(payload):
                header = msgspec.Raw(p.encode(request))  # encoded once, spliced into the pack
                size = len(header) + (len(payload) if payload else 0) + 16
                if packed_bytes + size > p.EXECUTE_PACK_MAX_BYTES and pack.executes:
                    send([p.encode(pack)])
                    pack = p.ExecutePack(executes=[], payloads=[])
                    packed_bytes = 0
                pack.executes.append(header)  # type: ignore[arg-type]
                pack.payloads.append(payload)
                packed_bytes += size
            else:
                send(_frames(request, payload), copy=False)  # copied below copy_threshold
        if pack.executes:
            send([p.encode(pack)])
        self._drain()  # a send can consume the FD's edge of a reply that is already waiting

    def _expire(self, request_id: int, wait: float) -> None:
        future = self._pending.pop(request_id, None)
        if future is not None and not future.done():
            future.set_exception(Unavailable(
                f"no reply from {self.endpoint} within {wait:.1f} s", {"endpoint": self.endpoint}))

    async def call(self, request: Any, payload: bytes | list[bytes] | None = None,
                   timeout_s: float | None = None) -> tuple[Any, list[bytes]]:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            loop.add_reader(self._fd, self._drain)
        request.id = request_id = next(self._ids)
        future: asyncio.Future[tuple[Any, list[bytes]]] = loop.create_future()
        self._pending[request_id] = future
        self._outbox.append((request, payload))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        wait = self.timeout_s if timeout_s is None else timeout_s
        # One timer handle per request: cheaper than wait_for's extra task.
        timer = loop.call_later(wait, self._expire, request_id, wait)
        try:
            return await future
        finally:
            timer.cancel()
            self._pending.pop(request_id, None)

    async def load(self, path: str | os.PathLike[str] | None = None, *,
                   data: bytes | None = None, name: str | None = None) -> p.Loaded:
        request, payload = _load_request(path, data, name, self.tenant)
        return _unpack(*await self.call(request, payload, max(self.timeout_s, 120)))

    async def execute(self, binary_id: str, input: bytes | str = b"", *,
                      timeout_ms: int | None = None, memory_mb: int | None = None,
                      fuel: int | None = None, env: Mapping[str, str] | None = None,
                      entry: str | None = None) -> Execution:
        request, data = _execute_request(binary_id, input, self.tenant, timeout_ms, memory_mb,
                                         fuel, env, entry)
        shared = self._shared or await self._shared_memory()
        payload, lent = shared.attach(request, data)
        try:
            reply, frames = await self.call(request, payload,
                                            _reply_wait_s(self.timeout_s, timeout_ms))
        except BaseException:
            shared.release(lent)
            raise
        return shared.finish(reply, frames, lent)

    async def hello(self) -> p.Welcome:
        welcome = _unpack(*await self.call(p.Hello(tenant=self.tenant), None,
                                           min(self.timeout_s, 10)))
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

    async def execute_batch(self, binary_id: str, inputs: Iterable[bytes | str], *,
                            timeout_ms: int | None = None, memory_mb: int | None = None,
                            fuel: int | None = None, env: Mapping[str, str] | None = None,
                            entry: str | None = None) -> list[Execution | WasmCoreError]:
        request, frames = _batch_request(binary_id, inputs, self.tenant, timeout_ms, memory_mb,
                                         fuel, env, entry)
        timeout = self.timeout_s + len(frames) * (timeout_ms or 0) / 1000
        return _unpack(*await self.call(request, frames, timeout))

    async def chain(self, binary_ids: Iterable[str], input: bytes | str = b"", *,
                    timeout_ms: int | None = None, memory_mb: int | None = None,
                    fuel: int | None = None,
                    env: Mapping[str, str] | None = None) -> ChainExecution:
        ids = list(binary_ids)
        data = input.encode() if isinstance(input, str) else bytes(input)
        request = p.Chain(binary_ids=ids, tenant=self.tenant, timeout_ms=timeout_ms,
                          memory_mb=memory_mb, fuel=fuel, env=dict(env or {}))
        return _unpack(*await self.call(request, data))

    async def list(self) -> list[p.BinaryInfo]:
        return _unpack(*await self.call(p.ListBinaries(tenant=self.tenant))).binaries

    async def unload(self, binary_id: str) -> None:
        _unpack(*await self.call(p.Unload(tenant=self.tenant, binary_id=binary_id)))

    async def stats(self) -> p.StatsReply:
        return _unpack(*await self.call(p.Stats(tenant=self.tenant)))
