"""The supervisor: one thread, one poll loop (the ZeroMQ guide's broker shape, gunicorn's
arbiter), and the components it calls.

Sockets: a ROUTER for clients (front), a ROUTER for workers (back), a PUB for reload
broadcasts, an inproc PAIR from the file watcher. The loop also polls a signal wakeup fd
(handlers only queue) and each worker's pidfd (readable the moment the process exits). Each
turn it decodes what arrived, calls the components, and sends what they decided:

- `Requests` turns client requests into jobs (requests.py), `Binaries` loads, compiles,
  commits and broadcasts module versions (binaries.py);
- `Scheduler` decides which worker runs which job and ends late or lost jobs (scheduler.py);
- `WorkerPool` owns the processes: spawn, heartbeats, RSS watchdog, reap (worker_pool.py);
- `CompileLane` compiles on worker processes of its own, with a pool and a scheduler of its
  own, so executions never wait behind a compile (compile_lane.py).

Shutdown is a state of this loop (`Draining`), not a separate object: new requests are
refused, in-flight ones finish within the grace period, then the workers stop.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import itertools
import logging
import os
import signal
import socket
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import zmq

from wasmcore.protocol import __version__, shm
from wasmcore.protocol import messages as p
from wasmcore.protocol.engine import engine_fingerprint
from wasmcore.protocol.errors import (
    BadRequest,
    Forbidden,
    InternalError,
    PayloadTooLarge,
    ShuttingDown,
    Timeout,
    WasmCoreError,
    WorkerLost,
)
from wasmcore.protocol.limits import MiB
from wasmcore.protocol.zmqopts import COPY_THRESHOLD, NOBLOCK
from wasmcore.supervisor.auth import (
    ANONYMOUS,
    AuthSetupError,
    FrontAuth,
    Identity,
    plan,
    redacted,
    revoked,
    without_path,
)
from wasmcore.supervisor.binaries import Binaries
from wasmcore.supervisor.compile_lane import CompileLane
from wasmcore.supervisor.config import Config, parse_config, resolved
from wasmcore.supervisor.confinement import Confinement
from wasmcore.supervisor.host_methods import kv_dir, method_table
from wasmcore.supervisor.jobs import PendingJob
from wasmcore.supervisor.keystore import KeyStore
from wasmcore.supervisor.leases import Lease, Leases
from wasmcore.supervisor.module_files import PathPolicy
from wasmcore.supervisor.offloop import OffLoop
from wasmcore.supervisor.packing import client_messages, worker_messages
from wasmcore.supervisor.rate_limit import RateLimits
from wasmcore.supervisor.registry import Registry
from wasmcore.supervisor.requests import Requests, offered_limits
from wasmcore.supervisor.scheduler import LaneState, Scheduler
from wasmcore.supervisor.scratch import ScratchSweep, prepare_scratch_root
from wasmcore.supervisor.watcher import FileWatcher
from wasmcore.supervisor.worker_info import describe_workers
from wasmcore.supervisor.worker_pool import EXIT_POOL_FAILED, WorkerPool
from wasmcore.supervisor.worker_process import RestartCause, WorkerHandle, WorkerState

log = logging.getLogger("wasmcore.supervisor")

EXIT_FORCED = 130
_DRAIN_BATCH = 256  # messages per socket per turn, so neither side starves the other
# An oversized header's `type` and `id` are peeked at (other values skipped, never built) up
# to this size; skipping costs up to ~4 ns a byte, so larger ones are not read at all.
_PEEK_MAX_BYTES = 4 * MiB
_MAX_PACKERS = 65_536
# Requests that carry nothing but their header: a payload frame with one is refused.
_NO_PAYLOAD = (p.ListBinaries, p.Unload, p.Stats, p.Hello)
_WATCH_ADDRESS = "inproc://wasm-core-watch"
# Timers (deadlines, heartbeats, watchdog, respawns) are checked at most this often.
_TICK_S = 0.002
# Payload segments of processes that exited are removed this often.
_SWEEP_S = 1.0
# Replaced module versions are checked for deletion this often while any wait.
_COLLECT_S = 0.1
# Settings that only take effect on restart: a reloaded config keeps the running values.
_RESTART_ONLY = ("endpoint", "data_dir", "artifact_dir", "shm_dir", "curve",
                 "allow_unauthenticated_tcp")

__all__ = ["EXIT_FORCED", "EXIT_POOL_FAILED", "AuthSetupError", "EndpointInUse", "Supervisor",
           "internal_endpoints"]


class EndpointInUse(RuntimeError):
    pass


def internal_endpoints(front: str, fallback_dir: Path) -> tuple[str, str]:
    """Worker-facing endpoints: beside an ipc front endpoint, else in the runtime dir."""
    if front.startswith("ipc://"):
        base = front[len("ipc://") :]
    else:
        fallback_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        base = str(fallback_dir / f"s{os.getpid()}")
    return f"ipc://{base}.back", f"ipc://{base}.pub"


@dataclass(slots=True)
class Draining:
    """The service is shutting down: in-flight work may finish until `deadline`."""

    deadline: float


class Supervisor:
    def __init__(self, config: Config, runtime_dir: Path, config_path: str | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.endpoint = config.server.endpoint
        self.back_endpoint, self.pub_endpoint = internal_endpoints(self.endpoint, runtime_dir)
        artifact_dir = Path(config.server.artifact_dir)
        artifact_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.scratch_dir = prepare_scratch_root(config)
        self.shm_dir: str | None = None
        if config.server.shm_dir != "off":
            Path(config.server.shm_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
            self.shm_dir = config.server.shm_dir
            shm.sweep(self.shm_dir)
        Path(config.server.data_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
        kv_dir(config).mkdir(exist_ok=True, mode=0o700)  # the tenants' key-value state
        # What workers may call with host.call; sent to each worker when it is ready and again
        # when a reload changes it (`_send_methods`).
        self._methods = method_table(config)
        self.fingerprint = engine_fingerprint()
        self.draining: Draining | None = None
        self.exit_code: int | None = None
        self.config_error: str | None = None
        self._config_text = Path(config_path).read_bytes() if config_path else b""
        self.requests = 0
        self.unit_executes = 0  # executes answered from units (stats)
        self.direct_executes = 0  # executes workers ran on direct lanes (stats)
        self.leases = Leases()
        self.errors_by_code: collections.Counter[str] = collections.Counter()
        self.started = time.time()
        self._lock_fd = -1
        self._front_out: list[list[Any]] = []
        # Units' replies for connections that pack, spliced into their reply pack as they come.
        self._front_packs: dict[bytes, p.ReplyPack] = {}
        self._back_out: list[tuple[str, PendingJob]] = []
        # Connections that sent an ExecutePack: their replies may leave packed.
        self._packers: set[bytes] = set()
        self._next_tick = 0.0
        self._next_sweep = 0.0
        self._next_scratch_sweep = 0.0
        self._turn_end = time.monotonic()  # when the loop last finished a turn
        self._next_collect = 0.0
        # Tokens of the jobs submitted and not ended yet, oldest first: a replaced module
        # version is deleted once no job older than the change is left.
        self._outstanding: dict[int, None] = {}
        # Every peer of the endpoint is this service's user (decided at bind).
        self._private_endpoint = False
        # CURVE on the front socket (decided at bind); without it, who every peer is.
        self.auth: FrontAuth | None = None
        self._peer = ANONYMOUS
        self.offloop = OffLoop()
        self.scratch_sweep = ScratchSweep(self.scratch_dir, self.offloop.run)

        self.ctx = zmq.Context()
        self.poller = zmq.Poller()
        self.front = self.ctx.socket(zmq.ROUTER)
        self.back = self.ctx.socket(zmq.ROUTER)
        self.pub = self.ctx.socket(zmq.PUB)
        self._signal_r, self._signal_w = socket.socketpair()
        self.watch_events = self.ctx.socket(zmq.PAIR)
        self.watch_events.bind(_WATCH_ADDRESS)
        self.watcher = FileWatcher(self.ctx, _WATCH_ADDRESS)

        pool = config.pool
        self.scheduler = Scheduler(config.server.max_queue, pool.prefetch,
                                   pool.deadline_grace_ms / 1000,
                                   config.server.max_queued_bytes, config.tenant)
        self.confinement = Confinement.from_config(config)
        self.pool = WorkerPool(config, self.back_endpoint, self.pub_endpoint, self.shm_dir,
                               self.poller, self._tell, confinement=self.confinement,
                               direct_socket_prefix=self._direct_prefix(config))
        self.compile_lane = CompileLane(config, self.back_endpoint, self.pub_endpoint,
                                        self.poller, self._tell, confinement=self.confinement)
        tokens = itertools.count(1)
        self.binaries = Binaries(
            Registry(Path(config.server.data_dir), self.confinement.blob_group), artifact_dir,
            self.fingerprint,
            config.server.max_payload_bytes, submit=self.compile_lane.submit,
            publish=lambda message: self.pub.send(message, NOBLOCK),
            next_token=tokens.__next__, watch=self._watch_files,
            offload=self.offloop.run, oldest_job=lambda: next(iter(self._outstanding), None),
            quotas=lambda tenant: self.config.tenant(tenant),
            changed=lambda binary_id: self._revoke(self.leases.to_revoke(binary_id=binary_id)))
        for problem in self.binaries.problems():
            log.error("registry: %s", problem)
        self.binaries.sweep()
        # Tenants' request rates; read from the running config, so a reload applies at once.
        self.rates = RateLimits(lambda tenant: self.config.tenant(tenant))
        self.requests_handler = Requests(
            config, self.binaries, self.shm_dir,
            submit=lambda job: self._submit(job, True), next_token=tokens.__next__,
            reply=self._reply, reply_error=self._reply_error, offer_lease=self._offer_lease)

    def _direct_prefix(self, config: Config) -> str:
        """Where workers bind their direct lanes: beside an ipc front endpoint that has no
        CURVE (clients of the same host that may reach the front socket's directory), with
        `pool.direct_lane` on; else "": none. A lease's token is its only credential, so a
        server whose tenants prove themselves with keys keeps everyone on the front socket."""
        if (not config.pool.direct_lane or not self.endpoint.startswith("ipc://")
                or plan(config.server, self.endpoint, private_ipc=True).curve):
            return ""
        return f"{self.endpoint[len('ipc://'):]}.d"

    # ------------------------------------------------------------------ setup

    def bind(self) -> None:
        if self.endpoint.startswith("ipc://"):
            path = Path(self.endpoint[len("ipc://") :])
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._lock_endpoint(path)
        self._secure_front()  # before the bind: a listener keeps the options it was bound with
        for sock in (self.front, self.back):
            sock.copy_threshold = COPY_THRESHOLD
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            sock.setsockopt(zmq.LINGER, 1000)
            sock.setsockopt(zmq.SNDHWM, 100_000)
            sock.setsockopt(zmq.RCVHWM, 100_000)
        # Past twice the payload cap a peer is disconnected rather than buffered whole;
        # below that it gets a PAYLOAD_TOO_LARGE reply.
        self.front.setsockopt(zmq.MAXMSGSIZE, 2 * self.config.server.max_payload_bytes + MiB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.front.bind(self.endpoint)
        if self.endpoint.startswith("ipc://"):
            self._private_endpoint = _only_owner_connects(Path(self.endpoint[len("ipc://"):]))
        self._decide_peer()
        self.binaries.set_paths(self._path_policy(self.config))
        log.info("loads by path: the server reads and watches %s",
                 self.binaries.paths.describe())
        self.back.bind(self.back_endpoint)
        self.pub.bind(self.pub_endpoint)
        self.poller.register(self.front, zmq.POLLIN)
        self.poller.register(self.back, zmq.POLLIN)
        self.poller.register(self._signal_r.fileno(), zmq.POLLIN)
        self.poller.register(self.watch_events, zmq.POLLIN)
        self.poller.register(self.offloop.fileno(), zmq.POLLIN)

    def _secure_front(self) -> None:
        """CURVE with the tenants' keys, when the config and the endpoint call for it
        (auth.py). Whether it does never depends on who may connect to an ipc socket."""
        if not plan(self.config.server, self.endpoint, private_ipc=True).curve:
            return
        keys = KeyStore(self.config.server.data_dir)
        auth = FrontAuth(self.ctx, keys)
        if not keys.count:
            raise AuthSetupError(
                f"{self.endpoint} needs CURVE keys (server.curve = "
                f"\"{self.config.server.curve}\") and {keys.tenants_file} accepts none: add a "
                "tenant with `wasm-core tenant add NAME` (its client uses the credentials file "
                "that prints), or, on a network you trust, set "
                "server.allow_unauthenticated_tcp = true")
        auth.start(self.front)
        self.auth = auth
        log.info("CURVE on %s: %d tenant keys accepted; server public key %s", self.endpoint,
                 keys.count, auth.server_public_key)

    def _decide_peer(self) -> None:
        """Who every peer is, once the socket exists (an ipc socket only other users cannot
        connect to makes every peer the service's own user)."""
        decided = plan(self.config.server, self.endpoint, self._private_endpoint)
        self._peer = decided.peer
        if decided.warning:
            log.warning("%s", decided.warning)

    def _lock_endpoint(self, path: Path) -> None:
        """ZeroMQ's ipc bind silently steals a live server's socket file; refuse instead."""
        lock_path = path.with_name(path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise EndpointInUse(
                f"another wasm-core (pid {holder or '?'}) is serving on ipc://{path}; "
                "stop it or pass --endpoint"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    def install_signals(self) -> None:
        self._signal_r.setblocking(False)
        self._signal_w.setblocking(False)
        signal.set_wakeup_fd(self._signal_w.fileno(), warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP):
            signal.signal(signum, _queue_only)

    # ------------------------------------------------------------------ loop

    def serve(self) -> int:
        self.bind()
        self.confinement.grant(sockets=[self.back_endpoint, self.pub_endpoint],
                               data_dir=self.config.server.data_dir,
                               artifact_dir=self.config.server.artifact_dir, shm_dir=self.shm_dir,
                               state_dir=str(kv_dir(self.config)),
                               scratch_dir=self.scratch_dir)
        self.install_signals()
        self.pool.start(time.monotonic())
        self.compile_lane.start(time.monotonic())
        self._watch_files(self.binaries.watched_paths())
        log.info("wasm-core serving on %s with %d workers, %d binaries",
                 self.endpoint, self.pool.size, len(self.binaries.registry))
        self._turn_end = time.monotonic()
        try:
            while self.exit_code is None:
                timeout_ms = self._poll_timeout_ms()
                events = self.poller.poll(timeout_ms)
                for target, _ in events:
                    if target is self.front:
                        self._drain_front()
                    elif target is self.back:
                        self._drain_back()
                    elif target == self._signal_r.fileno():
                        self._handle_signals()
                    elif target is self.watch_events:
                        self._drain_watch_events()
                    elif target == self.offloop.fileno():
                        self.offloop.drain()
                    else:
                        handle = self.pool.by_pidfd(target)
                        if handle is not None:
                            self._worker_exited(handle)
                        elif (handle := self.compile_lane.by_pidfd(target)) is not None:
                            self._compile_worker_exited(handle)
                now = time.monotonic()
                self._excuse_stall(now, timeout_ms / 1000)
                if now >= self._next_tick or self.draining:
                    self._next_tick = now + _TICK_S
                    self._tick(now)
                self._flush()
        finally:
            self.close()
        return self.exit_code

    def _poll_timeout_ms(self) -> int:
        # Deadlines need ~10 ms resolution while anything runs; idle, heartbeats and the
        # watchdog are fine at 100 ms and the process stays quiet.
        busy = (self.pool.starting or self.draining or self.scheduler.in_flight
                or self.compile_lane.active)
        return 10 if busy else 100

    def _excuse_stall(self, now: float, poll_timeout_s: float) -> None:
        """The loop's own stalls are never a worker's fault. The time since the last turn,
        less what poll was allowed to wait, is time the loop was not running (a huge message
        received, a slow step, the process stopped); when it is a sizeable part of the
        heartbeat timeout, it counts against no worker."""
        stall = now - self._turn_end - poll_timeout_s
        self._turn_end = now
        if stall > self.config.pool.heartbeat_timeout_ms / 4000:
            log.warning("the supervisor's loop was stalled for %.1fs; not counted against "
                        "any worker's heartbeats", stall)
            self.pool.excuse(stall, now)

    def _tick(self, now: float) -> None:
        # What workers sent while this turn ran (heartbeats, replies) is read before anyone
        # is judged: a busy loop must not see a healthy worker as silent.
        self._drain_back()
        self._expire_deadlines(now)
        if self.leases.active:
            self._check_leases(now)
        if self.auth is not None:
            self.auth.tick(now)
        ticked = self.pool.tick(now)
        for handle in ticked.killed:
            self.scheduler.stop_worker(handle.worker_id)
        for handle in ticked.to_reap:
            self._worker_exited(handle)
        for handle in ticked.to_recycle:
            self._retire(handle, RestartCause.MEMORY, now)
        if self.binaries.has_superseded and now >= self._next_collect:
            self._next_collect = now + _COLLECT_S
            self.binaries.collect()
        for handle in self.compile_lane.tick(now):
            self._compile_worker_exited(handle)
        if self.shm_dir and now >= self._next_sweep:
            self._next_sweep = now + _SWEEP_S
            removed = shm.sweep(self.shm_dir)
            if removed:
                log.info("removed %d payload segments of exited processes", removed)
        if now >= self._next_scratch_sweep:
            self._next_scratch_sweep = now + _SWEEP_S
            self.scratch_sweep.sweep()  # dead workers' WASI scratch directories
        self._check_pool(now)
        if self.draining is not None and self.exit_code is None:
            self._drain_step(now)

    # ------------------------------------------------------------------ clients

    def _drain_front(self) -> None:
        if self.auth is not None:
            self._drain_front_authenticated(self.auth)
            return
        recv = self.front.recv_multipart
        peer = self._peer
        for _ in range(_DRAIN_BATCH):
            # A dry recv's Again costs ~2.7 us once per drain; asking ZMQ_EVENTS before every
            # message costs ~1.7 us each (it makes libzmq check its command mailbox with a
            # syscall every time), so under load trying is cheaper than asking.
            try:
                # Copied: for small requests bytes are cheaper than Frame objects; a large
                # payload is copied once here and forwarded without another copy.
                frames = recv(NOBLOCK)
            except zmq.Again:
                return
            self._on_client_message(frames, peer)

    def _drain_front_authenticated(self, auth: FrontAuth) -> None:
        """As `_drain_front`, each message with the identity its connection's key proves.
        The key (User-Id) rides on every frame: only the first is received as a Frame
        (recv(copy=False)) to read it, the rest as bytes; measured no slower than receiving
        the message as bytes (docs/performance.md)."""
        recv, recv_rest = self.front.recv, self.front.recv_multipart
        for _ in range(_DRAIN_BATCH):
            try:
                first = recv(NOBLOCK, copy=False)
            except zmq.Again:
                return
            frames = recv_rest(NOBLOCK) if first.more else []
            frames.insert(0, first.bytes)
            try:
                peer = auth.identity(first.get("User-Id"))
            except zmq.ZMQError:  # no User-Id: cannot happen with ZAP enforced; refuse
                peer = None
            self._on_client_message(frames, peer)

    def _on_client_message(self, frames: list[bytes], peer: Identity | None) -> None:
        """One client message; `peer` is who sent it (None: a key no longer accepted)."""
        # Envelope: the identity, plus an empty delimiter when the peer is a REQ socket.
        split = 1
        if len(frames) > 2 and frames[1] == b"":
            split = 2
        envelope = frames[:split]
        body = frames[split:]
        self.requests += 1
        if not body:
            self._reply_error(envelope, 0, BadRequest("empty message: expected a header frame"))
            return
        header = body[0]
        refusal = self._refuse_unread(header, len(body))
        if refusal is not None:
            self._reply_error(envelope, *refusal)
            return
        try:
            request = p.request_decoder.decode(header)
        except msgspec.DecodeError as exc:
            pack = _undecoded_pack(header)
            if pack is not None:  # each execute in it is answered on its own
                self._on_pack(envelope, pack, body, peer)
                return
            self._reply_error(envelope, p.peek_request_id(header), _malformed(exc))
            return
        if type(request) is p.ExecutePack:
            self._on_pack(envelope, request, body, peer)
            return
        self._on_request(envelope, request, body[1:], peer)

    def _refuse_unread(self, header: bytes, frames: int) -> tuple[int, WasmCoreError] | None:
        """A request refused for its size alone, before its header is decoded: a header frame
        over server.max_header_bytes (an xpack frame may be larger by what its payloads
        take), or more frames than any request has. Decoding a huge header would stall the
        loop for everyone; the answer would only be an error anyway."""
        size = len(header)
        limit = self.config.server.max_header_bytes
        if size > limit:
            # Only `type` and `id` are read (the rest skipped), and only from a frame small
            # enough that even skipping costs nothing.
            kind, request_id = p.peek_header(header) if size <= _PEEK_MAX_BYTES else ("", 0)
            pack_limit = limit + p.EXECUTE_PACK_MAX_BYTES + p.PACKED_PAYLOAD_MAX_BYTES
            if kind != "xpack":
                return request_id, PayloadTooLarge(
                    f"request header is {size} bytes; this server reads at most {limit} "
                    "(server.max_header_bytes): send data in payload frames, or less of it",
                    {"size": size, "limit": limit})
            if size > pack_limit:
                return request_id, PayloadTooLarge(
                    f"xpack frame is {size} bytes; this server reads at most {pack_limit} "
                    f"(server.max_header_bytes + {pack_limit - limit} for packed payloads): "
                    "send fewer executes per pack", {"size": size, "limit": pack_limit})
        if frames > p.MAX_BATCH_INPUTS + 1:
            request_id = p.peek_request_id(header) if size <= _PEEK_MAX_BYTES else 0
            return request_id, BadRequest(
                f"{frames} frames; a request has at most {p.MAX_BATCH_INPUTS + 1} (a header "
                f"and up to {p.MAX_BATCH_INPUTS} execute_batch inputs)",
                {"frames": frames, "limit": p.MAX_BATCH_INPUTS + 1})
        return None

    def _on_pack(self, envelope: list[bytes], pack: p.ExecutePack | p.UndecodedPack,
                 body: list[bytes], peer: Identity | None) -> None:
        if len(body) != 1 or len(pack.executes) != len(pack.payloads) or not pack.executes:
            self._reply_error(envelope, 0, BadRequest(
                f"an execute pack is one frame with as many payloads as executes (at least "
                f"one); got {len(body)} frames, {len(pack.executes)} executes, "
                f"{len(pack.payloads)} payloads"))
            return
        if len(envelope) == 1:
            if len(self._packers) >= _MAX_PACKERS:  # forget departed connections
                self._packers.clear()
            self._packers.add(envelope[0])
        self.requests += len(pack.executes) - 1
        most = self.config.pool.unit_executions
        payload_limit = self.config.server.max_payload_bytes
        tenant = peer.tenant if peer is not None else ""
        # Executes that may run together as units (same tenant, binary, entry and limits),
        # by their key; those that may not (segments, large inputs) go one by one.
        groups: dict[tuple[Any, ...], list[tuple[p.Execute, bytes | None]]] = {}
        for request, payload in zip(pack.executes, pack.payloads, strict=True):
            if type(request) is msgspec.Raw:  # from a pack that did not decode whole
                try:
                    request = p.execute_decoder.decode(request)
                except msgspec.DecodeError as exc:
                    self._reply_error(envelope, p.peek_request_id(request), _malformed(exc))
                    continue
            if (most > 1 and request.input_shm is None and not request.output_shm_into
                    and (payload is None or (type(payload) is bytes
                                             and len(payload) <= payload_limit))):
                key = (tenant or request.tenant, request.binary_id, request.entry,
                       request.timeout_ms, request.memory_mb, request.fuel)
                group = groups.get(key)
                if group is None:
                    groups[key] = [(request, payload)]
                    continue
                lead = group[0][0]
                if request.env == lead.env and request.args == lead.args:
                    group.append((request, payload))
                    continue
            self._on_request(envelope, request, [] if payload is None else [payload], peer)
        for group in groups.values():
            if len(group) == 1:
                request, payload = group[0]
                self._on_request(envelope, request, [] if payload is None else [payload], peer)
            else:
                self._on_unit(envelope, group, peer, most)

    def _on_unit(self, envelope: list[bytes], group: list[tuple[p.Execute, bytes | None]],
                 peer: Identity | None, most: int) -> None:
        """Executes of one pack that may run together: each is admitted on its own (the
        tenant's request rate), then they run as units of up to what the scheduler allows
        for their binary (`Scheduler.unit_size`). A unit refused as a whole (a quota, the
        queue, a missing binary) is handled one by one instead, which answers each execute
        exactly as if it had come alone."""
        if peer is None or self.draining is not None:
            for request, payload in group:  # each is refused on its own
                self._on_request(envelope, request, [] if payload is None else [payload], peer)
            return
        admitted: list[tuple[p.Execute, bytes | None]] = []
        now = time.monotonic()
        for request, payload in group:
            if peer.tenant:
                request.tenant = peer.tenant  # proven by the connection's key
            try:
                self.rates.admit(request.tenant, now)
            except WasmCoreError as exc:
                self._reply_error(envelope, request.id, exc)
                continue
            admitted.append((request, payload))
        if not admitted:
            return
        size = self.scheduler.unit_size(admitted[0][0].binary_id, most)
        for start in range(0, len(admitted), size):
            chunk = admitted[start:start + size]
            if len(chunk) > 1:
                try:
                    self.requests_handler.execute_unit(
                        envelope, [request for request, _ in chunk],
                        [payload for _, payload in chunk], peer.admin)
                    continue
                except WasmCoreError:
                    pass  # answered one by one below, each with its own outcome
                except Exception:  # a bug of ours: each is still answered, one by one
                    log.exception("internal error making a unit of %d executes", len(chunk))
            for request, payload in chunk:
                self._run_alone(envelope, request, payload, peer.admin)

    def _run_alone(self, envelope: list[bytes], request: p.Execute, payload: bytes | None,
                   admin: bool) -> None:
        """An admitted execute handled on its own."""
        try:
            self.requests_handler.handle(envelope, request, payload, admin)
        except WasmCoreError as exc:
            self._reply_error(envelope, request.id, exc)
        except Exception as exc:  # a bug of ours: answer, log, keep serving everyone else
            log.exception("internal error handling an execute")
            self._reply_error(envelope, request.id, InternalError(
                f"internal error: {exc!r}; the service keeps running, please report it"))

    def _on_request(self, envelope: list[bytes], request: Any, payloads: list[bytes],
                    peer: Identity | None) -> None:
        try:
            if peer is None:
                raise revoked()
            if peer.tenant:
                # Proven by the connection's key: the request's own field is ignored.
                request.tenant = peer.tenant
            if isinstance(request, p.ExecuteBatch):
                if request.count < 1:
                    raise BadRequest(f"execute_batch needs at least 1 input (count is the "
                                     f"number of input frames after the header); got "
                                     f"count={request.count}", {"count": request.count})
                if request.count != len(payloads):
                    raise BadRequest(f"execute_batch says count={request.count} but carries "
                                     f"{len(payloads)} input frames")
            elif len(payloads) > 1:
                raise BadRequest(f"expected 1 or 2 frames (header, payload), got "
                                 f"{len(payloads) + 1}")
            elif payloads and type(request) in _NO_PAYLOAD:
                raise BadRequest(f"a `{type(request).__struct_config__.tag}` request takes no "
                                 "payload frame (an empty frame counts): send the header alone")
            if self.draining is not None:
                raise ShuttingDown("the service is shutting down; retry on its replacement")
            size = sum(len(f) for f in payloads)
            limit = self.config.server.max_payload_bytes
            if size > limit:
                raise PayloadTooLarge(
                    f"payload is {size} bytes; this server accepts at most {limit} "
                    "(server.max_payload_bytes)", {"size": size, "limit": limit})
            if type(request) is not p.Stats and type(request) is not p.Hello:
                self.rates.admit(request.tenant, time.monotonic())  # QUOTA_EXCEEDED past it
            match request:
                case p.Stats():
                    self._reply(envelope, self._stats(request, peer.admin))
                case p.Hello():
                    self._reply(envelope, self._welcome(request))
                case p.ExecuteBatch():
                    self.requests_handler.handle(envelope, request, payloads, peer.admin)
                case _:
                    self.requests_handler.handle(envelope, request,
                                                 payloads[0] if payloads else None, peer.admin)
        except WasmCoreError as exc:
            self._reply_error(envelope, request.id, exc)
        except Exception as exc:  # a bug of ours: answer, log, keep serving everyone else
            log.exception("internal error handling %s", type(request).__name__)
            self._reply_error(envelope, request.id, InternalError(
                f"internal error: {exc!r}; the service keeps running, please report it"))

    def _reply(self, envelope: list[bytes], header: Any, payload: Any = None) -> None:
        frames = [*envelope, p.encode(header)]
        if payload is not None:
            frames.append(payload)
        self._front_out.append(frames)

    def _reply_error(self, envelope: list[bytes], request_id: int, exc: WasmCoreError) -> None:
        self.errors_by_code[exc.code] += 1
        body = p.ErrorReply(id=request_id, code=exc.code, message=exc.message, details=exc.details)
        self._front_out.append([*envelope, p.encode(body)])

    def _welcome(self, request: p.Hello) -> p.Welcome:
        return p.Welcome(
            id=request.id,
            server_version=__version__,
            max_payload_bytes=self.config.server.max_payload_bytes,
            shm_dir=self.shm_dir or "",
            shm_threshold_bytes=self.config.server.shm_threshold_bytes,
            boot_id=shm.boot_id(),
            workers=self.pool.size,
            limits=offered_limits(self.config, request.tenant),
        )

    def _stats(self, request: p.Stats, admin: bool) -> p.StatsReply:
        """The service as `request`'s tenant may see it. An admin sees worker pids, the
        service-wide counters and, asking `all_tenants`, every tenant's binaries; an ordinary
        tenant its own binaries (without paths), the workers without pids, and the load."""
        if request.all_tenants and not admin:
            raise Forbidden("only an admin key sees every tenant's binaries; ask without "
                            "all_tenants for your own")
        workers = describe_workers(self.pool.live(), self.scheduler, show_pids=admin)
        if request.all_tenants:
            binaries = self.binaries.all_tenants()
        else:
            binaries = self.binaries.for_tenant(request.tenant)
        if not admin:
            return p.StatsReply(
                id=request.id, workers=workers, binaries=[without_path(b) for b in binaries],
                queue_depth=self.scheduler.queue_depth, in_flight=self.scheduler.in_flight,
                uptime_s=time.time() - self.started,
                compile_queue_depth=self.compile_lane.queue_depth,
                tenant_usage=self._tenant_usage(request.tenant))
        restarts = dict(self.pool.restarts)
        restarts.update({f"compile_{cause}": count
                         for cause, count in self.compile_lane.restarts.items()})
        return p.StatsReply(
            id=request.id,
            workers=workers,
            binaries=binaries,
            queue_depth=self.scheduler.queue_depth,
            in_flight=self.scheduler.in_flight,
            requests=self.requests,
            errors_by_code=dict(self.errors_by_code),
            restarts_by_cause=restarts,
            uptime_s=time.time() - self.started,
            config_error=self.config_error,
            registry_problems=self.binaries.problems(),
            compile_workers=self.compile_lane.stats(),
            compile_queue_depth=self.compile_lane.queue_depth,
            tenant_usage=self._tenant_usage(request.tenant),
            unit_executes=self.unit_executes,
            direct_executes=self.direct_executes,
        )

    def _tenant_usage(self, tenant: str) -> p.TenantUsage:
        pending, queued_bytes = self.scheduler.tenant_usage(tenant)
        binaries, stored_bytes = self.binaries.usage(tenant)
        quotas = self.config.tenant(tenant)
        return p.TenantUsage(
            tenant=tenant, pending=pending, queued_bytes=queued_bytes, binaries=binaries,
            stored_bytes=stored_bytes, max_pending=quotas.max_pending,
            max_queued_bytes=quotas.max_queued_bytes, max_binaries=quotas.max_binaries,
            max_stored_bytes=quotas.max_stored_bytes, requests_per_s=quotas.requests_per_s,
            burst=quotas.burst, max_timeout_ms=quotas.max_timeout_ms, max_fuel=quotas.max_fuel,
            max_memory_mb=quotas.max_memory_mb, weight=quotas.weight)

    # ------------------------------------------------------------------ jobs

    def _submit(self, job: PendingJob, bounded: bool) -> None:
        if self.draining is not None:  # a load whose file read ended after the drain began
            raise ShuttingDown("the service is shutting down; retry on its replacement")
        self.scheduler.submit(job, time.monotonic(), bounded)
        self._outstanding[job.token] = None

    def _finish(self, job: PendingJob, event: p.JobDone, rest: list[Any]) -> None:
        """A worker's reply ends `job`: forward it to the client (or to the job's own
        completion, for compiles). A job whose worker kept a lease stays outstanding until
        the lease ends: the version it runs is not collected under it."""
        if not event.leased:
            self._outstanding.pop(job.token, None)
        self.binaries.record_executions(job.binary_ids, job.count)
        if event.code:
            self.errors_by_code[event.code] += 1
        if job.request_ids:  # a unit: rest is [its replies, their payloads]
            self._forward_unit(job, event, rest[0], rest[1])
        elif job.on_done is not None:
            try:
                job.on_done(event.code, event, rest)
            except Exception as exc:
                self._completion_failed(job, exc)
        elif job.envelope is not None:
            self._front_out.append([*job.envelope, *rest])

    def _forward_unit(self, job: PendingJob, event: p.JobDone, replies: list[bytes],
                      payloads: list[bytes | None]) -> None:
        """A unit's replies, one per execute in order, forwarded as they are (encoded by the
        worker, spliced into the client's reply pack undecoded)."""
        self.unit_executes += job.count
        for code in event.codes:
            self.errors_by_code[code] += 1
        envelope = job.envelope
        if envelope is None:
            return
        if event.count != job.count or len(replies) != job.count or len(payloads) != job.count:
            log.error("a unit of %d executes came back with %d replies", job.count,
                      len(replies))
            self._fail(job, InternalError("the worker's reply to this execute was lost (a bug "
                                          "of the service); send it again"))
            return
        out = self._front_out
        pack = None
        if len(envelope) == 1 and envelope[0] in self._packers:
            pack = self._front_packs.get(envelope[0])
            if pack is None:
                pack = self._front_packs[envelope[0]] = p.ReplyPack(replies=[], payloads=[])
        for reply, payload in zip(replies, payloads, strict=True):
            if pack is not None and p.fits_in_pack(payload):
                pack.replies.append(msgspec.Raw(reply))  # type: ignore[arg-type]
                pack.payloads.append(payload)
            else:
                out.append([*envelope, reply] if payload is None
                           else [*envelope, reply, payload])

    def _fail(self, job: PendingJob, error: WasmCoreError) -> None:
        """End a job with an error of the supervisor's own (lost worker, deadline, shutdown)."""
        self._outstanding.pop(job.token, None)
        if self.leases.offered:
            self._lease_declined(self.leases.settle_offer(job.token, "", False, 0.0))
        if job.on_done is not None:
            frames = [zmq.Frame(p.encode(p.ErrorReply(id=0, code=error.code,
                                                      message=error.message,
                                                      details=error.details)))]
            self.errors_by_code[error.code] += 1
            try:
                job.on_done(error.code, None, frames)
            except Exception as exc:
                self._completion_failed(job, exc)
        elif job.envelope is not None:
            shown = error if job.shows_pids else redacted(error)
            for request_id in job.request_ids or (job.request_id,):
                self._reply_error(job.envelope, request_id, shown)

    def _completion_failed(self, job: PendingJob, exc: Exception) -> None:
        """A job's own completion raised (a bug of ours): whoever waits is answered all the
        same, and the loop goes on."""
        log.exception("internal error completing job %d", job.token, exc_info=exc)
        error = InternalError(f"internal error: {exc!r}; the service keeps running, please "
                              "report it")
        self.errors_by_code[error.code] += 1
        if job.on_error is not None:
            try:
                job.on_error(error)
            except Exception:
                log.exception("internal error answering job %d", job.token)
        elif job.envelope is not None:
            self._reply_error(job.envelope, job.request_id, error)

    def _expire_deadlines(self, now: float) -> None:
        for worker_id, job in self.scheduler.expired(now):
            handle = self.pool.get(worker_id)
            pid = handle.pid if handle is not None else 0
            if job.count > 1:
                each_ms = int(job.budget_s * 1000) // job.count
                error = Timeout(
                    f"this execute ran in a unit of {job.count} executes of the same binary, "
                    f"one after another on one worker, and one of them hung it (no progress "
                    f"within its {each_ms} ms timeout plus "
                    f"{self.config.pool.deadline_grace_ms} ms grace: a blocked host call or a "
                    "native hang); the worker was killed and replaced and none of the unit's "
                    "results came back: send this execute again",
                    {"timeout_ms": each_ms, "unit": job.count, "pid": pid})
            elif job.steps > 1:  # an execute_batch: its inputs run one after another
                each_ms = int(job.budget_s * 1000) // job.steps
                error = Timeout(
                    f"one of this batch's {job.steps} inputs hung its worker (no progress "
                    f"within its {each_ms} ms timeout plus {self.config.pool.deadline_grace_ms}"
                    " ms grace: a blocked host call or a native hang); the worker was killed "
                    "and replaced and none of the batch's results came back: send the batch "
                    "again without the input that hangs",
                    {"timeout_ms": each_ms, "batch": job.steps, "pid": pid})
            else:
                error = Timeout(
                    f"no reply within the {job.budget_s * 1000:.0f} ms timeout plus "
                    f"{self.config.pool.deadline_grace_ms} ms grace (a blocked host call "
                    "or a native hang); its worker was killed and replaced",
                    {"timeout_ms": int(job.budget_s * 1000), "pid": pid})
            self.scheduler.release_worker(
                worker_id,
                error,
                WorkerLost("its worker was killed for another request's deadline",
                           {"pid": pid}),
                now, requeue=self.draining is None)
            if handle is not None:
                self.pool.kill(handle, RestartCause.TIMEOUT)

    # ------------------------------------------------------------------ workers

    def _tell(self, worker_id: str, message: bytes) -> bool:
        try:
            self.back.send_multipart([worker_id.encode(), message], NOBLOCK)
            return True
        except zmq.ZMQError:
            return False

    def _drain_back(self) -> None:
        recv = self.back.recv_multipart
        for _ in range(_DRAIN_BATCH):
            try:
                frames = recv(NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                event = p.event_decoder.decode(frames[1].buffer)
            except (msgspec.DecodeError, IndexError):
                log.error("undecodable message from worker %r", frames[0].bytes)
                continue
            worker_id = frames[0].bytes.decode()
            try:
                if type(event) is p.DonePack:
                    replies, payloads = event.replies, event.payloads
                    at = 0
                    for done in event.done:
                        count = done.count
                        if count:  # a unit: its replies follow one another
                            self._on_job_done(worker_id, done, [replies[at:at + count],
                                                                payloads[at:at + count]])
                            at += count
                            continue
                        payload = payloads[at]
                        self._on_job_done(worker_id, done, [replies[at]] if payload is None
                                          else [replies[at], payload])
                        at += 1
                else:
                    self._on_worker_event(worker_id, event, frames[2:])
            except Exception:
                log.exception("internal error handling %s from a worker", type(event).__name__)

    def _on_worker_event(self, worker_id: str, event: Any, rest: list[Any]) -> None:
        now = time.monotonic()
        match event:
            case p.JobDone():
                self._on_job_done(worker_id, event, rest)
            case p.Heartbeat():
                # From the worker's heartbeat thread, whose socket has an identity of its own:
                # the worker is named in the message.
                if self.compile_lane.owns(event.worker_id):
                    self.compile_lane.heartbeat(event.worker_id, event.compiled,
                                                event.deserialized, now)
                else:
                    self.pool.heartbeat(event.worker_id, event.compiled, event.deserialized, now)
                    self.scheduler.progress(event.worker_id, event.unit_progress, now)
                    if self.leases.active:
                        self.leases.heartbeat(event.worker_id, event.direct_since,
                                              event.direct_timeout_ms)
            case p.LeaseReturned():
                self._lease_returned(worker_id, event)
            case p.Ready() if self.compile_lane.owns(event.worker_id):
                self.compile_lane.ready(event.worker_id, event.fingerprint, self.fingerprint,
                                        now, accept=self.draining is None,
                                        protections=event.protections)
            case p.Ready():
                handle = self.pool.ready(event.worker_id, event.fingerprint, self.fingerprint,
                                         now, event.protections)
                if handle is None:
                    return
                if self.draining is not None:
                    self._retire(handle, RestartCause.RECYCLE, now, replace=False)
                else:
                    # Before any job: the config may have changed since it was spawned.
                    self._tell(handle.worker_id, p.encode(self._methods))
                    self.scheduler.add_worker(handle.worker_id, handle.recycle_after, now)

    def _on_job_done(self, worker_id: str, event: p.JobDone, rest: list[Any]) -> None:
        now = time.monotonic()
        if self.compile_lane.owns(worker_id):
            compiled = self.compile_lane.on_reply(worker_id, event.token, now)
            if compiled is None:
                log.info("dropping late compile reply %d from %s", event.token, worker_id)
            else:
                self._finish(compiled, event, rest)
            return
        self.pool.seen(worker_id, now)
        outcome = self.scheduler.on_reply(worker_id, event.token, now, event.leased)
        if outcome is None:
            # Late reply for a job already answered (timed out, or its worker was declared
            # lost): it must never answer anything else.
            log.info("dropping late reply %d from %s", event.token, worker_id)
            return
        job, lane = outcome
        if event.leased or self.leases.offered:
            lease = self.leases.settle_offer(job.token, worker_id, event.leased, now)
            if not event.leased:
                self._lease_declined(lease)
            elif lease is None:  # a lease nobody offered: never honoured
                event.leased = False
                self._tell(worker_id, p.encode(p.Revoke(token=b"")))
                if lane is LaneState.LEASED:
                    lane = self.scheduler.lease_returned(worker_id, "", 0, 0.0, now) or lane
            elif lane is not LaneState.LEASED:
                # The worker has other work (or is leaving): the lease ends at once.
                self._revoke(self.leases.to_revoke(worker_id=worker_id))
        self._finish(job, event, rest)
        if lane is LaneState.RECYCLE or lane is LaneState.DRAINED:
            handle = self.pool.get(worker_id)
            if handle is not None:
                self.pool.retire(handle, RestartCause.RECYCLE, now)
                self.pool.dismiss(handle, now)

    # ------------------------------------------------------------------ direct lanes

    def _offer_lease(self, envelope: list[bytes], tenant: str, binary_id: str,
                     job_token: int) -> tuple[bytes, int, int] | None:
        """A lease to offer with an execute that asked for one: only while another worker
        would stay idle, nothing waits, and the tenant's request rate has room (the lease's
        executions are reserved from it)."""
        if (not self.pool.direct_socket_prefix or len(envelope) != 1
                or self.draining is not None or self.scheduler.queue_depth
                or self.scheduler.idle_workers < 2 or self.leases.held_by(envelope[0])):
            return None
        pool = self.config.pool
        allowance = self.rates.reserve(tenant, pool.lease_executions, time.monotonic())
        if allowance < 1:
            return None
        lease = self.leases.offer(job_token, tenant, binary_id, envelope, allowance)
        return lease.token, allowance, pool.lease_ms

    def _lease_declined(self, lease: Lease | None) -> None:
        if lease is not None:
            self.rates.refund(lease.tenant, lease.allowance, time.monotonic())

    def _revoke(self, leases: list[Lease]) -> None:
        for lease in leases:
            self._tell(lease.worker_id, p.encode(p.Revoke(token=lease.token)))

    def _lease_returned(self, worker_id: str, event: p.LeaseReturned) -> None:
        """A lease is over: what ran on it is counted as if it had come through here."""
        now = time.monotonic()
        lease = self.leases.returned(worker_id, event.token)
        if lease is None:
            return  # not the lease it holds: late, or never offered
        self._outstanding.pop(lease.job_token, None)
        executions = max(0, min(event.executions, lease.allowance))
        self.requests += executions
        self.direct_executes += executions
        self.binaries.record_executions([lease.binary_id], executions)
        for code in event.codes[:executions]:
            self.errors_by_code[code] += 1
        self.rates.refund(lease.tenant, lease.allowance - executions, now)
        lane = self.scheduler.lease_returned(worker_id, lease.tenant, executions,
                                             max(0.0, event.busy_ms), now)
        if lane is LaneState.RECYCLE or lane is LaneState.DRAINED:
            handle = self.pool.get(worker_id)
            if handle is not None:
                self.pool.retire(handle, RestartCause.RECYCLE, now)
                self.pool.dismiss(handle, now)

    def _lease_lost(self, lease: Lease, error: WasmCoreError, pid: int) -> None:
        """Its worker died: a direct execute it was running is answered here, through the
        client connection that holds the lease (its other requests are not affected)."""
        self._outstanding.pop(lease.job_token, None)
        if lease.killed_for:
            code, message = Timeout.code, lease.killed_for
            details: dict[str, Any] = {"timeout_ms": int(lease.direct_timeout_s * 1000)}
        else:
            code, message, details = error.code, error.message, dict(error.details)
            message = f"the worker serving this client's direct lane ended: {message}"
        details["pid"] = pid
        self.errors_by_code[code] += 1
        self._front_out.append([*lease.envelope, p.encode(p.LeaseLost(
            token=lease.token, code=code, message=message, details=details))])

    def _check_leases(self, now: float) -> None:
        """Leases past their time go back through the server; a worker stuck in a direct
        execute past its timeout and the grace is killed (TIMEOUT to its client)."""
        pool = self.config.pool
        self._revoke(self.leases.to_revoke(older_than=now - pool.lease_ms / 1000))
        for lease in self.leases.hung(now, pool.deadline_grace_ms / 1000):
            timeout_ms = int(lease.direct_timeout_s * 1000)
            lease.killed_for = (
                f"no reply within the {timeout_ms} ms timeout plus {pool.deadline_grace_ms} "
                "ms grace (a blocked host call or a native hang); its worker was killed and "
                "replaced")
            handle = self.pool.get(lease.worker_id)
            if handle is not None:
                self.pool.kill(handle, RestartCause.TIMEOUT)

    def _retire(self, handle: WorkerHandle, cause: RestartCause, now: float,
                replace: bool = True) -> None:
        """Take no more jobs; a successor takes the slot at once; it exits once its jobs end
        (and its lease, if it holds one, is returned)."""
        self._revoke(self.leases.to_revoke(worker_id=handle.worker_id))
        self.pool.retire(handle, cause, now, replace)
        if self.scheduler.stop_worker(handle.worker_id):
            self.pool.dismiss(handle, now)

    def _worker_exited(self, handle: WorkerHandle) -> None:
        now = time.monotonic()
        gone = self.pool.reap(handle, now)
        if gone is None:
            return
        self._drain_back()  # replies it sent before dying still count
        self.scheduler.release_worker(handle.worker_id, gone.error, gone.error, now,
                                      requeue=self.draining is None)
        lease = self.leases.lost(handle.worker_id)
        if lease is not None:
            self._lease_lost(lease, gone.error, handle.pid)
        if self.pool.direct_socket_prefix:  # its lane's socket file, left by a killed worker
            Path(self.pool.direct_socket_prefix + handle.worker_id).unlink(missing_ok=True)
        self._check_pool(now)

    def _compile_worker_exited(self, handle: WorkerHandle) -> None:
        now = time.monotonic()
        gone = self.compile_lane.reap(handle, now)
        if gone is None:
            return
        self._drain_back()  # a reply it sent before dying still counts
        self.compile_lane.release(gone, now, requeue=self.draining is None)
        self._check_pool(now)

    def _check_pool(self, now: float) -> None:
        stop_reason = self.pool.stop_reason or self.compile_lane.stop_reason
        if stop_reason is not None and self.exit_code is None:
            self._stop_now(EXIT_POOL_FAILED, ShuttingDown(stop_reason))

    # ------------------------------------------------------------------ sending

    def _flush(self) -> None:
        """Send what this loop turn produced, back to back: ZeroMQ wakes its I/O thread once
        per burst rather than once per message, the largest cost per request (measured)."""
        for job, error in self.scheduler.take_failures():
            self._fail(job, error)
        for job, error in self.compile_lane.take_failures():
            self._fail(job, error)
        if self.leases.active and self.scheduler.queue_depth:
            # Someone's work waits for a worker: every direct lane goes back to the pool.
            self._revoke(self.leases.to_revoke())
        self._back_out.extend(self.scheduler.take_assignments())
        self._back_out.extend(self.compile_lane.take_assignments())
        if self._back_out:
            outgoing, self._back_out = self._back_out, []
            by_worker: dict[str, list[PendingJob]] = {}
            for worker_id, job in outgoing:
                by_worker.setdefault(worker_id, []).append(job)
            for worker_id, jobs in by_worker.items():
                try:
                    for frames in worker_messages(worker_id.encode(), jobs):
                        self.back.send_multipart(frames, NOBLOCK, copy=False)
                except zmq.ZMQError as exc:
                    # Its socket is gone: it is dying and its pidfd will tell; its jobs are
                    # requeued (never started) or answered WORKER_LOST then.
                    log.warning("worker %s unreachable (%s)", worker_id, exc)
                    handle = self.pool.get(worker_id)
                    if handle is not None:
                        self.pool.kill(handle, RestartCause.CRASH)
                        self.scheduler.stop_worker(worker_id)
        if self._front_out or self._front_packs:
            outgoing, self._front_out = self._front_out, []
            packs, self._front_packs = self._front_packs, {}
            for frames in client_messages(outgoing, self._packers, packs):
                self._send_client(frames)

    def _send_client(self, frames: list[Any]) -> None:
        try:
            self.front.send_multipart(frames, NOBLOCK, copy=False)
        except zmq.Again:
            log.warning("client %r is not reading its replies (HWM full); reply dropped", frames[0])
        except zmq.ZMQError as exc:
            if exc.errno != errno.EHOSTUNREACH:
                raise
            # The client disconnected before its reply; nobody is left to answer.

    # ------------------------------------------------------------------ files and config

    def _path_policy(self, config: Config) -> PathPolicy:
        """The files the server may read and watch for its clients: under the load roots,
        or any path when every peer is this service's user (module_files.py)."""
        return PathPolicy(config.server.load_roots, any_path=self._private_endpoint)

    def _watch_files(self, module_paths: set[str]) -> None:
        files = set(module_paths)
        if self.config_path:
            files.add(os.path.abspath(self.config_path))
        self.watcher.set_files(files)

    def _drain_watch_events(self) -> None:
        while True:
            try:
                path = self.watch_events.recv_string(NOBLOCK)
            except zmq.Again:
                return
            try:
                if self.config_path and path == os.path.abspath(self.config_path):
                    self.reload_config("config file changed")
                elif self.draining is None:
                    self.binaries.file_changed(path)
            except Exception:
                log.exception("internal error handling a change of %s", path)

    def reload_config(self, why: str) -> None:
        """Apply a changed config without a restart; an invalid one is refused and logged."""
        if not self.config_path:
            log.info("%s: running on built-in defaults, nothing to reload", why)
            return
        try:
            text = Path(self.config_path).read_bytes()
            if why != "SIGHUP" and text == self._config_text:
                self.config_error = None  # back to the running config (or just touched)
                return
            # The bytes just read, not a second read of the file: what is compared is what
            # gets applied. (ConfigError and a bad UTF-8 decode are both ValueErrors.)
            new = resolved(parse_config(text.decode("utf-8"), str(self.config_path)))
        except (ValueError, OSError) as exc:
            self.config_error = str(exc)
            log.error("%s: refused the new config, the running one stays: %s", why, exc)
            return
        server = self.config.server
        changed_fixed = [k for k in _RESTART_ONLY if getattr(new.server, k) != getattr(server, k)]
        if changed_fixed:
            log.warning("%s: server.%s only change on restart; kept", why,
                        ", server.".join(changed_fixed))
            keep = {k: getattr(server, k) for k in _RESTART_ONLY}
            new = msgspec.structs.replace(new, server=msgspec.structs.replace(new.server, **keep))
        old_size = self.pool.size
        now = time.monotonic()
        old = self.config
        self.config = new
        self._config_text = text
        self.config_error = None
        self.scheduler.configure(new.server.max_queue, new.pool.prefetch,
                                 new.pool.deadline_grace_ms / 1000,
                                 new.server.max_queued_bytes, new.tenant)
        self._revoke(self.leases.to_revoke())  # they run under the old limits
        self.requests_handler.config = new
        self.binaries.max_payload_bytes = new.server.max_payload_bytes
        if (new.server.load_roots != server.load_roots
                or new.tenants != old.tenants):  # a tenant's load_roots
            self.binaries.set_paths(self._path_policy(new))  # what is watched may change
        for handle in self.pool.reconfigure(new, now):
            self._retire(handle, RestartCause.RECYCLE, now, replace=False)
        self.compile_lane.reconfigure(new, now)
        self._send_methods(method_table(new))
        log.info("%s: config reloaded (workers %d -> %d)", why, old_size, self.pool.size)

    def _send_methods(self, table: p.HostMethodTable) -> None:
        """A changed table goes to every ready worker on its job socket, so every job sent
        after it runs with it (the PUB socket may drop; this one keeps order)."""
        if table == self._methods:
            return
        self._methods = table
        message = p.encode(table)
        for handle in self.pool.live():
            if handle.state is WorkerState.READY:
                self._tell(handle.worker_id, message)
        log.info("host methods: %s", ", ".join(m.name for m in table.methods) or "none")

    # ------------------------------------------------------------------ signals and shutdown

    def _handle_signals(self) -> None:
        try:
            data = self._signal_r.recv(512)
        except BlockingIOError:
            return
        for signum in data:
            if signum in (signal.SIGTERM, signal.SIGINT):
                if self.draining is not None and signum == signal.SIGINT:
                    log.warning("second SIGINT: stopping at once")
                    self._stop_now(EXIT_FORCED, ShuttingDown("the service was stopped"))
                    return
                if self.draining is None:
                    self._begin_drain(signal.Signals(signum).name)
            elif signum == signal.SIGHUP:
                self.reload_config("SIGHUP")
            elif signum == signal.SIGCHLD:
                for handle in self.pool.live():
                    self._worker_exited(handle)
                for handle in self.compile_lane.live():
                    self._compile_worker_exited(handle)

    def _begin_drain(self, why: str) -> None:
        log.info("%s: draining (finishing %d in-flight requests, answering %d queued)",
                 why, self.scheduler.in_flight, self.scheduler.queue_depth)
        self.draining = Draining(time.monotonic() + self.config.pool.shutdown_grace_ms / 1000)
        self._revoke(self.leases.to_revoke())
        self.pool.stop_replacing()
        self.scheduler.cancel_queued(ShuttingDown(
            "the service is shutting down; this request was not started"))
        self.compile_lane.begin_drain(ShuttingDown(
            "the service is shutting down; this load was not compiled"))

    def _drain_step(self, now: float) -> None:
        assert self.draining is not None
        busy = self.scheduler.busy_workers()
        if (busy or self.compile_lane.busy_workers()) and now < self.draining.deadline:
            return
        late = ShuttingDown("the shutdown grace period ended before this finished")
        for worker_id in busy:
            self.scheduler.release_worker(worker_id, late, late, now, requeue=False)
        self.compile_lane.stop(late, now)
        for handle in self.pool.live():
            if handle.state is not WorkerState.RETIRING:
                self._retire(handle, RestartCause.RECYCLE, now, replace=False)
        if not any(True for _ in self.pool.live()) and not any(self.compile_lane.live()):
            self.exit_code = 0
        elif now > self.draining.deadline + 3:
            self.pool.kill_all()
            self.compile_lane.kill_all()
            self.exit_code = 0

    def _stop_now(self, code: int, error: WasmCoreError) -> None:
        now = time.monotonic()
        if self.draining is None:
            self.draining = Draining(now)
        self.pool.stop_replacing()
        self.scheduler.cancel_queued(error)
        for handle in self.pool.live():
            self.scheduler.release_worker(handle.worker_id, error, error, now, requeue=False)
            self.pool.kill(handle, RestartCause.RECYCLE)
        self.compile_lane.stop_now(error, now)
        self.exit_code = code

    def close(self) -> None:
        self._flush()  # replies decided in the last turn (SHUTTING_DOWN ones, say) go out
        self.pool.close()
        self.offloop.close()  # loads whose read or write just ended are answered too
        self._flush()
        self.compile_lane.close()
        signal.set_wakeup_fd(-1)
        self.watcher.stop()
        if self.auth is not None:
            self.auth.close()
        for sock in (self.front, self.back, self.pub, self.watch_events):
            sock.close()
        self.ctx.term()
        self.binaries.registry.close()
        self._signal_r.close()
        self._signal_w.close()
        if self.endpoint.startswith("ipc://"):
            Path(self.endpoint[len("ipc://"):]).unlink(missing_ok=True)
        for internal in (self.back_endpoint, self.pub_endpoint):
            Path(internal[len("ipc://"):]).unlink(missing_ok=True)
        prefix = self.pool.direct_socket_prefix
        if prefix:  # lanes of workers that were killed (a clean exit removes its own)
            for lane in Path(prefix).parent.glob(Path(prefix).name + "*"):
                lane.unlink(missing_ok=True)
        if self._lock_fd >= 0 and self.endpoint.startswith("ipc://"):
            lock = Path(self.endpoint[len("ipc://"):] + ".lock")
            lock.unlink(missing_ok=True)  # still ours: the flock is held until the close below
            os.close(self._lock_fd)


def _malformed(exc: msgspec.DecodeError) -> BadRequest:
    """The BAD_REQUEST for a header that does not decode; one over a bound of the protocol
    names the field and the bound in its details too."""
    details: dict[str, Any] = {"hint": "see docs/protocol.md"}
    bound = p.exceeded_bound(str(exc))
    if bound is not None:
        details["field"], details["limit"] = bound
        return BadRequest(f"malformed request: {exc} (a bound of the protocol: docs/protocol.md, "
                          "section 8)", details)
    return BadRequest(f"malformed request: {exc}", details)


def _undecoded_pack(header: bytes) -> p.UndecodedPack | None:
    """A pack that failed to decode whole, read again with its executes left encoded; None
    if it is not a well-formed pack even so."""
    try:
        return p.undecoded_pack_decoder.decode(header)
    except msgspec.DecodeError:
        return None
def _only_owner_connects(socket_path: Path) -> bool:
    """Only this process's user (and root) can connect to the bound ipc socket at
    `socket_path`: then every peer on it is this user. Connecting needs search permission on
    the directory and write permission on the socket file. Judged conservatively:

    - the directory is ours, nobody else may create, rename or remove entries in it (so the
      file judged below is the one just bound), and others may not enter it at all (an ipc
      socket in a directory others can enter is treated like tcp);
    - the socket is ours and neither its group nor others may write it. Its directory's group
      may enter (when workers run as the sandbox user, supervisor/confinement.py gives that
      group search on it to reach their own sockets), but not connect to this one. A socket
      made group-writable (a umask of 002, say) is not private whoever the group is.
    """
    try:
        directory = socket_path.parent.stat()
        sock = socket_path.lstat()
    except OSError:
        return False
    me = os.geteuid()
    return (directory.st_uid == me and directory.st_mode & 0o027 == 0
            and stat.S_ISSOCK(sock.st_mode) and sock.st_uid == me
            and sock.st_mode & 0o022 == 0)


def _queue_only(signum: int, frame: object) -> None:
    """Signal handlers only wake the loop (through the wakeup fd); the loop does the work."""
