"""The transport-free core of both clients: one `Operation` per request, ready to send.

An operation is a request header, its payload frames, how long to wait for its reply and how
to turn that reply into the caller's result. `Client` and `AsyncClient` only send operations
and wait; everything else they share is decided here once, so the two cannot drift apart.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

from wasmcore.client.results import ChainExecution, Execution, unpack
from wasmcore.client.shared_memory import SharedMemory
from wasmcore.protocol import messages as p
from wasmcore.protocol.errors import WasmCoreError

T = TypeVar("T")
Payload = bytes | list[bytes] | None

# A load compiles the module before it answers: a large one takes far longer than a run.
LOAD_WAIT_S = 120.0
# Hello comes before a client's first execute: a server that cannot answer it this fast is
# not one to send work to.
HELLO_WAIT_S = 10.0
# A plugin that overruns its timeout_ms is stopped by the server, which then answers TIMEOUT:
# the client waits that long for that answer instead of giving up first.
TIMEOUT_GRACE_S = 5.0


class Operation(Generic[T]):
    """One request and what to do with its reply. Transports call `finish` with the reply,
    or `abandon` when none will come (timeout, cancellation, a failed send). `deadline`
    is the transport's to set (AsyncClient: when the request is sent, on its loop's clock)."""

    __slots__ = ("request", "payload", "wait_s", "deadline")

    def __init__(self, request: Any, payload: Payload, wait_s: float) -> None:
        self.request = request
        self.payload = payload
        self.wait_s = wait_s

    def finish(self, reply: Any, frames: list[bytes]) -> T:
        return unpack(reply, frames)

    def abandon(self) -> None:
        pass


class Exchange(Operation[tuple[Any, list[bytes]]]):
    """A request sent as it is, its reply returned as it came: (reply header, payload frames)."""

    __slots__ = ()

    def finish(self, reply: Any, frames: list[bytes]) -> tuple[Any, list[bytes]]:
        return reply, frames


class ExecuteOperation(Operation[Execution]):
    """An execute, which may lend a shared-memory segment: its input, or room for a large
    output. The segment comes back when the request is over, for reuse only after a
    successful reply (a worker may still hold it after anything else)."""

    __slots__ = ("shared", "lent")

    def __init__(self, request: p.Execute, data: bytes, wait_s: float,
                 shared: SharedMemory) -> None:
        # Every slot set here, no super().__init__: this runs once per execute.
        self.request = request
        self.wait_s = wait_s
        self.shared = shared
        self.payload, self.lent = shared.attach(request, data)

    def finish(self, reply: Any, frames: list[bytes]) -> Execution:
        if not self.lent and type(reply) is p.Executed and reply.output_shm is None:
            # The common reply (no segment lent, output inline): nothing to release, and
            # none of unpack's dispatch. Same result as unpack's.
            return Execution(frames[0] if frames else b"", reply.logs, reply.metering,
                             reply.binary_id, reply.version, reply.worker_pid,
                             reply.logs_truncated)
        reusable = False
        try:
            result: Execution = unpack(reply, frames, self.shared)
            # A large output that came back inline means the worker could not use the
            # segment: not one to lend again.
            reusable = isinstance(reply, p.Executed) and (
                reply.output_shm is not None or not frames
                or not self.shared.wants(frames[0]))
            return result
        finally:
            self.shared.release(self.lent, reusable)

    def abandon(self) -> None:
        self.shared.release(self.lent)


def encode_frames(request: Any, payload: Payload) -> list[bytes]:
    """The request's frames on the wire: its header, then its payload frames."""
    header = p.encode(request)
    if payload is None:
        return [header]
    if isinstance(payload, list):
        return [header, *payload]
    return [header, payload]


def per_step_wait_s(client_timeout_s: float, steps: int, timeout_ms: int | None) -> float:
    """The wait for a batch or chain: its steps run one after another, each allowed the
    request's timeout_ms."""
    return client_timeout_s + steps * (timeout_ms or 0) / 1000


def execute_wait_s(client_timeout_s: float, timeout_ms: int | None) -> float:
    """The wait for an execute: the client's timeout, or longer when the request allows the
    plugin more time."""
    return max(client_timeout_s, (timeout_ms or 0) / 1000 + TIMEOUT_GRACE_S)


def hello(tenant: str, client_timeout_s: float) -> Operation[p.Welcome]:
    return Operation(p.Hello(tenant=tenant), None, min(client_timeout_s, HELLO_WAIT_S))


