"""Authentication: tenants proven by CURVE keys, through the real server on tcp.

Three tenants with their own credentials (made as `wasm-core tenant add` makes them): `ops`
(admin), `alice` and `bob`. They cannot see or touch each other's binaries; a forged `tenant`
field changes nothing; an anonymous client, an unknown key and a removed key get nothing done
and are told why (UNAUTHENTICATED, not a timeout); admin sees everything, a tenant no pids or
paths. Then the pitfalls of CURVE with pyzmq, each on its own (auth.py lists them).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq
import zmq.auth.thread

from tests.conftest import HOSTILE, PLUGINS, raw_dealer, wait_for
from wasmcore.client import AsyncClient, Client
from wasmcore.client.handshake import HandshakeWatch
from wasmcore.client.launcher import RunningService, start_service
from wasmcore.protocol import errors
from wasmcore.protocol import messages as p
from wasmcore.protocol.credentials import (
    CREDENTIALS_ENV,
    Credentials,
    CredentialsError,
    apply_to_client,
    read_credentials,
)
from wasmcore.supervisor.auth import ZAP_DOMAIN, FrontAuth, secure_front
from wasmcore.supervisor.keystore import KeyStore

UPPER = PLUGINS / "uppercase.wat"
# A short grace: the supervisor's own TIMEOUT (a blocked host call) comes soon after the limit.
POOL = {"deadline_grace_ms": 300, "heartbeat_interval_ms": 100, "heartbeat_timeout_ms": 3000}


def _tcp_endpoint() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{sock.getsockname()[1]}"


def _tenant_cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`wasm-core tenant ...`, as an operator runs it while the server serves."""
    return subprocess.run(
        [sys.executable, "-m", "wasmcore.supervisor.cli_server", "tenant", *args,
         "--data-dir", str(data_dir)], capture_output=True, text=True, timeout=60)


def _add(data_dir: Path, name: str, *flags: str) -> str:
    done = _tenant_cli(data_dir, "add", name, *flags)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _stranger(credentials: str) -> Credentials:
    """Well-formed credentials for this server with a key it has never seen."""
    public, secret = zmq.curve_keypair()
    return msgspec.structs.replace(read_credentials(credentials), public_key=public.decode(),
                                   secret_key=secret.decode())


@contextlib.contextmanager
def curve_dealer(endpoint: str, credentials: str | Credentials) -> Iterator[zmq.Socket[bytes]]:
    """A bare DEALER with a tenant's keys, for frames the real client would never send."""
    creds = credentials if isinstance(credentials, Credentials) else read_credentials(credentials)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    apply_to_client(sock, creds)
    sock.connect(endpoint)
    try:
        yield sock
    finally:
        sock.close()


def _exchange(sock: zmq.Socket[bytes], request: Any, payload: bytes | None = None) -> Any:
    sock.send_multipart([p.encode(request)] + ([payload] if payload is not None else []))
    assert sock.poll(30_000), f"no reply to {request!r}"
    return p.reply_decoder.decode(sock.recv_multipart()[0])


class Curve:
    def __init__(self, service: RunningService, data: Path, creds: dict[str, str]) -> None:
        self.service = service
        self.endpoint = service.endpoint
        self.data = data
        self.creds = creds

    def client(self, who: str, **kwargs: Any) -> Client:
        return Client(self.endpoint, credentials=self.creds[who], **kwargs)


@pytest.fixture(scope="module")
def curve() -> Iterator[Curve]:
    workdir = Path(tempfile.mkdtemp(prefix="wc", dir="/tmp"))
    data = workdir / "data"
    creds = {name: _add(data, name, *flags)
             for name, flags in (("ops", ("--admin",)), ("alice", ()), ("bob", ()))}
    service = start_service(workers=1, workdir=workdir, endpoint=_tcp_endpoint(),
                            config={"pool": POOL}, credentials=creds["ops"])
    try:
        yield Curve(service, data, creds)
    finally:
        service.cleanup()


