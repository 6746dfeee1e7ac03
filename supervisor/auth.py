"""Who a client is: CURVE on the client socket, each key checked by a ZAP handler against the
key store (keystore.py). docs/operations.md, section 7, has the threat model.

- With CURVE (tcp by default; ipc too with `server.curve = "on"`), the front socket is a CURVE
  server. During each handshake libzmq asks the ZAP handler about the client's public key;
  the handler accepts the keys the key store holds and answers with the key itself as the
  connection's User-Id, which libzmq attaches to every message of that connection. The loop
  reads it from each message's first frame and looks the key up: the tenant is the key's,
  and the `tenant` field of the request is ignored. A key removed while its connection is
  open is refused per request (UNAUTHENTICATED).
- Without CURVE, nobody is proven and the request's `tenant` field names the tenant, as it
  always did. On an ipc socket whose directory only the service's user can enter, every peer
  is that user: it is treated as an admin (`OWNER`). Anywhere else (plain tcp, allowed only by
  `server.allow_unauthenticated_tcp`, or ipc in a directory others may enter) a peer is
  `ANONYMOUS`: no admin view, no pids.

Pitfalls guarded here, each with a test (tests/test_auth.py):
- libzmq accepts any client key when no ZAP handler answers, even with a zap_domain set
  (libzmq#2711): ZAP_ENFORCE_DOMAIN makes it refuse instead.
- pyzmq's authenticator matches the domain exactly, and "*" does not cover a socket whose
  zap_domain is set: the handler is configured for ZAP_DOMAIN itself.
- An exception in a ZAP callback kills pyzmq's authenticator thread, after which every
  handshake waits forever: each ZAP message is handled inside a guard that refuses the
  client (status 500) and logs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import msgspec
import zmq
from zmq.auth.thread import ThreadAuthenticator

from wasmcore.protocol import messages as p
from wasmcore.protocol.errors import Unauthenticated, WasmCoreError
from wasmcore.supervisor.config import ServerConfig
from wasmcore.supervisor.keystore import CHECK_S, Identity, KeyStore

log = logging.getLogger("wasmcore.supervisor.auth")

ZAP_DOMAIN = "wasm-core"

# Peers of a socket without CURVE; an empty tenant means the request's field names it.
OWNER = Identity(tenant="", admin=True)
ANONYMOUS = Identity(tenant="", admin=False)

# Error details that name a process of the service: only admins see them.
_PRIVATE_DETAILS = ("pid",)


class AuthSetupError(RuntimeError):
    """The service cannot serve its endpoint as configured; the message says what to do."""


@dataclass(frozen=True, slots=True)
class Plan:
    """How the front socket authenticates: CURVE, or which peer everyone is without it."""

    curve: bool
    peer: Identity  # without CURVE
    warning: str = ""


def plan(server: ServerConfig, endpoint: str, private_ipc: bool) -> Plan:
    """Decide from the config and the endpoint; raise AuthSetupError when the operator must
    choose (tcp with CURVE off and no explicit permission)."""
    tcp = endpoint.startswith("tcp://")
    if server.curve == "on" or (server.curve == "auto" and tcp
                                and not server.allow_unauthenticated_tcp):
        return Plan(curve=True, peer=ANONYMOUS)
    if tcp:
        if not server.allow_unauthenticated_tcp:
            raise AuthSetupError(
                f"{endpoint} is tcp and server.curve is \"off\": set server.curve = \"auto\" "
                "and add tenant keys (`wasm-core tenant add NAME`), or, on a network you "
                "trust, set server.allow_unauthenticated_tcp = true")
        return Plan(curve=False, peer=ANONYMOUS, warning=(
            f"serving {endpoint} WITHOUT authentication (server.allow_unauthenticated_tcp = "
            "true): anyone who reaches it can act as any tenant"))
    if private_ipc:
        return Plan(curve=False, peer=OWNER)
    return Plan(curve=False, peer=ANONYMOUS, warning=(
        f"the directory of {endpoint} can be entered by other users and server.curve is not "
        "\"on\": peers are not authenticated, a request's tenant field is taken as it is"))


def redacted(error: WasmCoreError) -> WasmCoreError:
    """`error` without the details only admins see (worker pids)."""
    if not any(key in error.details for key in _PRIVATE_DETAILS):
        return error
    details = {k: v for k, v in error.details.items() if k not in _PRIVATE_DETAILS}
    return type(error)(error.message, details)


def secure_front(sock: zmq.Socket[Any], public_key: str, secret_key: str) -> None:
    """Make `sock` (before it binds) a CURVE server whose every handshake must be approved by
    the ZAP handler of ZAP_DOMAIN."""
    sock.curve_server = True
    sock.curve_secretkey = secret_key.encode("ascii")
    sock.curve_publickey = public_key.encode("ascii")
    sock.zap_domain = ZAP_DOMAIN.encode()
    # Without it, libzmq lets every client in when no ZAP handler answers (libzmq#2711).
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)


class _KeyCheck:
    """pyzmq's credentials provider: a client key is accepted if the key store holds it."""

    def __init__(self, keys: KeyStore) -> None:
        self._keys = keys

    def callback(self, domain: str, key: bytes) -> bool:
        self._keys.refresh()  # a key added a moment ago works at once
        identity = self._keys.identity(key.decode("ascii"))
        if identity is None:
            log.warning("refused a client key %s...: not in %s", key[:8].decode("ascii"),
                        self._keys.tenants_file)
            return False
        return True


