"""Telling a refused client why, at once, instead of letting it wait for its timeout.

When a server refuses a client's handshake (an unknown or removed CURVE key, no key where one
is required, a key where none is used, the wrong server key), ZeroMQ reports nothing on the
socket: sends just queue and no reply ever comes. Only the socket's monitor sees it, as a
HANDSHAKE_FAILED_* event. `HandshakeWatch` reads those events; the clients wait on its socket
beside their own and turn the last failure into `Unauthenticated`. A later successful
handshake (the key was added meanwhile, and ZeroMQ reconnected) clears it.
"""

from __future__ import annotations

from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from wasmcore.protocol.errors import Unauthenticated
from wasmcore.protocol.zmqopts import NOBLOCK

_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
           | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
_MECHANISM_MISMATCH = int(zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH)
_CREDENTIALS_HINT = ("pass the credentials file its operator made (`wasm-core tenant add`): "
                     "--credentials FILE, $WASM_CORE_CREDENTIALS, or Client(credentials=...)")


class HandshakeWatch:
    """The handshake events of one client socket (attach before it connects)."""

    def __init__(self, sock: zmq.Socket[Any], endpoint: str, curve: bool) -> None:
        self.socket: zmq.Socket[Any] = sock.get_monitor_socket(_EVENTS)
        self._watched = sock
        self._endpoint = endpoint
        self._curve = curve
        self.failed: tuple[int, int] | None = None  # (event, value) of the last failure

    def update(self) -> Unauthenticated | None:
        """Read every event so far; the error if the last handshake was refused."""
        while True:
            try:
                message = recv_monitor_message(self.socket, NOBLOCK)
            except zmq.Again:
                return self.refusal()
            event = int(message["event"])
            self.failed = (None if event == zmq.EVENT_HANDSHAKE_SUCCEEDED
                           else (event, int(message["value"])))

    def refusal(self) -> Unauthenticated | None:
        """A fresh error for the last refused handshake, or None."""
        if self.failed is None:
            return None
        event, value = self.failed
        where = self._endpoint
        details = {"endpoint": where, "event": _event_name(event), "value": value}
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            if value == 500:
                return Unauthenticated(f"the server at {where} could not check this client's "
                                       "key (ZAP status 500); retry, and if it persists tell "
                                       "its operator (the server's log says why)", details)
            return Unauthenticated(f"the server at {where} refused this client's key (ZAP "
                                   f"status {value}): it is unknown there or was removed; ask "
                                   "its operator for credentials (`wasm-core tenant add`)",
                                   details)
        if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == _MECHANISM_MISMATCH:
            if self._curve:
                return Unauthenticated(f"the server at {where} does not use CURVE keys on "
                                       "this endpoint: connect without credentials", details)
            return Unauthenticated(f"the server at {where} requires a CURVE key: "
                                   + _CREDENTIALS_HINT, details)
        if self._curve:
            return Unauthenticated(f"the handshake with {where} failed ({_event_name(event)}): "
                                   "check that the credentials are for this server (their "
                                   "server_public_key must be its key)", details)
        return Unauthenticated(f"the server at {where} refused the handshake "
                               f"({_event_name(event)}); it most likely requires a CURVE key: "
                               + _CREDENTIALS_HINT, details)

    def close(self) -> None:
        try:
            self._watched.disable_monitor()
        except zmq.ZMQError:
            pass
        self.socket.close()


def _event_name(event: int) -> str:
    try:
        return zmq.Event(event).name or str(event)
    except ValueError:
        return str(event)