# --------------------------------------------------------------------------- tenants apart


def test_two_tenants_cannot_see_or_touch_each_others_binaries(curve: Curve) -> None:
    with curve.client("alice") as alice, curve.client("bob") as bob:
        mine = alice.load(UPPER).binary_id
        theirs = bob.load(UPPER).binary_id  # same file, bob's own binary
        assert mine != theirs
        assert [b.binary_id for b in alice.list()] == [mine]
        assert [b.binary_id for b in bob.list()] == [theirs]
        for attempt in (lambda: bob.execute(mine, "x"), lambda: bob.chain([theirs, mine], "x"),
                        lambda: bob.execute_batch(mine, ["x"]), lambda: bob.unload(mine)):
            with pytest.raises(errors.NotFound):
                attempt()
        assert [b.binary_id for b in bob.stats().binaries] == [theirs]
        assert alice.execute(mine, "still mine").output == b"STILL MINE"


def test_a_forged_tenant_field_changes_nothing(curve: Curve) -> None:
    with curve.client("alice") as alice:
        target = alice.load(UPPER, name="target").binary_id
    # The real client, told to be alice, with bob's key.
    with Client(curve.endpoint, tenant="alice", credentials=curve.creds["bob"]) as forger:
        assert target not in [b.binary_id for b in forger.list()]
        with pytest.raises(errors.NotFound):
            forger.execute(target, "x")
        with pytest.raises(errors.NotFound):
            forger.unload(target)
        planted = forger.load(data=(PLUGINS / "uppercase.wasm").read_bytes(), name="planted")
    # Raw frames, every request kind naming alice, over bob's connection.
    with curve_dealer(curve.endpoint, curve.creds["bob"]) as sock:
        for request in (p.Execute(id=1, tenant="alice", binary_id=target),
                        p.Unload(id=2, tenant="alice", binary_id=target),
                        p.Chain(id=3, tenant="alice", binary_ids=[target])):
            reply = _exchange(sock, request, b"x" if not isinstance(request, p.Unload) else None)
            assert isinstance(reply, p.ErrorReply) and reply.code == "NOT_FOUND", reply
        listed = _exchange(sock, p.ListBinaries(id=4, tenant="alice"))
        assert target not in [b.binary_id for b in listed.binaries]
        stats = _exchange(sock, p.Stats(id=5, tenant="alice"))
        assert [b.binary_id for b in stats.binaries] == [b.binary_id for b in listed.binaries]
    with curve.client("alice") as alice:
        assert target in [b.binary_id for b in alice.list()]
        assert planted.binary_id not in [b.binary_id for b in alice.list()]
        assert alice.execute(target, "ok").output == b"OK"
    with curve.client("ops") as ops:
        owner = {b.binary_id: b.tenant for b in ops.stats(all_tenants=True).binaries}
        assert owner[planted.binary_id] == "bob" and owner[target] == "alice"


# --------------------------------------------------------------------------- who is refused


def test_an_anonymous_client_gets_nothing_done_and_is_told_why(curve: Curve) -> None:
    with curve.client("alice") as alice:
        target = alice.load(UPPER, name="anon-target").binary_id
    # The real client, no key: told at once (a timeout would be UNAVAILABLE after 60 s).
    with Client(curve.endpoint, timeout_s=60) as anonymous:
        with pytest.raises(errors.Unauthenticated, match="requires a CURVE key"):
            anonymous.list()
        with pytest.raises(errors.Unauthenticated):
            anonymous.unload(target)

    async def async_anonymous() -> None:
        async with AsyncClient(curve.endpoint, timeout_s=60) as client:
            with pytest.raises(errors.Unauthenticated):
                await asyncio.gather(*(client.execute(target, "x") for _ in range(5)))

    asyncio.run(async_anonymous())
    # A bare socket speaking the protocol in the clear: nothing it sends is acted on.
    with raw_dealer(curve.endpoint) as sock:
        sock.send_multipart([p.encode(p.Unload(id=1, tenant="alice", binary_id=target))])
        sock.send_multipart([p.encode(p.Load(id=2, tenant="alice", name="anon")),
                             (PLUGINS / "uppercase.wasm").read_bytes()])
        assert not sock.poll(1000)
    with curve.client("ops") as ops:
        everything = ops.stats(all_tenants=True).binaries
    assert target in [b.binary_id for b in everything]
    assert "anon" not in [b.name for b in everything]


