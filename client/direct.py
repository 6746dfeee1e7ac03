"""The blocking client's direct lanes: leases the server gave it and the sockets to their
workers.

A lease (protocol: `Executed.lease`) lets this client send executes of one binary, with the
options of the execute that got it, straight to the worker that ran it, the supervisor off the
path. It is only ever a shortcut: when the worker answers LeaseEnded the execute goes through
the server as usual (and may get a new lease), and when the server says the worker died
(LeaseLost) the execute waiting on it fails as it would have through the server.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import zmq

from wasmcore.protocol import messages as p
from wasmcore.protocol.zmqopts import COPY_THRESHOLD

# Sockets to workers kept while no lease uses them (a replaced worker's lane is never used
# again; a few are kept for a worker that leases to this client again).
_IDLE_SOCKETS_KEPT = 4

# What a lease is for: the binary and every option of the execute that got it.
LeaseKey = tuple[Any, ...]


def lease_key(binary_id: str, timeout_ms: int | None, memory_mb: int | None,
              fuel: int | None, env: Mapping[str, str] | None, entry: str | None,
              args: Sequence[str] | None) -> LeaseKey:
    return (binary_id, timeout_ms or None, memory_mb or None, fuel or None,
            tuple(sorted(env.items())) if env else (), entry,
            tuple(args) if args else ())


@dataclass(slots=True)
class ClientLease:
    endpoint: str
    token: bytes
    left: int  # executions it may still serve
    max_input_bytes: int


class DirectLanes:
    def __init__(self, ctx: zmq.Context[Any]) -> None:
        self._ctx = ctx
        self._leases: dict[LeaseKey, ClientLease] = {}
        self._sockets: dict[str, zmq.Socket[Any]] = {}

    def usable(self, key: LeaseKey, input_bytes: int) -> ClientLease | None:
        """The lease to send this execute on, or None (none held, used up, input too big)."""
        lease = self._leases.get(key)
        if lease is None or lease.left <= 0 or input_bytes > lease.max_input_bytes:
            return None
        return lease

    def remember(self, key: LeaseKey, granted: p.DirectLease) -> None:
        if not granted.endpoint.startswith("ipc://") or granted.executions < 1:
            return  # only a worker's ipc socket on this host is a direct lane
        self._leases[key] = ClientLease(granted.endpoint, granted.token, granted.executions,
                                        granted.max_input_bytes)

    def forget(self, token: bytes) -> None:
        for key, lease in list(self._leases.items()):
            if lease.token == token:
                del self._leases[key]

    def socket(self, endpoint: str) -> zmq.Socket[Any]:
        sock = self._sockets.get(endpoint)
        if sock is None:
            self._close_unused()
            sock = self._sockets[endpoint] = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.copy_threshold = COPY_THRESHOLD
            sock.connect(endpoint)
        return sock

    def _close_unused(self) -> None:
        used = {lease.endpoint for lease in self._leases.values()}
        unused = [e for e in self._sockets if e not in used]
        for endpoint in unused[:max(0, len(unused) - _IDLE_SOCKETS_KEPT + 1)]:
            self._sockets.pop(endpoint).close()

    def close(self) -> None:
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()
        self._leases.clear()
