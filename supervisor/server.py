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
import logging
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import msgspec
import zmq

from wasmcore.protocol import messages as p
from wasmcore.protocol import shm
from wasmcore.protocol.engine import engine_fingerprint
from wasmcore.protocol.errors import (
    BadRequest,
    InternalError,
    PayloadTooLarge,
    ShuttingDown,
    WasmCoreError,
)
from wasmcore.supervisor.config import Config, MiB
from wasmcore.supervisor.jobs import PendingJob
from wasmcore.supervisor.operations import OperationsMixin
from wasmcore.supervisor.registry import Registry
from wasmcore.supervisor.reload import ReloadMixin
from wasmcore.supervisor.restart_policy import RestartPolicy
from wasmcore.supervisor.scheduler import SchedulerMixin
from wasmcore.supervisor.shutdown import EXIT_FORCED, ShutdownMixin
from wasmcore.supervisor.watcher import FileWatcher
from wasmcore.supervisor.worker_pool import EXIT_POOL_FAILED, WorkerPoolMixin
from wasmcore.supervisor.workers import RestartCause, WorkerHandle

log = logging.getLogger("wasmcore.supervisor")

_DRAIN_BATCH = 256  # messages per socket per turn, so neither side starves the other
_NOBLOCK = int(zmq.NOBLOCK)  # a plain int: pyzmq does enum arithmetic on Flag values
_MAX_PACKERS = 65_536
_WATCH_ADDRESS = "inproc://wasm-core-watch"
_COPY_THRESHOLD = 1024 * 1024
# Timers (deadlines, heartbeats, watchdog, respawns) are checked at most this often.
_TICK_S = 0.002

__all__ = ["EXIT_FORCED", "EXIT_POOL_FAILED", "EndpointInUse", "Supervisor", "internal_endpoints"]


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