def test_an_unknown_key_is_refused_and_told_why(curve: Curve) -> None:
    stranger = _stranger(curve.creds["alice"])  # the right server key, an unknown own key
    with Client(curve.endpoint, timeout_s=60, credentials=stranger) as client:
        with pytest.raises(errors.Unauthenticated, match="refused this client's key"):
            client.list()
        with pytest.raises(errors.Unauthenticated):  # and again: not a timeout the 2nd time
            client.stats()

    async def async_stranger() -> None:
        async with AsyncClient(curve.endpoint, timeout_s=60, credentials=stranger) as client:
            with pytest.raises(errors.Unauthenticated, match="refused this client's key"):
                await client.list()

    asyncio.run(async_stranger())


def test_a_removed_key_stops_working_without_a_restart(curve: Curve) -> None:
    path = _add(curve.data, "carol")  # added while the server runs: works at once
    carol = read_credentials(path)  # what her client holds, after the file is gone too
    pid = curve.service.pid
    with Client(curve.endpoint, credentials=carol, timeout_s=60) as open_connection:
        mine = open_connection.load(UPPER).binary_id
        assert open_connection.execute(mine, "x").output == b"X"
        removed = _tenant_cli(curve.data, "remove", "carol")
        assert removed.returncode == 0, removed.stderr
        assert not Path(path).exists()  # its credentials file goes too

        def refused() -> bool:
            try:
                open_connection.execute(mine, "x")
            except errors.Unauthenticated:
                return True
            return False

        # The connection made before the removal: its next requests are refused.
        wait_for(refused, 10, "the open connection's requests refused")
        with pytest.raises(errors.Unauthenticated, match="no longer accepted"):
            open_connection.list()
    with Client(curve.endpoint, credentials=carol, timeout_s=60) as again:
        with pytest.raises(errors.Unauthenticated, match="refused this client's key"):
            again.list()
    assert curve.service.pid == pid and curve.service.process.poll() is None


def test_a_rotated_key_replaces_the_old_one(curve: Curve) -> None:
    old = _add(curve.data, "dave")
    old_creds = read_credentials(old)
    with Client(curve.endpoint, credentials=old) as client:
        mine = client.load(UPPER).binary_id
    new = _add(curve.data, "dave", "--rotate")
    assert new == old and read_credentials(new).public_key != old_creds.public_key
    with Client(curve.endpoint, credentials=old_creds, timeout_s=60) as stale:
        with pytest.raises(errors.Unauthenticated):
            stale.list()
    with Client(curve.endpoint, credentials=new) as client:  # same tenant: same binaries
        assert [b.binary_id for b in client.list()] == [mine]
    again = _tenant_cli(curve.data, "add", "dave")  # without --rotate: refused, unchanged
    assert again.returncode == 1 and "--rotate" in again.stderr
    assert read_credentials(new).public_key != old_creds.public_key


# --------------------------------------------------------------------------- what each sees