def load(tenant: str, client_timeout_s: float, path: str | os.PathLike[str] | None,
         data: bytes | None, name: str | None) -> Operation[p.Loaded]:
    wait_s = max(client_timeout_s, LOAD_WAIT_S)
    if path is not None and data is not None:
        raise ValueError("load takes a path or data, not both")
    if path is not None:
        # The client reads its own file and sends the bytes; the path, resolved (the server
        # follows no symlink when it rereads a watched file), names the binary: loading it
        # again updates the same one. The server never needs to read the file for this.
        source = Path(path)
        return Operation(p.Load(tenant=tenant, path=str(source.resolve()),
                                name=name or source.stem), source.read_bytes(), wait_s)
    if data is None:
        raise ValueError("load needs a path or data")
    if not name:
        raise ValueError("loading bytes needs a name")
    return Operation(p.Load(tenant=tenant, name=name), bytes(data), wait_s)


def execute(shared: SharedMemory, tenant: str, client_timeout_s: float, binary_id: str,
            input: bytes | str, timeout_ms: int | None, memory_mb: int | None,
            fuel: int | None, env: Mapping[str, str] | None,
            entry: str | None, args: Sequence[str] | None = None) -> ExecuteOperation:
    # AsyncClient's hot path (~50k a second): one request and one operation, nothing more.
    # The common call (bytes, no options) skips every conversion and keyword it does not
    # need: msgspec fills the defaults faster than it takes them as arguments.
    data = input if type(input) is bytes else (
        input.encode() if isinstance(input, str) else bytes(input))
    if (timeout_ms is None and memory_mb is None and fuel is None and not env
            and entry is None and args is None):
        request = p.Execute(binary_id=binary_id, tenant=tenant)
        wait_s = client_timeout_s if client_timeout_s >= TIMEOUT_GRACE_S else TIMEOUT_GRACE_S
    else:
        request = p.Execute(binary_id=binary_id, tenant=tenant, timeout_ms=timeout_ms,
                            memory_mb=memory_mb, fuel=fuel, env=dict(env or {}), entry=entry,
                            args=_args(args))
        wait_s = execute_wait_s(client_timeout_s, timeout_ms)
    return ExecuteOperation(request, data, wait_s, shared)


def execute_batch(tenant: str, client_timeout_s: float, binary_id: str,
                  inputs: Iterable[bytes | str], timeout_ms: int | None, memory_mb: int | None,
                  fuel: int | None, env: Mapping[str, str] | None,
                  entry: str | None,
                  args: Sequence[str] | None = None) -> Operation[list[Execution | WasmCoreError]]:
    frames = [i.encode() if isinstance(i, str) else bytes(i) for i in inputs]
    if not frames:
        raise ValueError("execute_batch needs at least one input")
    request = p.ExecuteBatch(binary_id=binary_id, tenant=tenant, count=len(frames),
                             timeout_ms=timeout_ms, memory_mb=memory_mb, fuel=fuel,
                             env=dict(env or {}), entry=entry, args=_args(args))
    return Operation(request, frames, per_step_wait_s(client_timeout_s, len(frames), timeout_ms))


def chain(tenant: str, client_timeout_s: float, binary_ids: Iterable[str], input: bytes | str,
          timeout_ms: int | None, memory_mb: int | None, fuel: int | None,
          env: Mapping[str, str] | None,
          args: Sequence[str] | None = None) -> Operation[ChainExecution]:
    ids = list(binary_ids)
    data = input.encode() if isinstance(input, str) else bytes(input)
    request = p.Chain(binary_ids=ids, tenant=tenant, timeout_ms=timeout_ms,
                      memory_mb=memory_mb, fuel=fuel, env=dict(env or {}), args=_args(args))
    return Operation(request, data, per_step_wait_s(client_timeout_s, len(ids), timeout_ms))


def _args(args: Sequence[str] | None) -> list[str]:
    """A WASI module's argv[1:]. A lone string would be its characters: refused."""
    if args is None:
        return []
    if isinstance(args, str | bytes):
        raise TypeError("args takes a list of strings, not one string")
    return [str(arg) for arg in args]


def list_binaries(tenant: str, client_timeout_s: float) -> Operation[list[p.BinaryInfo]]:
    return Operation(p.ListBinaries(tenant=tenant), None, client_timeout_s)


def unload(tenant: str, client_timeout_s: float, binary_id: str) -> Operation[None]:
    return Operation(p.Unload(tenant=tenant, binary_id=binary_id), None, client_timeout_s)


def stats(tenant: str, client_timeout_s: float,
          all_tenants: bool = False) -> Operation[p.StatsReply]:
    return Operation(p.Stats(tenant=tenant, all_tenants=all_tenants), None, client_timeout_s)