class _GuardedAuthenticator(ThreadAuthenticator):
    """pyzmq's ZAP handler thread, which an exception anywhere in handling a request (the
    callback included) would kill: each request is handled under a guard that refuses the
    client instead, so the thread keeps answering."""

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        try:
            await super().handle_zap_message(msg)
        except Exception:
            log.exception("internal error checking a client's key; that client is refused")
            if len(msg) >= 2:
                try:
                    self._send_zap_reply(msg[1], b"500", b"Internal error")
                except zmq.ZMQError:
                    log.exception("cannot answer the ZAP request")


class FrontAuth:
    """CURVE on the client socket: the ZAP handler thread, the key store, and the lookup of
    each message's key on the loop."""

    def __init__(self, ctx: zmq.Context[Any], keys: KeyStore) -> None:
        self.keys = keys
        self._server = keys.server_keys()
        self._authenticator = _GuardedAuthenticator(
            ctx, log=logging.getLogger("wasmcore.supervisor.zap"))
        self._next_check = 0.0
        self.keys.refresh()

    @property
    def server_public_key(self) -> str:
        return self._server.public_key

    def start(self, sock: zmq.Socket[Any]) -> None:
        """Start the ZAP handler and make `sock` (before it binds) require it."""
        self._authenticator.start()
        self._authenticator.configure_curve_callback(domain=ZAP_DOMAIN,
                                                     credentials_provider=_KeyCheck(self.keys))
        secure_front(sock, self._server.public_key, self._server.secret_key)

    def identity(self, user_id: str) -> Identity | None:
        """The identity a message's User-Id (its connection's key) proves, or None if the key
        is no longer accepted. A miss looks at the key store once more before refusing."""
        identity = self.keys.identity(user_id)
        if identity is None and self.keys.refresh():
            identity = self.keys.identity(user_id)
        return identity

    def tick(self, now: float) -> None:
        """Notice removed keys while their connections stay open (one stat)."""
        if now >= self._next_check:
            self._next_check = now + CHECK_S
            self.keys.refresh()

    def close(self) -> None:
        self._authenticator.stop()


def revoked() -> Unauthenticated:
    """The answer to a request over a connection whose key was removed since it connected."""
    return Unauthenticated("this client's key is no longer accepted by the server (it was "
                           "removed or replaced); ask the operator for new credentials "
                           "(`wasm-core tenant add NAME --rotate`)")


def without_path(binary: p.BinaryInfo) -> p.BinaryInfo:
    """A binary as an ordinary tenant's stats show it: without its path."""
    return msgspec.structs.replace(binary, path=None) if binary.path else binary