def test_admin_sees_all_tenants_a_tenant_no_pids_or_paths(curve: Curve) -> None:
    with curve.client("alice") as alice, curve.client("bob") as bob:
        a = alice.load(UPPER, name="seen-a").binary_id
        b = bob.load(UPPER, name="seen-b").binary_id
        assert alice.execute(a, "x").worker_pid == 0
        stats = alice.stats()
        assert stats.workers and all(w.pid == 0 for w in stats.workers)
        assert {x.tenant for x in stats.binaries} == {"alice"}
        assert all(x.path is None for x in stats.binaries)
        assert stats.requests == 0 and not stats.errors_by_code and not stats.restarts_by_cause
        with pytest.raises(errors.Forbidden):
            alice.stats(all_tenants=True)
        assert b not in [x.binary_id for x in stats.binaries]
    with curve.client("ops") as ops:
        everything = ops.stats(all_tenants=True)
        assert {a, b} <= {x.binary_id for x in everything.binaries}
        assert {"alice", "bob"} <= {x.tenant for x in everything.binaries}
        assert all(w.pid > 0 for w in everything.workers) and everything.requests > 0
        assert any(x.path for x in everything.binaries)
        assert [x.tenant for x in ops.stats().binaries] in ([], ["ops"] * len(ops.list()))
        own = ops.load(UPPER, name="ops-own").binary_id
        assert ops.execute(own, "x").worker_pid > 0


def test_a_tenant_is_not_told_worker_pids_in_errors(curve: Curve) -> None:
    """The supervisor's own TIMEOUT (a host call that blocks) names the killed worker's pid:
    for the admin, not for a tenant."""
    results = {}
    for who in ("alice", "ops"):
        with curve.client(who, timeout_s=60) as client:
            sleeper = client.load(HOSTILE / "sleep.wat").binary_id
            with pytest.raises(errors.Timeout) as caught:
                client.execute(sleeper, "", timeout_ms=200)
            results[who] = caught.value.details
        curve.service.wait_ready(1)
    assert "pid" not in results["alice"] and results["alice"]["timeout_ms"] == 200
    assert results["ops"]["pid"] > 0


# --------------------------------------------------------------------------- the operator's side


def test_tenant_cli_writes_private_keys_and_one_complete_credentials_file(tmp_path: Path):
    data = tmp_path / "data"
    path = Path(_add(data, "erin", "--admin", "--endpoint", "tcp://example:5555"))
    creds = read_credentials(path)
    assert creds.tenant == "erin" and creds.admin and creds.endpoint == "tcp://example:5555"
    server = json.loads((data / "keys" / "server.json").read_text())
    assert creds.server_public_key == server["public_key"]
    for each in [data / "keys", data / "keys" / "credentials"]:
        assert stat.S_IMODE(each.stat().st_mode) == 0o700
    for each in (data / "keys").rglob("*.json"):
        assert stat.S_IMODE(each.stat().st_mode) == 0o600, each
    listed = _tenant_cli(data, "list")
    assert "erin" in listed.stdout and "admin" in listed.stdout
    assert creds.secret_key not in (data / "keys" / "tenants.json").read_text()
    assert _tenant_cli(data, "remove", "erin").returncode == 0
    assert _tenant_cli(data, "remove", "erin").returncode == 1
    assert "no tenant keys" in _tenant_cli(data, "list").stdout
    bad = _tenant_cli(data, "add", "../evil")
    assert bad.returncode == 1 and "tenant name" in bad.stderr


def test_credentials_others_may_read_are_refused(tmp_path: Path):
    path = Path(_add(tmp_path / "data", "frank"))
    path.chmod(0o644)
    with pytest.raises(CredentialsError, match="chmod 600"):
        Client("tcp://127.0.0.1:1", credentials=str(path))


def test_wasm_client_with_credentials_flag_and_environment(curve: Curve) -> None:
    cli = [sys.executable, "-m", "wasmcore.client.cli", "--endpoint", curve.endpoint]
    env = {k: v for k, v in os.environ.items() if k != CREDENTIALS_ENV}
    loaded = subprocess.run([*cli, "--credentials", curve.creds["alice"], "load", "--path",
                             str(UPPER), "--name", "cli"], capture_output=True, text=True,
                            timeout=60, env=env)
    assert loaded.returncode == 0, loaded.stderr
    by_env = subprocess.run([*cli, "execute", "--binary-id", loaded.stdout.strip(), "--input",
                             "env"], capture_output=True, text=True, timeout=60,
                            env={**env, CREDENTIALS_ENV: curve.creds["alice"]})
    assert by_env.returncode == 0 and by_env.stdout == "ENV", by_env.stderr
    anonymous = subprocess.run([*cli, "--timeout", "60", "list"], capture_output=True,
                               text=True, timeout=90, env=env)
    assert anonymous.returncode == 1 and anonymous.stderr.startswith("UNAUTHENTICATED"), (
        anonymous.stderr)


