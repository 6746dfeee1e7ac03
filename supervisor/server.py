"""The supervisor: one thread, one poll loop (the ZeroMQ guide's broker shape, gunicorn's arbiter).

Sockets: a ROUTER for clients (front), a ROUTER for workers (back), a PUB for reload
broadcasts. The loop also polls a signal wakeup fd (handlers only queue) and each worker's
pidfd (readable the moment the process exits). Each turn it handles frames, reaps, expires
deadlines, runs the watchdog and keeps the pool at size.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import hashlib
import logging
import math
import os
import random
import signal
import socket
import time
from pathlib import Path
from typing import Any

import msgspec
import zmq

from wasmcore import __version__
from wasmcore.sandbox_worker.runtime import Sandbox, SandboxConfig
from wasmcore.sandbox_worker.worker import EXIT_BOOT_ERROR, WorkerSettings
from wasmcore.supervisor import protocol as p
from wasmcore.supervisor import shm
from wasmcore.supervisor.config import Config, ConfigError, MiB, load_config, resolved
from wasmcore.supervisor.errors import (
    BadRequest,
    Busy,
    Forbidden,
    InternalError,
    MemoryLimit,
    NotFound,
    PayloadTooLarge,
    ShuttingDown,
    Timeout,
    WasmCoreError,
    WorkerLost,
    error_from_code,
)
from wasmcore.supervisor.jobs import PendingJob
from wasmcore.supervisor.registry import Binary, Registry
from wasmcore.supervisor.restart_policy import RestartPolicy
from wasmcore.supervisor.watcher import FileWatcher
from wasmcore.supervisor.workers import RestartCause, WorkerHandle, WorkerState, spawn_worker

log = logging.getLogger("wasmcore.supervisor")

EXIT_POOL_FAILED = 2
EXIT_FORCED = 130
_DRAIN_BATCH = 256  # messages per socket per turn, so neither side starves the other
_WATCH_ADDRESS = "inproc://wasm-core-watch"
_COPY_THRESHOLD = 1024 * 1024
# Payload segments of processes that exited are removed this often.
_SWEEP_S = 1.0
# Timers (deadlines, heartbeats, watchdog, respawns) are checked at most this often.
_TICK_S = 0.002
# A busy worker is given more jobs only while the expected run time of those it already
# holds stays under this: one wake-up serves many quick jobs, and nobody's request waits
# long behind a slow or unknown one.
_PREFETCH_BUDGET_MS = 2.0


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


class Supervisor:
    def __init__(self, config: Config, runtime_dir: Path, config_path: str | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.runtime_dir = runtime_dir
        self.endpoint = config.server.endpoint
        self.back_endpoint, self.pub_endpoint = internal_endpoints(self.endpoint, runtime_dir)
        self.artifact_dir = Path(config.server.artifact_dir)
        self.artifact_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.shm_dir: str | None = None
        if config.server.shm_dir != "off":
            Path(config.server.shm_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
            self.shm_dir = config.server.shm_dir
            shm.sweep(self.shm_dir)
        self.registry = Registry(Path(config.server.data_dir))
        self.fingerprint = Sandbox.engine_fingerprint()
        pool = config.pool
        self.policy = RestartPolicy(
            pool.restart_backoff_initial_ms / 1000,
            pool.restart_backoff_max_ms / 1000,
            pool.breaker_failures,
            pool.breaker_window_s,
        )
        self.slots: list[WorkerHandle | None] = [None] * pool.workers
        self.by_id: dict[str, WorkerHandle] = {}
        self.by_pidfd: dict[int, WorkerHandle] = {}
        self.idle: collections.deque[WorkerHandle] = collections.deque()
        self.queue: collections.deque[PendingJob] = collections.deque()
        self.spawn_at: dict[int, float] = {}
        self.generation = 0
        self.next_token = 0
        self.broadcast_seq = 0
        self.requests = 0
        self.errors_by_code: collections.Counter[str] = collections.Counter()
        self.restarts: collections.Counter[str] = collections.Counter()
        self.started = time.time()
        self.draining = False
        self.drain_deadline = 0.0
        self.exit_code: int | None = None
        self.stop_reason = ""
        self._next_watchdog = 0.0
        self._lock_fd = -1
        self.ctx = zmq.Context()
        self.poller = zmq.Poller()
        self.front = self.ctx.socket(zmq.ROUTER)
        self.back = self.ctx.socket(zmq.ROUTER)
        self.pub = self.ctx.socket(zmq.PUB)
        self._signal_r, self._signal_w = socket.socketpair()
        self.watch_events = self.ctx.socket(zmq.PAIR)
        self.watch_events.bind(_WATCH_ADDRESS)
        self.watcher = FileWatcher(self.ctx, _WATCH_ADDRESS)
        self.config_error: str | None = None
        self._config_text = Path(config_path).read_bytes() if config_path else b""
        self._reloading: set[tuple[str, str]] = set()
        self._front_out: list[list[Any]] = []
        self._refs: dict[str, p.ModuleRef] = {}
        self._next_sweep = 0.0
        self._next_tick = 0.0
        self._back_out: list[tuple[WorkerHandle, list[Any]]] = []
        self.exec_ms: dict[str, float] = {}  # per binary: moving average of execution time

    # ------------------------------------------------------------------ setup

    def bind(self) -> None:
        if self.endpoint.startswith("ipc://"):
            path = Path(self.endpoint[len("ipc://") :])
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._lock_endpoint(path)
        for sock in (self.front, self.back):
            # pyzmq's zero-copy sends track each frame through a helper thread; below ~1 MiB
            # a plain copy is cheaper (64 KiB frames measured ~0.3 ms slower zero-copy).
            sock.copy_threshold = _COPY_THRESHOLD
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            sock.setsockopt(zmq.LINGER, 1000)
            sock.setsockopt(zmq.SNDHWM, 100_000)
            sock.setsockopt(zmq.RCVHWM, 100_000)
        # Past twice the payload cap a peer is disconnected rather than buffered whole;
        # below that it gets a PAYLOAD_TOO_LARGE reply.
        self.front.setsockopt(zmq.MAXMSGSIZE, 2 * self.config.server.max_payload_bytes + MiB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.front.bind(self.endpoint)
        self.back.bind(self.back_endpoint)
        self.pub.bind(self.pub_endpoint)
        self.poller.register(self.front, zmq.POLLIN)
        self.poller.register(self.back, zmq.POLLIN)
        self.poller.register(self._signal_r.fileno(), zmq.POLLIN)
        self.poller.register(self.watch_events, zmq.POLLIN)

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
        self.install_signals()
        for slot in range(len(self.slots)):
            self._spawn(slot)
        self._update_watch()
        log.info(
            "wasm-core serving on %s with %d workers, %d binaries",
            self.endpoint,
            len(self.slots),
            len(self.registry),
        )
        try:
            while self.exit_code is None:
                events = self.poller.poll(self._poll_timeout_ms())
                for target, _ in events:
                    if target is self.front:
                        self._drain_front()
                    elif target is self.back:
                        self._drain_back()
                    elif target == self._signal_r.fileno():
                        self._handle_signals()
                    elif target is self.watch_events:
                        self._drain_watch_events()
                    else:
                        handle = self.by_pidfd.get(target)
                        if handle is not None:
                            self._reap(handle)
                now = time.monotonic()
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
        busy = self.spawn_at or self.draining or any(h.jobs for h in self.by_id.values())
        return 10 if busy else 100

    # ------------------------------------------------------------------ clients

    def _drain_front(self) -> None:
        front = self.front
        for _ in range(_DRAIN_BATCH):
            # Asking ZMQ_EVENTS is cheaper than the Again exception a dry recv raises.
            if not front.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                return
            # Copied: for small requests bytes are cheaper than Frame objects; a large
            # payload is copied once here and forwarded without another copy.
            self._on_client_message(front.recv_multipart(zmq.NOBLOCK))

    def _on_client_message(self, frames: list[bytes]) -> None:
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
        try:
            request = p.request_decoder.decode(header)
        except msgspec.DecodeError as exc:
            error = BadRequest(f"malformed request: {exc}", {"hint": "see docs/protocol.md"})
            self._reply_error(envelope, p.peek_request_id(header), error)
            return
        payloads = body[1:]
        try:
            if isinstance(request, p.ExecuteBatch):
                if request.count != len(payloads) or request.count < 1:
                    raise BadRequest(f"execute_batch says count={request.count} but carries "
                                     f"{len(payloads)} input frames")
            elif len(payloads) > 1:
                raise BadRequest(f"expected 1 or 2 frames (header, payload), got {len(body)}")
            if self.draining:
                raise ShuttingDown("the service is shutting down; retry on its replacement")
            size = sum(len(f) for f in payloads)
            if size > self.config.server.max_payload_bytes:
                raise PayloadTooLarge(
                    f"payload is {size} bytes; this server accepts at most "
                    f"{self.config.server.max_payload_bytes} (server.max_payload_bytes)",
                    {"size": size, "limit": self.config.server.max_payload_bytes},
                )
            if isinstance(request, p.ExecuteBatch):
                self._on_batch(envelope, request, payloads)
            else:
                self._dispatch_request(envelope, request, payloads[0] if payloads else None)
        except WasmCoreError as exc:
            self._reply_error(envelope, request.id, exc)
        except Exception as exc:  # a bug of ours: answer, log, keep serving everyone else
            log.exception("internal error handling %s", type(request).__name__)
            self._reply_error(envelope, request.id, InternalError(
                f"internal error: {exc!r}; the service keeps running, please report it"))

    def _dispatch_request(self, envelope: list[bytes], request: Any, payload: Any) -> None:
        match request:
            case p.Execute():
                self._on_execute(envelope, request, payload)
            case p.Chain():
                self._on_chain(envelope, request, payload)
            case p.Load():
                self._on_load(envelope, request, payload)
            case p.ListBinaries():
                infos = [b.info() for b in self.registry.for_tenant(request.tenant)]
                self._reply(envelope, p.Listed(id=request.id, binaries=infos))
            case p.Unload():
                self._on_unload(envelope, request)
            case p.Stats():
                self._reply(envelope, self._stats(request))
            case p.Hello():
                self._reply(envelope, p.Welcome(
                    id=request.id,
                    server_version=__version__,
                    max_payload_bytes=self.config.server.max_payload_bytes,
                    shm_dir=self.shm_dir or "",
                    shm_threshold_bytes=self.config.server.shm_threshold_bytes,
                    boot_id=shm.boot_id(),
                    workers=len(self.slots),
                ))

    def _reply(self, envelope: list[bytes], header: Any, payload: Any = None) -> None:
        frames = [*envelope, p.encode(header)]
        if payload is not None:
            frames.append(payload)
        self._send_client(frames)

    def _reply_error(self, envelope: list[bytes], request_id: int, exc: WasmCoreError) -> None:
        self.errors_by_code[exc.code] += 1
        body = p.ErrorReply(id=request_id, code=exc.code, message=exc.message, details=exc.details)
        self._send_client([*envelope, p.encode(body)])

    def _send_client(self, frames: list[Any]) -> None:
        self._front_out.append(frames)

    def _flush(self) -> None:
        """Send what this loop turn produced, back to back: ZeroMQ wakes its I/O thread once
        per burst rather than once per message, the largest cost per request (measured)."""
        if self._back_out:
            outgoing, self._back_out = self._back_out, []
            for handle, frames in outgoing:
                try:
                    self.back.send_multipart(frames, zmq.NOBLOCK, copy=False)
                except zmq.ZMQError as exc:
                    # Its socket is gone: it is dying and its pidfd will tell; its jobs are
                    # requeued (never started) or answered WORKER_LOST then.
                    log.warning("worker %s unreachable (%s)", handle.worker_id, exc)
                    handle.kill(RestartCause.CRASH)
        if self._front_out:
            outgoing, self._front_out = self._front_out, []
            for frames in outgoing:
                self._send_now(frames)

    def _send_now(self, frames: list[Any]) -> None:
        try:
            self.front.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            log.warning("client %r is not reading its replies (HWM full); reply dropped", frames[0])
        except zmq.ZMQError as exc:
            if exc.errno != errno.EHOSTUNREACH:
                raise
            # The client disconnected before its reply; nobody is left to answer.

    # ------------------------------------------------------------------ operations

    def _owned(self, tenant: str, binary_id: str) -> Binary:
        binary = self.registry.get(binary_id)
        # Another tenant's binary looks exactly like a missing one: ids are not disclosed.
        if binary is None or binary.tenant != tenant:
            raise NotFound(
                f"no binary {binary_id} for tenant {tenant!r}; `wasm-client list` shows yours",
                {"binary_id": binary_id},
            )
        return binary

    def _limits(self, binary: Binary, timeout_ms: int | None, memory_mb: int | None,
                fuel: int | None) -> tuple[int, int, int]:
        base = self.config.limits
        per = self.config.binaries.get(binary.name)
        t, f, m = base.timeout_ms, base.fuel, base.memory_mb
        for wanted in ((per.timeout_ms, per.fuel, per.memory_mb) if per else (None,) * 3,
                       (timeout_ms, fuel, memory_mb)):
            if wanted[0] is not None and wanted[0] > 0:
                t = min(t, wanted[0])
            if wanted[1] is not None and wanted[1] > 0:
                f = min(f, wanted[1])
            if wanted[2] is not None and wanted[2] > 0:
                m = min(m, wanted[2])
        return t, f, m * MiB

    def _entry_for(self, binary: Binary, requested: str | None) -> str | None:
        per = self.config.binaries.get(binary.name)
        if per is None or not per.entries:
            return requested
        if requested is not None:
            if requested not in per.entries:
                raise Forbidden(
                    f"entry {requested!r} is not allowed for {binary.name!r}; "
                    f"allowed: {', '.join(per.entries)}",
                    {"allowed": per.entries},
                )
            return requested
        for entry in per.entries:
            if entry in binary.exports:
                return entry
        raise BadRequest(
            f"none of the configured entries ({', '.join(per.entries)}) is exported by "
            f"{binary.name!r}; it exports: {', '.join(binary.exports) or 'nothing callable'}",
            {"allowed": per.entries, "exports": binary.exports},
        )

    def _module_ref(self, binary: Binary) -> p.ModuleRef:
        ref = self._refs.get(binary.binary_id)
        if ref is None or ref.version != binary.version or ref.sha256 != binary.sha256:
            # Cached: building the paths costs more than the rest of routing a request.
            ref = p.ModuleRef(
                binary_id=binary.binary_id,
                version=binary.version,
                sha256=binary.sha256,
                blob_path=str(self.registry.blobs.path_for(binary.sha256)),
                artifact_path=str(self._artifact_path(binary.sha256)),
            )
            self._refs[binary.binary_id] = ref
        return ref

    def _artifact_path(self, sha256: str) -> Path:
        return self.artifact_dir / f"{sha256}-{self.fingerprint}.cwasm"

    def _token(self) -> int:
        self.next_token += 1
        return self.next_token

    def _on_execute(self, envelope: list[bytes], req: p.Execute, payload: Any) -> None:
        binary = self._owned(req.tenant, req.binary_id)
        entry = self._entry_for(binary, req.entry)
        timeout_ms, fuel, memory = self._limits(binary, req.timeout_ms, req.memory_mb, req.fuel)
        input_shm = req.input_shm
        if input_shm is not None:
            if self.shm_dir is None:
                raise BadRequest("shared-memory payloads are off on this server; send the "
                                 "input inline")
            if not shm.NAME.match(input_shm.name) or input_shm.size < 0:
                raise BadRequest(f"not a segment name: {input_shm.name!r}")
            if input_shm.size > self.config.server.max_payload_bytes:
                raise PayloadTooLarge(f"input segment is {input_shm.size} bytes; limit is "
                                      f"{self.config.server.max_payload_bytes}")
        token = self._token()
        job = p.RunJob(
            token=token,
            request_id=req.id,
            modules=[self._module_ref(binary)],
            timeout_ms=timeout_ms,
            fuel=fuel,
            memory_bytes=memory,
            env=req.env,
            entry=entry,
            input_shm=input_shm,
            output_shm_pid=req.output_shm_pid if self.shm_dir else 0,
        )
        self._submit(
            PendingJob(
                token=token,
                envelope=envelope,
                request_id=req.id,
                header=p.encode(job),
                payload=payload,
                budget_s=timeout_ms / 1000,
                binary_ids=[binary.binary_id],
                tenant=req.tenant,
            )
        )

    def _on_batch(self, envelope: list[bytes], req: p.ExecuteBatch, inputs: list[Any]) -> None:
        binary = self._owned(req.tenant, req.binary_id)
        entry = self._entry_for(binary, req.entry)
        timeout_ms, fuel, memory = self._limits(binary, req.timeout_ms, req.memory_mb, req.fuel)
        token = self._token()
        job = p.RunJob(token=token, request_id=req.id, modules=[self._module_ref(binary)],
                       timeout_ms=timeout_ms, fuel=fuel, memory_bytes=memory, env=req.env,
                       entry=entry, batch=req.count)
        pending = PendingJob(token=token, envelope=envelope, request_id=req.id,
                             header=p.encode(job), payload=None,
                             budget_s=timeout_ms * req.count / 1000,
                             binary_ids=[binary.binary_id], tenant=req.tenant)
        pending.extra = inputs
        self._submit(pending)

    def _on_chain(self, envelope: list[bytes], req: p.Chain, payload: Any) -> None:
        if not req.binary_ids:
            raise BadRequest("chain needs at least one binary id")
        binaries = [self._owned(req.tenant, binary_id) for binary_id in req.binary_ids]
        limits = [self._limits(b, req.timeout_ms, req.memory_mb, req.fuel) for b in binaries]
        token = self._token()
        job = p.RunJob(
            token=token,
            request_id=req.id,
            modules=[self._module_ref(b) for b in binaries],
            timeout_ms=min(t for t, _, _ in limits),
            fuel=min(f for _, f, _ in limits),
            memory_bytes=min(m for _, _, m in limits),
            env=req.env,
            chain=True,
        )
        self._submit(
            PendingJob(
                token=token,
                envelope=envelope,
                request_id=req.id,
                header=p.encode(job),
                payload=payload,
                budget_s=job.timeout_ms * len(binaries) / 1000,
                binary_ids=[b.binary_id for b in binaries],
                tenant=req.tenant,
            )
        )

    def _on_load(self, envelope: list[bytes], req: p.Load, payload: Any) -> None:
        if req.path:
            path = os.path.abspath(req.path)
            try:
                data = Path(path).read_bytes()
            except FileNotFoundError:
                raise NotFound(f"no such file on the server: {path}", {"path": path}) from None
            except (IsADirectoryError, PermissionError, OSError) as exc:
                raise BadRequest(f"cannot read {path}: {exc.strerror}", {"path": path}) from None
            name = req.name or Path(path).stem
            existing = self.registry.find(req.tenant, name, path)
        elif payload is not None:
            if not req.name:
                raise BadRequest("a load with bytes needs a name (loading it again updates it)")
            data = payload.bytes if isinstance(payload, zmq.Frame) else bytes(payload)
            path, name = None, req.name
            existing = self.registry.find(req.tenant, name, None)
        else:
            raise BadRequest("load needs a server-side path, or the module bytes and a name")
        if len(data) > self.config.server.max_payload_bytes:
            raise PayloadTooLarge(f"module is {len(data)} bytes; limit is "
                                  f"{self.config.server.max_payload_bytes}")
        sha256 = hashlib.sha256(data).hexdigest()
        if existing is not None and existing.sha256 == sha256:
            self._reply(envelope, _loaded(req.id, existing, changed=False))
            return
        binary_id = existing.binary_id if existing else self.registry.new_id()

        def done(binary: Binary | None, error: WasmCoreError | None) -> None:
            if error is not None:
                self._reply_error(envelope, req.id, error)
            else:
                assert binary is not None
                self._reply(envelope, _loaded(req.id, binary, changed=True))

        self.stage_version(req.tenant, name, path, data, sha256, binary_id, done)

    def stage_version(self, tenant: str, name: str, path: str | None, data: bytes, sha256: str,
                      binary_id: str, done: Any, bounded: bool = True) -> None:
        """Store the blob, have a worker validate and compile it once, then commit and
        broadcast. Untrusted bytes never reach the compiler inside the supervisor."""
        _, blob_path = self.registry.blobs.put(data)
        twin = next((b for b in self.registry.all() if b.sha256 == sha256), None)
        if twin is not None and self._artifact_path(sha256).exists():
            done(self._commit(tenant, name, path, sha256, len(data), binary_id, twin.kind,
                              twin.exports), None)
            return
        token = self._token()
        ref = p.ModuleRef(binary_id=binary_id, version=0, sha256=sha256,
                          blob_path=str(blob_path), artifact_path=str(self._artifact_path(sha256)))
        header = p.encode(p.CompileJob(token=token, request_id=0, module=ref))

        def compiled(code: str, event: Any, frames: list[zmq.Frame]) -> None:
            if code:
                error = _error_from_frames(code, frames)
                if binary_id in {b.binary_id for b in self.registry.all()}:
                    self.registry.record_error(binary_id, f"{error.code}: {error.message}")
                done(None, error)
                return
            done(self._commit(tenant, name, path, sha256, len(data), binary_id, event.kind,
                              list(event.exports)), None)

        # A hot reload is never refused for a full queue (bounded=False): it would be lost.
        self._submit(PendingJob(token=token, envelope=None, request_id=0, header=header,
                                payload=None, budget_s=60.0, on_done=compiled), bounded)

    def _commit(self, tenant: str, name: str, path: str | None, sha256: str, size: int,
                binary_id: str, kind: str, exports: list[str]) -> Binary:
        binary = self.registry.commit(binary_id=binary_id, tenant=tenant, name=name, path=path,
                                      sha256=sha256, size=size, kind=kind, exports=exports)
        self._broadcast(binary, removed=False)
        log.info("binary %s (%s) is now version %d", binary_id, name, binary.version)
        if path is not None:
            self._update_watch()
        return binary

    def _broadcast(self, binary: Binary, removed: bool) -> None:
        self.broadcast_seq += 1
        message = p.Broadcast(
            seq=self.broadcast_seq,
            binary_id=binary.binary_id,
            version=binary.version,
            sha256=binary.sha256,
            artifact_path=str(self._artifact_path(binary.sha256)),
            removed=removed,
        )
        self.pub.send(p.encode(message), zmq.NOBLOCK)

    def _on_unload(self, envelope: list[bytes], req: p.Unload) -> None:
        binary = self._owned(req.tenant, req.binary_id)
        self.registry.remove(binary.binary_id)
        if not self.registry.blob_in_use(binary.sha256):
            self._broadcast(binary, removed=True)
            for stale in (self.registry.blobs.path_for(binary.sha256),
                          self._artifact_path(binary.sha256)):
                stale.unlink(missing_ok=True)
        self._update_watch()
        self._reply(envelope, p.Unloaded(id=req.id, binary_id=binary.binary_id))

    def _stats(self, req: p.Stats) -> p.StatsReply:
        workers = []
        for handle in self.by_id.values():
            workers.append(
                p.WorkerInfo(
                    slot=handle.slot,
                    pid=handle.pid,
                    state=str(handle.state),
                    rss_bytes=handle.rss_bytes or handle.sample_rss(),
                    executions=handle.executions,
                    started_at=handle.started_at,
                    compiled=handle.compiled,
                    deserialized=handle.deserialized,
                )
            )
        workers.sort(key=lambda w: (w.slot, w.started_at))
        return p.StatsReply(
            id=req.id,
            workers=workers,
            binaries=[b.info() for b in self.registry.for_tenant(req.tenant)],
            queue_depth=len(self.queue),
            in_flight=sum(len(h.jobs) for h in self.by_id.values()),
            requests=self.requests,
            errors_by_code=dict(self.errors_by_code),
            restarts_by_cause=dict(self.restarts),
            uptime_s=time.time() - self.started,
            config_error=self.config_error,
        )

    # ------------------------------------------------------------------ scheduling
    #
    # A worker takes one job at a time, but under load it may hold a short FIFO of jobs
    # (pool.prefetch) so that one wake-up serves several. Only jobs of binaries known to be
    # quick are ever queued behind each other: a slow or hostile plugin never has someone
    # else's request parked behind it. Jobs behind the head have not started, so a worker's
    # death requeues them instead of failing them.

    def _submit(self, job: PendingJob, bounded: bool = True) -> None:
        handle = self._pick_worker()
        if handle is not None:
            self._assign(handle, job)
            return
        if bounded and len(self.queue) >= self.config.server.max_queue:
            raise Busy(
                f"all {len(self.slots)} workers are busy and {len(self.queue)} requests are "
                "queued; retry shortly",
                {"queue_depth": len(self.queue)},
            )
        self.queue.append(job)

    def _pick_worker(self) -> WorkerHandle | None:
        while self.idle:
            handle = self.idle.popleft()
            if handle.state is WorkerState.IDLE and not handle.jobs:
                return handle
        depth = self.config.pool.prefetch
        best: WorkerHandle | None = None
        for handle in self.by_id.values():
            if (handle.state is WorkerState.BUSY and len(handle.jobs) < depth
                    and handle.queued_ms < _PREFETCH_BUDGET_MS
                    and handle.executions + len(handle.jobs) < handle.recycle_after
                    and (best is None or handle.queued_ms < best.queued_ms)):
                best = handle
        return best

    def _estimate_ms(self, job: PendingJob) -> float:
        """Expected run time from the binaries' moving averages; unknown counts as slow."""
        if job.on_done is not None:
            return math.inf
        return sum(self.exec_ms.get(b, math.inf) for b in job.binary_ids)

    def _assign(self, handle: WorkerHandle, job: PendingJob) -> None:
        frames: list[Any] = [handle.worker_id.encode(), job.header]
        if job.payload is not None:
            frames.append(job.payload)
        elif job.extra:
            frames.extend(job.extra)
        self._back_out.append((handle, frames))
        handle.state = WorkerState.BUSY
        handle.jobs.append(job)
        job.estimate_ms = self._estimate_ms(job)
        handle.queued_ms += job.estimate_ms
        if len(handle.jobs) == 1:
            self._start_clock(job, time.monotonic())

    def _start_clock(self, job: PendingJob, now: float) -> None:
        job.started = now
        job.deadline = now + job.budget_s + self.config.pool.deadline_grace_ms / 1000

    def _dispatch_queue(self) -> None:
        while self.queue:
            handle = self._pick_worker()
            if handle is None:
                return
            self._assign(handle, self.queue.popleft())

    def _make_idle(self, handle: WorkerHandle) -> None:
        handle.state = WorkerState.IDLE
        if self.queue:
            self._assign(handle, self.queue.popleft())
            self._dispatch_queue()
        else:
            self.idle.append(handle)

    def _requeue(self, jobs: list[PendingJob], error: WasmCoreError) -> None:
        """Jobs that were waiting behind a lost head never started: run them elsewhere.
        Once only: a job requeued before is failed instead (it may be the killer)."""
        for job in reversed(jobs):
            if job.requeued:
                self._fail(job, error)
            else:
                job.requeued = True
                self.queue.appendleft(job)
        self._dispatch_queue()

    # ------------------------------------------------------------------ workers

    def _drain_back(self) -> None:
        back = self.back
        for _ in range(_DRAIN_BATCH):
            if not back.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                return
            frames = back.recv_multipart(zmq.NOBLOCK, copy=False)
            try:
                event = p.event_decoder.decode(frames[1].buffer)
            except (msgspec.DecodeError, IndexError):
                log.error("undecodable message from worker %r", frames[0].bytes)
                continue
            try:
                self._on_worker_event(frames[0].bytes, event, frames[2:])
            except Exception:
                log.exception("internal error handling %s from a worker", type(event).__name__)

    def _on_worker_event(self, identity: bytes, event: Any, rest: list[zmq.Frame]) -> None:
        match event:
            case p.JobDone():
                handle = self.by_id.get(identity.decode())
                if handle is None:
                    return
                now = time.monotonic()
                handle.last_seen = now
                if not handle.jobs or handle.jobs[0].token != event.token:
                    # Late reply for a job already answered (timed out, or its worker was
                    # declared lost): it must never answer anything else.
                    log.info("dropping late reply %d from %s", event.token, handle.worker_id)
                    return
                job = handle.jobs.popleft()
                if not handle.jobs:
                    handle.queued_ms = 0.0
                elif math.isinf(handle.queued_ms):  # inf - inf would be nan: recount
                    handle.queued_ms = sum(j.estimate_ms for j in handle.jobs)
                else:
                    handle.queued_ms = max(0.0, handle.queued_ms - job.estimate_ms)
                handle.executions += 1
                elapsed_ms = (now - job.started) * 1000
                for binary_id in job.binary_ids:
                    previous = self.exec_ms.get(binary_id)
                    self.exec_ms[binary_id] = (elapsed_ms if previous is None
                                               else 0.8 * previous + 0.2 * elapsed_ms)
                if handle.jobs:
                    self._start_clock(handle.jobs[0], now)
                self._finish(job, event, rest)
                if handle.jobs:
                    return
                if handle.state is WorkerState.BUSY:
                    if handle.executions >= handle.recycle_after:
                        self._retire(handle, RestartCause.RECYCLE)
                    else:
                        self._make_idle(handle)
                elif handle.state is WorkerState.RETIRING:
                    self._retire(handle, handle.retire_cause or RestartCause.RECYCLE)
            case p.Heartbeat():
                handle = self.by_id.get(event.worker_id)
                if handle is not None:
                    handle.last_seen = time.monotonic()
                    handle.compiled = event.compiled
                    handle.deserialized = event.deserialized
            case p.Ready():
                handle = self.by_id.get(event.worker_id)
                if handle is None or handle.state is not WorkerState.STARTING:
                    return
                handle.last_seen = time.monotonic()
                self.policy.record_start_success()
                if event.fingerprint != self.fingerprint:
                    log.warning("worker %s engine fingerprint %s differs from %s",
                                handle.worker_id, event.fingerprint, self.fingerprint)
                if self.draining:
                    self._retire(handle, RestartCause.RECYCLE, replace=False)
                else:
                    self._make_idle(handle)

    def _finish(self, job: PendingJob, event: p.JobDone, rest: list[zmq.Frame]) -> None:
        for binary_id in job.binary_ids:
            binary = self.registry.get(binary_id)
            if binary is not None:
                binary.executions += 1
        if event.code:
            self.errors_by_code[event.code] += 1
        if job.on_done is not None:
            job.on_done(event.code, event, rest)
        elif job.envelope is not None:
            self._send_client([*job.envelope, *rest])

    def _fail(self, job: PendingJob, error: WasmCoreError) -> None:
        """End a job with an error of the supervisor's own (lost worker, deadline, shutdown)."""
        if job.on_done is not None:
            frames = [zmq.Frame(p.encode(p.ErrorReply(id=0, code=error.code,
                                                      message=error.message,
                                                      details=error.details)))]
            job.on_done(error.code, None, frames)
            self.errors_by_code[error.code] += 1
        elif job.envelope is not None:
            self._reply_error(job.envelope, job.request_id, error)

    def _spawn(self, slot: int) -> None:
        self.spawn_at.pop(slot, None)
        self.generation += 1
        pool = self.config.pool
        limits = self.config.limits
        settings = WorkerSettings(
            worker_id="",
            back_endpoint=self.back_endpoint,
            pub_endpoint=self.pub_endpoint,
            parent_pid=os.getpid(),
            sandbox=SandboxConfig(default_limits=limits.to_limits(),
                                  epoch_tick_ms=pool.epoch_tick_ms,
                                  max_wasm_stack=limits.max_wasm_stack),
            heartbeat_interval_ms=pool.heartbeat_interval_ms,
            rlimit_data_bytes=pool.rlimit_data_mb * MiB,
            shm_dir=self.shm_dir or "",
            shm_threshold_bytes=self.config.server.shm_threshold_bytes,
        )
        try:
            handle = spawn_worker(slot, self.generation, settings, pool.python or None)
        except OSError as exc:
            log.error("cannot start worker for slot %d: %s", slot, exc)
            self.policy.record_start_failure()
            self.restarts[RestartCause.START_FAILURE] += 1
            self._check_breaker(f"cannot start a worker: {exc}")
            self.spawn_at[slot] = time.monotonic() + self.policy.delay_s()
            return
        jitter = pool.recycle_jitter
        handle.recycle_after = max(
            1, int(pool.max_executions_per_worker * (1 - jitter * random.random()))
        )
        self.slots[slot] = handle
        self.by_id[handle.worker_id] = handle
        if handle.pidfd >= 0:
            self.by_pidfd[handle.pidfd] = handle
            self.poller.register(handle.pidfd, zmq.POLLIN)

    def _retire(self, handle: WorkerHandle, cause: RestartCause, replace: bool = True) -> None:
        """Take no more jobs; exit once idle; a successor takes the slot at once."""
        if handle.state is WorkerState.DEAD:
            return
        handle.retire_cause = cause
        handle.state = WorkerState.RETIRING
        if handle.jobs:
            return  # asked again when its last job finishes
        try:
            self.back.send_multipart([handle.worker_id.encode(),
                                      p.encode(p.Shutdown(reason=str(cause)))], zmq.NOBLOCK)
        except zmq.ZMQError:
            handle.kill(cause)
        handle.last_seen = time.monotonic()  # grace for a clean exit, then heartbeat kills it
        if (replace and not handle.replaced and not self.draining
                and handle.slot < len(self.slots)):
            handle.replaced = True
            self.restarts[cause] += 1
            log.info("replacing worker %s (pid %d): %s", handle.worker_id, handle.pid, cause)
            self._spawn(handle.slot)

    def _reap(self, handle: WorkerHandle) -> None:
        code = handle.reap()
        if code is None:
            return
        self._drain_back()  # replies it sent before dying still count
        if handle.pidfd < 0:
            for fd, h in list(self.by_pidfd.items()):
                if h is handle:
                    self.poller.unregister(fd)
                    del self.by_pidfd[fd]
        self._on_exit(handle, code)

    def _on_exit(self, handle: WorkerHandle, code: int) -> None:
        was_starting = handle.state is WorkerState.STARTING
        handle.state = WorkerState.DEAD
        self.by_id.pop(handle.worker_id, None)
        cause = handle.kill_cause or handle.retire_cause or RestartCause.CRASH
        if handle.jobs:
            head, *waiting = handle.jobs
            handle.jobs.clear()
            lost: WasmCoreError
            if handle.kill_cause is RestartCause.MEMORY:
                lost = MemoryLimit(
                    f"worker pid {handle.pid} passed the hard RSS limit "
                    f"({self.config.pool.rss_hard_limit_mb} MiB) and was killed",
                    {"rss_bytes": handle.rss_bytes})
            else:
                lost = WorkerLost(
                    f"the worker running this request died ({_describe_exit(code)}); "
                    "the request may be retried",
                    {"exit": code, "cause": str(cause), "pid": handle.pid})
            self._fail(head, lost)
            if self.draining:
                for job in waiting:
                    self._fail(job, lost)
            else:
                self._requeue(waiting, lost)
        if handle.replaced or self.draining or self.exit_code is not None:
            return
        handle.replaced = True
        if was_starting and handle.kill_cause is None:
            cause = RestartCause.START_FAILURE
            self.policy.record_start_failure()
            reason = ("worker exited at start" if code != EXIT_BOOT_ERROR
                      else "worker could not boot (see its stderr above)")
            log.error("%s: %s (%s)", handle.worker_id, reason, _describe_exit(code))
            if self._check_breaker(f"{reason} ({_describe_exit(code)})"):
                return
        else:
            log.warning("worker %s (pid %d) exited: %s; cause %s",
                        handle.worker_id, handle.pid, _describe_exit(code), cause)
        self.restarts[cause] += 1
        if handle.slot < len(self.slots) and self.slots[handle.slot] is handle:
            self.spawn_at[handle.slot] = time.monotonic() + self.policy.delay_s()

    def _check_breaker(self, reason: str) -> bool:
        if not self.policy.tripped():
            return False
        self.stop_reason = (
            f"worker pool stopped: {self.policy.max_failures} workers failed to start within "
            f"{self.policy.window_s:.0f}s; last: {reason}"
        )
        log.critical(self.stop_reason)
        self._stop_now(EXIT_POOL_FAILED, ShuttingDown(self.stop_reason))
        return True

    # ------------------------------------------------------------------ timers

    def _tick(self, now: float) -> None:
        pool = self.config.pool
        hb_timeout = pool.heartbeat_timeout_ms / 1000
        start_timeout = pool.start_timeout_ms / 1000
        for handle in list(self.by_id.values()):
            if handle.pidfd < 0 and handle.state is not WorkerState.DEAD:
                self._reap(handle)  # no pidfd: fall back to polling
                continue
            job = handle.jobs[0] if handle.jobs else None
            if job is not None and now > job.deadline:
                handle.jobs.popleft()
                waiting = list(handle.jobs)
                handle.jobs.clear()
                self._fail(job, Timeout(
                    f"no reply within the {job.budget_s * 1000:.0f} ms timeout plus "
                    f"{pool.deadline_grace_ms} ms grace (a blocked host call or a native hang); "
                    "its worker was killed and replaced",
                    {"timeout_ms": int(job.budget_s * 1000), "pid": handle.pid}))
                handle.kill(RestartCause.TIMEOUT)
                handle.state = WorkerState.RETIRING
                self._requeue(waiting, WorkerLost("its worker was killed for another request's "
                                                  "deadline", {"pid": handle.pid}))
            elif handle.state is WorkerState.STARTING:
                if now - handle.last_seen > start_timeout:
                    log.error("worker %s not ready after %.1fs; killing it",
                              handle.worker_id, start_timeout)
                    handle.kill(RestartCause.START_FAILURE)
            elif now - handle.last_seen > hb_timeout and handle.kill_cause is None:
                log.error("worker %s (pid %d) missed heartbeats for %.1fs; killing it",
                          handle.worker_id, handle.pid, now - handle.last_seen)
                handle.kill(RestartCause.HEARTBEAT)
                handle.state = WorkerState.RETIRING
        if now >= self._next_watchdog:
            self._next_watchdog = now + pool.watchdog_interval_ms / 1000
            self._watchdog()
        for slot, when in list(self.spawn_at.items()):
            if now >= when and not self.draining:
                self._spawn(slot)
        if self.draining and self.exit_code is None:
            self._drain_step(now)

    def _watchdog(self) -> None:
        now = time.monotonic()
        if self.shm_dir and now >= self._next_sweep:
            self._next_sweep = now + _SWEEP_S
            removed = shm.sweep(self.shm_dir)
            if removed:
                log.info("removed %d payload segments of exited processes", removed)
        pool = self.config.pool
        soft, hard = pool.rss_soft_limit_mb * MiB, pool.rss_hard_limit_mb * MiB
        for handle in list(self.by_id.values()):
            if handle.state in (WorkerState.DEAD, WorkerState.STARTING):
                continue
            rss = handle.sample_rss()
            if rss > hard and handle.kill_cause is None:
                log.error("worker %s RSS %d MiB over the hard limit %d MiB; killing it",
                          handle.worker_id, rss // MiB, pool.rss_hard_limit_mb)
                handle.kill(RestartCause.MEMORY)
            elif rss > soft and handle.state in (WorkerState.IDLE, WorkerState.BUSY):
                log.warning("worker %s RSS %d MiB over the soft limit %d MiB; recycling it",
                            handle.worker_id, rss // MiB, pool.rss_soft_limit_mb)
                self._retire(handle, RestartCause.MEMORY)

    # ------------------------------------------------------------------ hot reload

    def _update_watch(self) -> None:
        files = {b.path for b in self.registry.all() if b.path}
        if self.config_path:
            files.add(os.path.abspath(self.config_path))
        self.watcher.set_files(files)

    def _drain_watch_events(self) -> None:
        while True:
            try:
                path = self.watch_events.recv_string(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                if self.config_path and path == os.path.abspath(self.config_path):
                    self.reload_config("config file changed")
                else:
                    self._on_file_changed(path)
            except Exception:
                log.exception("internal error handling a change of %s", path)

    def _on_file_changed(self, path: str) -> None:
        """A watched module file changed: validate, compile once, make it the next version.
        If the new content is invalid the old version keeps serving; the error is logged and
        shown in list and stats."""
        if self.draining:
            return
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            log.warning("cannot read changed file %s: %s", path, exc)
            return
        sha256 = hashlib.sha256(data).hexdigest()
        for binary in [b for b in self.registry.all() if b.path == path]:
            key = (binary.binary_id, sha256)
            if binary.sha256 == sha256 or key in self._reloading:
                continue
            if len(data) > self.config.server.max_payload_bytes:
                self.registry.record_error(binary.binary_id, "PAYLOAD_TOO_LARGE: file too big")
                continue
            self._reloading.add(key)

            def done(new: Binary | None, error: WasmCoreError | None, key=key,
                     old=binary) -> None:
                self._reloading.discard(key)
                if error is not None:
                    log.error("reload of %s (%s) refused, version %d keeps serving: %s",
                              old.binary_id, path, old.version, error)
                    self.registry.record_error(old.binary_id, f"{error.code}: {error.message}")
                elif new is not None:
                    log.info("hot reload: %s (%s) is now version %d", new.binary_id, path,
                             new.version)

            self.stage_version(binary.tenant, binary.name, path, data, sha256,
                               binary.binary_id, done, bounded=False)

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
            new = resolved(load_config(self.config_path))
        except (ConfigError, OSError) as exc:
            self.config_error = str(exc)
            log.error("%s: refused the new config, the running one stays: %s", why, exc)
            return
        fixed = ("endpoint", "data_dir", "artifact_dir")
        server = self.config.server
        changed_fixed = [k for k in fixed if getattr(new.server, k) != getattr(server, k)]
        if changed_fixed:
            log.warning("%s: server.%s only change on restart; kept", why,
                        ", server.".join(changed_fixed))
            keep = {k: getattr(self.config.server, k) for k in fixed}
            new = msgspec.structs.replace(new, server=msgspec.structs.replace(new.server, **keep))
        old_size = len(self.slots)
        self.config = new
        self._config_text = text
        self.config_error = None
        self.policy.initial_delay_s = new.pool.restart_backoff_initial_ms / 1000
        self.policy.max_delay_s = new.pool.restart_backoff_max_ms / 1000
        self.policy.max_failures = new.pool.breaker_failures
        self.policy.window_s = new.pool.breaker_window_s
        self._resize_pool(new.pool.workers)
        log.info("%s: config reloaded (workers %d -> %d)", why, old_size, len(self.slots))

    def _resize_pool(self, size: int) -> None:
        old = len(self.slots)
        if size > old:
            self.slots.extend([None] * (size - old))
            for slot in range(old, size):
                self._spawn(slot)
        elif size < old:
            removed = self.slots[size:]
            del self.slots[size:]
            for slot in list(self.spawn_at):
                if slot >= size:
                    del self.spawn_at[slot]
            for handle in removed:
                if handle is not None and handle.state is not WorkerState.DEAD:
                    handle.replaced = True
                    self._retire(handle, RestartCause.RECYCLE, replace=False)

    # ------------------------------------------------------------------ signals and shutdown

    def _handle_signals(self) -> None:
        try:
            data = self._signal_r.recv(512)
        except BlockingIOError:
            return
        for signum in data:
            if signum in (signal.SIGTERM, signal.SIGINT):
                if self.draining and signum == signal.SIGINT:
                    log.warning("second SIGINT: stopping at once")
                    self._stop_now(EXIT_FORCED, ShuttingDown("the service was stopped"))
                    return
                if not self.draining:
                    self._begin_drain(signal.Signals(signum).name)
            elif signum == signal.SIGHUP:
                self.reload_config("SIGHUP")
            elif signum == signal.SIGCHLD:
                for handle in list(self.by_id.values()):
                    self._reap(handle)

    def _begin_drain(self, why: str) -> None:
        log.info("%s: draining (finishing %d in-flight requests, answering %d queued)",
                 why, sum(len(h.jobs) for h in self.by_id.values()), len(self.queue))
        self.draining = True
        self.drain_deadline = time.monotonic() + self.config.pool.shutdown_grace_ms / 1000
        self.spawn_at.clear()
        while self.queue:
            self._fail(self.queue.popleft(), ShuttingDown(
                "the service is shutting down; this request was not started"))

    def _drain_step(self, now: float) -> None:
        busy = [h for h in self.by_id.values() if h.jobs]
        if busy and now < self.drain_deadline:
            return
        for handle in busy:
            while handle.jobs:
                self._fail(handle.jobs.popleft(),
                           ShuttingDown("the shutdown grace period ended before this finished"))
        for handle in list(self.by_id.values()):
            if handle.state is not WorkerState.RETIRING:
                self._retire(handle, RestartCause.RECYCLE, replace=False)
        if not self.by_id:
            self.exit_code = 0
        elif now > self.drain_deadline + 3:
            for handle in self.by_id.values():
                handle.kill(RestartCause.RECYCLE)
            self.exit_code = 0

    def _stop_now(self, code: int, error: WasmCoreError) -> None:
        self.draining = True
        self.spawn_at.clear()
        while self.queue:
            self._fail(self.queue.popleft(), error)
        for handle in list(self.by_id.values()):
            while handle.jobs:
                self._fail(handle.jobs.popleft(), error)
            handle.kill(RestartCause.RECYCLE)
        self.exit_code = code

    def close(self) -> None:
        self._flush()  # replies decided in the last turn (SHUTTING_DOWN ones, say) go out
        deadline = time.monotonic() + 3
        for handle in list(self.by_id.values()):
            handle.kill(RestartCause.RECYCLE)
        for handle in list(self.by_id.values()):
            try:
                handle.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except Exception:
                pass
            handle.reap()
        signal.set_wakeup_fd(-1)
        self.watcher.stop()
        for sock in (self.front, self.back, self.pub, self.watch_events):
            sock.close()
        self.ctx.term()
        self.registry.close()
        self._signal_r.close()
        self._signal_w.close()
        if self.endpoint.startswith("ipc://"):
            Path(self.endpoint[len("ipc://"):]).unlink(missing_ok=True)
        for internal in (self.back_endpoint, self.pub_endpoint):
            Path(internal[len("ipc://"):]).unlink(missing_ok=True)
        if self._lock_fd >= 0 and self.endpoint.startswith("ipc://"):
            lock = Path(self.endpoint[len("ipc://"):] + ".lock")
            lock.unlink(missing_ok=True)  # still ours: the flock is held until the close below
            os.close(self._lock_fd)


def _queue_only(signum: int, frame: object) -> None:
    """Signal handlers only wake the loop (through the wakeup fd); the loop does the work."""


def _loaded(request_id: int, binary: Binary, changed: bool) -> p.Loaded:
    return p.Loaded(id=request_id, binary_id=binary.binary_id, version=binary.version,
                    changed=changed, sha256=binary.sha256, kind=binary.kind,
                    exports=binary.exports)


def _error_from_frames(code: str, frames: list[zmq.Frame]) -> WasmCoreError:
    try:
        reply = p.reply_decoder.decode(frames[0].bytes)
        if isinstance(reply, p.ErrorReply):
            return error_from_code(reply.code, reply.message, reply.details)
    except (msgspec.DecodeError, IndexError):
        pass
    return error_from_code(code, "the worker reported an error without details")


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"
