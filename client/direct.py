"""The clients' direct lanes: leases the server gave a client and the sockets to their
workers (`Client` waits on a lane with a poller, `AsyncClient` through its event loop).

A lease (protocol: `Executed.lease`) lets this client send executes of one binary, with the
options of the execute that got it, straight to the worker that ran it, the supervisor off the
path. It is only ever a shortcut: when the worker answers LeaseEnded the execute goes through
the server as usual (and may get a new lease), and when the server says the worker died
(LeaseLost) the execute waiting on it fails as it would have through the server.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from wasmcore.protocol import messages as p
from wasmcore.protocol.zmqopts import COPY_THRESHOLD, NOBLOCK

# Sockets to workers kept while no lease uses them (a replaced worker's lane is never used
# again; a few are kept for a worker that leases to this client again).
_IDLE_SOCKETS_KEPT = 4

# How often a direct execute that waits for its reply checks that the worker is still there.
CHECK_MS = 20

# What a lease is for: the binary and every option of the execute that got it.
LeaseKey = tuple[Any, ...]


def lease_key(binary_id: str, timeout_ms: int | None, memory_mb: int | None,
              fuel: int | None, env: Mapping[str, str] | None, entry: str | None,
              args: Sequence[str] | None) -> LeaseKey:
    return (binary_id, timeout_ms or None, memory_mb or None, fuel or None,
            tuple(sorted(env.items())) if env else (), entry,
            tuple(args) if args else ())


class Lane:
    """A socket to one worker's direct lane, and whether that worker is gone. A worker's lane
    path is never bound again once it exits, so a lane that lost its connection is dead for
    good. IMMEDIATE: an execute is only ever handed to a live connection, never queued for
    one that may not come (a send that cannot go out is an execute that never left)."""

    def __init__(self, ctx: zmq.Context[Any], endpoint: str) -> None:
        self.socket: zmq.Socket[Any] = ctx.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.IMMEDIATE, 1)
        self.socket.copy_threshold = COPY_THRESHOLD
        self.monitor: zmq.Socket[Any] = self.socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.socket.connect(endpoint)
        self.gone = False
        self.answered = False  # a reply came back on it: it is connected
        # A direct execute waits on the reply alone and reads the monitor between slices of
        # `CHECK_MS` (a monitor socket in the same poll cost ~20 us a round trip, measured).
        self.poller = zmq.Poller()
        self.poller.register(self.socket, zmq.POLLIN)

    def update(self) -> bool:
        """Read the monitor's events so far: True once the worker's end has closed."""
        while not self.gone:
            try:
                recv_monitor_message(self.monitor, NOBLOCK)
            except zmq.Again:
                break
            self.gone = True  # the only event asked for: DISCONNECTED
        return self.gone

    def writable(self, wait_ms: int) -> bool:
        """Connected (within `wait_ms` for a new lane) and alive, as far as is known: a lane
        that has answered is taken as connected (with IMMEDIATE a send to a connection
        ZeroMQ has seen close fails at once). A worker seen gone before the send is one the
        execute never reached: it goes through the server, whatever the server says of the
        lease (LeaseLost is about an execute that was on the lane when the worker died)."""
        if self.update():
            return False
        return self.answered or bool(self.socket.poll(wait_ms, zmq.POLLOUT))

    def close(self) -> None:
        try:
            self.socket.disable_monitor()
        except zmq.ZMQError:
            pass
        self.monitor.close()
        self.socket.close()


@dataclass(slots=True)
class ClientLease:
    endpoint: str
    token: bytes
    left: int  # executions it may still serve
    max_input_bytes: int


class DirectLanes:
    def __init__(self, ctx: zmq.Context[Any],
                 on_close: Callable[[Lane], None] | None = None) -> None:
        self._ctx = ctx
        # Called before a lane's sockets close (an event loop stops watching their FDs).
        self._on_close = on_close
        self._leases: dict[LeaseKey, ClientLease] = {}
        self._lanes: dict[str, Lane] = {}

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

    def lane(self, endpoint: str) -> Lane:
        lane = self._lanes.get(endpoint)
        if lane is None:
            self._close_unused()
            lane = self._lanes[endpoint] = Lane(self._ctx, endpoint)
        return lane

    def _close_unused(self) -> None:
        used = {lease.endpoint for lease in self._leases.values()}
        unused = [e for e, lane in self._lanes.items() if e not in used or lane.gone]
        for endpoint in unused[:max(0, len(unused) - _IDLE_SOCKETS_KEPT + 1)]:
            self._close_lane(self._lanes.pop(endpoint))

    def _close_lane(self, lane: Lane) -> None:
        if self._on_close is not None:
            self._on_close(lane)
        lane.close()

    def close(self) -> None:
        for lane in self._lanes.values():
            self._close_lane(lane)
        self._lanes.clear()
        self._leases.clear()