def test_tcp_without_keys_or_permission_does_not_start(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    for server in ({}, {"curve": "off"}):
        with open(log, "wb") as sink:
            with pytest.raises(RuntimeError, match="exited with 2"):
                start_service(workers=1, endpoint=_tcp_endpoint(), config={"server": server},
                              stderr=sink)
        said = log.read_text()
        assert "allow_unauthenticated_tcp" in said, said
    with open(log, "wb") as sink:
        plain = start_service(workers=1, endpoint=_tcp_endpoint(), stderr=sink,
                              config={"server": {"allow_unauthenticated_tcp": True}})
    try:
        with plain.client() as client:  # an explicit choice: anyone, as any tenant, no admin
            assert all(w.pid == 0 for w in client.stats().workers)
    finally:
        plain.cleanup()
    assert "WITHOUT authentication" in log.read_text()


def test_curve_on_an_ipc_endpoint(tmp_path: Path) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="wc", dir="/tmp"))
    try:
        admin = _add(workdir / "data", "ops", "--admin")
        svc = start_service(workers=1, workdir=workdir, credentials=admin,
                            config={"server": {"curve": "on"}})
        try:
            with svc.client() as ops:
                assert ops.stats().workers[0].pid > 0
            with Client(svc.endpoint, timeout_s=60) as anonymous:
                with pytest.raises(errors.Unauthenticated):
                    anonymous.list()
        finally:
            svc.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(Path("/dev/shm") / workdir.name, ignore_errors=True)


def test_the_service_user_on_a_private_ipc_socket_is_admin(service: RunningService) -> None:
    with service.client(tenant="ipc-owner") as client:
        assert all(w.pid > 0 for w in client.stats().workers)
        client.stats(all_tenants=True)


# --------------------------------------------------------------------------- the pitfalls