class Supervisor(OperationsMixin, SchedulerMixin, WorkerPoolMixin, ReloadMixin, ShutdownMixin):
    """The service: this class owns the sockets, the loop and the state; the mixins hold the
    operations, scheduling, worker lifecycle, hot reload and shutdown that act on it."""

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
        self.fingerprint = engine_fingerprint()
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
        # Connections that sent an ExecutePack: their replies may leave packed.
        self._packers: set[bytes] = set()
        self._refs: dict[str, p.ModuleRef] = {}
        self._next_sweep = 0.0
        self._next_tick = 0.0
        self._back_out: list[tuple[WorkerHandle, PendingJob]] = []
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
        recv = self.front.recv_multipart
        for _ in range(_DRAIN_BATCH):
            # A dry recv's Again costs ~2.7 us once per drain; asking ZMQ_EVENTS before every
            # message costs ~1.7 us each (it makes libzmq check its command mailbox with a
            # syscall every time), so under load trying is cheaper than asking.
            try:
                # Copied: for small requests bytes are cheaper than Frame objects; a large
                # payload is copied once here and forwarded without another copy.
                frames = recv(_NOBLOCK)
            except zmq.Again:
                return
            self._on_client_message(frames)

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
        if type(request) is p.ExecutePack:
            self._on_pack(envelope, request, body)
            return
        self._on_request(envelope, request, body[1:])

    def _on_pack(self, envelope: list[bytes], pack: p.ExecutePack, body: list[bytes]) -> None:
        if len(body) != 1 or len(pack.executes) != len(pack.payloads) or not pack.executes:
            self._reply_error(envelope, 0, BadRequest(
                f"an execute pack is one frame with as many payloads as executes (at least "
                f"one); got "
                f"{len(body)} frames, {len(pack.executes)} executes, "
                f"{len(pack.payloads)} payloads"))
            return
        if len(envelope) == 1:
            if len(self._packers) >= _MAX_PACKERS:  # forget departed connections
                self._packers.clear()
            self._packers.add(envelope[0])
        self.requests += len(pack.executes) - 1
        for request, payload in zip(pack.executes, pack.payloads, strict=True):
            self._on_request(envelope, request, [] if payload is None else [payload])

    def _on_request(self, envelope: list[bytes], request: Any, payloads: list[bytes]) -> None:
        try:
            if isinstance(request, p.ExecuteBatch):
                if request.count != len(payloads) or request.count < 1:
                    raise BadRequest(f"execute_batch says count={request.count} but carries "
                                     f"{len(payloads)} input frames")
            elif len(payloads) > 1:
                raise BadRequest(f"expected 1 or 2 frames (header, payload), got "
                                 f"{len(payloads) + 1}")
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
            for handle, messages in _worker_messages(outgoing).items():
                try:
                    for frames in messages:
                        self.back.send_multipart(frames, _NOBLOCK, copy=False)
                except zmq.ZMQError as exc:
                    # Its socket is gone: it is dying and its pidfd will tell; its jobs are
                    # requeued (never started) or answered WORKER_LOST then.
                    log.warning("worker %s unreachable (%s)", handle.worker_id, exc)
                    handle.kill(RestartCause.CRASH)
        if self._front_out:
            outgoing, self._front_out = self._front_out, []
            packs: dict[bytes, p.ReplyPack] = {}
            packers = self._packers
            for frames in outgoing:
                if frames[0] in packers and _packable_reply(frames):
                    pack = packs.get(frames[0])
                    if pack is None:
                        pack = packs[frames[0]] = p.ReplyPack(replies=[], payloads=[])
                    pack.replies.append(msgspec.Raw(frames[1]))  # type: ignore[arg-type]
                    pack.payloads.append(frames[2] if len(frames) == 3 else None)
                else:
                    self._send_now(frames)
            for identity, pack in packs.items():
                self._send_now([identity, p.encode(pack)])

    def _send_now(self, frames: list[Any]) -> None:
        try:
            self.front.send_multipart(frames, _NOBLOCK, copy=False)
        except zmq.Again:
            log.warning("client %r is not reading its replies (HWM full); reply dropped", frames[0])
        except zmq.ZMQError as exc:
            if exc.errno != errno.EHOSTUNREACH:
                raise
            # The client disconnected before its reply; nobody is left to answer.

    # ------------------------------------------------------------------ workers

    def _drain_back(self) -> None:
        recv = self.back.recv_multipart
        for _ in range(_DRAIN_BATCH):
            try:
                frames = recv(_NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                event = p.event_decoder.decode(frames[1].buffer)
            except (msgspec.DecodeError, IndexError):
                log.error("undecodable message from worker %r", frames[0].bytes)
                continue
            identity = frames[0].bytes
            try:
                if type(event) is p.DonePack:
                    for done, reply, payload in zip(event.done, event.replies, event.payloads,
                                                    strict=True):
                        self._on_worker_event(identity, done,
                                              [reply] if payload is None else [reply, payload])
                else:
                    self._on_worker_event(identity, event, frames[2:])
            except Exception:
                log.exception("internal error handling %s from a worker", type(event).__name__)

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


def _worker_messages(outgoing: list[tuple[WorkerHandle, PendingJob]]
                     ) -> dict[WorkerHandle, list[list[Any]]]:
    """The messages for each worker, its jobs in the order they were assigned: runs of small
    run jobs become one JobPack frame each, any other job keeps its own message."""
    by_worker: dict[WorkerHandle, list[PendingJob]] = {}
    for handle, job in outgoing:
        by_worker.setdefault(handle, []).append(job)
    messages: dict[WorkerHandle, list[list[Any]]] = {}
    for handle, jobs in by_worker.items():
        identity = handle.worker_id.encode()
        out: list[list[Any]] = []
        run: list[PendingJob] = []
        for job in jobs:
            if job.packable:
                run.append(job)
                continue
            if run:
                out.append(_pack(identity, run))
                run = []
            frames: list[Any] = [identity, job.header]
            if job.payload is not None:
                frames.append(job.payload)
            elif job.extra:
                frames.extend(job.extra)
            out.append(frames)
        if run:
            out.append(_pack(identity, run))
        messages[handle] = out
    return messages


def _pack(identity: bytes, jobs: list[PendingJob]) -> list[Any]:
    # Even one job is cheaper packed: one frame instead of two.
    pack = p.JobPack(jobs=[msgspec.Raw(job.header) for job in jobs],  # type: ignore[misc]
                     payloads=[b"" if job.payload is None else job.payload for job in jobs])
    return [identity, p.encode(pack)]


def _packable_reply(frames: list[Any]) -> bool:
    """[identity, header, optional payload], all plain bytes and the payload small."""
    if type(frames[1]) is not bytes:
        return False
    if len(frames) == 2:
        return True
    return len(frames) == 3 and p.fits_in_pack(frames[2])