def _handshake(ctx: zmq.Context[Any], endpoint: str, server_key: bytes,
               client_public: bytes | None = None, client_secret: bytes | None = None) -> Any:
    """Connect a CURVE client and wait (bounded) for its handshake: "ok", or the failure
    (event, value)."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if client_public is None:
        client_public, client_secret = zmq.curve_keypair()
    sock.curve_publickey, sock.curve_secretkey = client_public, client_secret
    sock.curve_serverkey = server_key
    watch = HandshakeWatch(sock, endpoint, curve=True)
    sock.connect(endpoint)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if watch.socket.poll(100):
                watch.update()
                return "ok" if watch.failed is None else watch.failed
        raise AssertionError("no handshake within 10 s")
    finally:
        watch.close()
        sock.close()


@contextlib.contextmanager
def _curve_router(ctx: zmq.Context[Any], enforce: bool = True) -> Iterator[tuple[str, bytes]]:
    public, secret = zmq.curve_keypair()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    secure_front(sock, public.decode(), secret.decode())
    if not enforce:
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    try:
        yield f"tcp://127.0.0.1:{port}", public
    finally:
        sock.close()


def test_pitfall_no_zap_handler_answering_refuses_instead_of_accepting_anyone() -> None:
    """libzmq#2711: with a zap_domain set but no ZAP handler, any key gets in, unless
    ZAP_ENFORCE_DOMAIN (which secure_front sets)."""
    ctx = zmq.Context()
    try:
        with _curve_router(ctx) as (endpoint, key):
            assert _handshake(ctx, endpoint, key) != "ok"
        with _curve_router(ctx, enforce=False) as (endpoint, key):
            assert _handshake(ctx, endpoint, key) == "ok"  # the hole it closes
    finally:
        ctx.term()


def test_pitfall_domain_star_does_not_match_our_zap_domain(tmp_path: Path) -> None:
    """pyzmq's authenticator configured for "*" refuses a socket whose zap_domain is set;
    FrontAuth configures the domain itself, and a known key gets in."""
    keys = KeyStore(tmp_path)
    creds, _ = keys.add("grace")
    public, secret = creds.public_key.encode(), creds.secret_key.encode()
    # A context of its own: a closed ZAP socket frees its inproc name only later.
    star_ctx = zmq.Context()
    star = zmq.auth.thread.ThreadAuthenticator(star_ctx)
    star.start()
    star.configure_curve_callback(domain="*", credentials_provider=_AcceptAll())
    try:
        with _curve_router(star_ctx) as (endpoint, key):
            assert _handshake(star_ctx, endpoint, key, public, secret) == (
                zmq.EVENT_HANDSHAKE_FAILED_AUTH, 400)
    finally:
        star.stop()
        star_ctx.term()
    ctx = zmq.Context()
    auth = FrontAuth(ctx, keys)
    front = ctx.socket(zmq.ROUTER)
    front.setsockopt(zmq.LINGER, 0)
    try:
        auth.start(front)
        assert front.zap_domain == ZAP_DOMAIN.encode()
        port = front.bind_to_random_port("tcp://127.0.0.1")
        server = auth.server_public_key.encode()
        assert _handshake(ctx, f"tcp://127.0.0.1:{port}", server, public, secret) == "ok"
        assert _handshake(ctx, f"tcp://127.0.0.1:{port}", server) == (
            zmq.EVENT_HANDSHAKE_FAILED_AUTH, 400)
    finally:
        front.close()
        auth.close()
        ctx.term()


class _AcceptAll:
    def callback(self, domain: str, key: bytes) -> bool:
        return True


def test_pitfall_an_exception_in_the_zap_callback_does_not_kill_the_authenticator(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = KeyStore(tmp_path)
    creds, _ = keys.add("heidi")
    ctx = zmq.Context()
    auth = FrontAuth(ctx, keys)
    front = ctx.socket(zmq.ROUTER)
    front.setsockopt(zmq.LINGER, 0)
    failures = iter([RuntimeError("the key store broke"), None, None])

    def flaky_refresh() -> bool:
        error = next(failures, None)
        if error is not None:
            raise error
        return False

    monkeypatch.setattr(keys, "refresh", flaky_refresh)
    try:
        auth.start(front)
        endpoint = f"tcp://127.0.0.1:{front.bind_to_random_port('tcp://127.0.0.1')}"
        server = auth.server_public_key.encode()
        public, secret = creds.public_key.encode(), creds.secret_key.encode()
        # The callback raises: that client is refused (500), the handler lives on.
        assert _handshake(ctx, endpoint, server, public, secret) == (
            zmq.EVENT_HANDSHAKE_FAILED_AUTH, 500)
        assert _handshake(ctx, endpoint, server, public, secret) == "ok"
        assert _handshake(ctx, endpoint, server) == (zmq.EVENT_HANDSHAKE_FAILED_AUTH, 400)
    finally:
        front.close()
        auth.close()
        ctx.term()


def test_a_broken_tenants_file_fails_closed(tmp_path: Path) -> None:
    keys = KeyStore(tmp_path)
    creds, _ = keys.add("ivan")
    assert keys.identity(creds.public_key) is not None
    keys.tenants_file.write_text("{not json")
    keys.refresh()
    assert keys.identity(creds.public_key) is None
    keys.tenants_file.unlink()
    keys.add("ivan2")
    keys.tenants_file.chmod(0o644)
    keys.refresh()
    assert keys.count == 0  # readable by others: refused, not trusted
    keys.tenants_file.chmod(0o600)  # a chmod alone is noticed
    keys.refresh()
    assert keys.count == 1
