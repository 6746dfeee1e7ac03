"""The worker process: one Sandbox, a DEALER to the supervisor, a SUB for reload broadcasts.

The main thread owns the Store (wasmtime stores are not thread-safe) and runs one job at a
time. A heartbeat thread with its own socket tells the supervisor the process is alive even
while a long execution runs; a stopped or wedged process stops heartbeating.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
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
    MemoryLimit,
    PluginError,
    Timeout,
    Trap,
    WasmCoreError,
)
from wasmcore.protocol.limits import Limits, MiB
from wasmcore.protocol.settings import (
    EXIT_BOOT_ERROR,
    EXIT_OK,
    EXIT_PARENT_GONE,
    ROLE_COMPILE,
    SandboxConfig,
    WorkerSettings,
)
from wasmcore.protocol.zmqopts import COPY_THRESHOLD, NOBLOCK
from wasmcore.sandbox_worker import os_sandbox
from wasmcore.sandbox_worker.component import CompiledComponent
from wasmcore.sandbox_worker.direct_lane import DirectLane
from wasmcore.sandbox_worker.host_methods import HostMethods
from wasmcore.sandbox_worker.imports_scan import WASM_MAGIC
from wasmcore.sandbox_worker.module import precheck_imports
from wasmcore.sandbox_worker.outcome import ExecutionResult
from wasmcore.sandbox_worker.runtime import Compiled, CompiledModule, Sandbox
from wasmcore.sandbox_worker.wasi import ARGV0, WasiFiles

_PR_SET_PDEATHSIG = 1


# Modules whose executions average under this may have replies held back within a batch.
_QUICK_US = 1000.0
# Execution-time averages kept, at most (one per binary run): forgotten, a binary counts as
# slow until measured again.
_MAX_TIMED_MODULES = 4096
# The largest input a direct execute may carry when shared memory is off (with it, inputs
# from the shared-memory threshold up travel in segments, through the server).
_DIRECT_INPUT_BYTES = 256 * 1024

# How a run job's reply leaves: (its JobDone, the client's reply header, the payload).
Answer = Callable[[p.JobDone, bytes, Any], None]


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGKILL us when the supervisor dies, then close the race window."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the parent check in the loop still ends us
    if os.getppid() != parent_pid:
        os._exit(EXIT_PARENT_GONE)


def _time_left(limits: Limits, budget_ms: int, spent_s: float) -> Limits:
    """`limits` with the timeout cut to what is left of a `budget_ms` of which `spent_s` is
    gone; TIMEOUT if nothing is left."""
    left_ms = budget_ms - int(spent_s * 1000)
    if left_ms <= 0:
        raise Timeout(f"execution exceeded the {budget_ms} ms time limit",
                      {"timeout_ms": budget_ms})
    return msgspec.structs.replace(limits, timeout_ms=left_ms)


def cap_data_segment(limit_bytes: int) -> int:
    """RLIMIT_DATA backs up the RSS watchdog. Unlike RLIMIT_AS it ignores wasmtime's
    PROT_NONE address-space reservations and counts only memory actually made writable.

    Returns the limit applied: `limit_bytes`, or the hard limit we were started under when
    that is lower (an unprivileged process cannot raise it; asking would stop us booting)."""
    if limit_bytes <= 0:
        return 0
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY and hard < limit_bytes:
        limit_bytes = hard
    resource.setrlimit(resource.RLIMIT_DATA, (limit_bytes, limit_bytes))
    return limit_bytes


def for_compiles(config: SandboxConfig) -> SandboxConfig:
    """A compile worker's sandbox: it never instantiates anything, so no instance pool (whose
    address-space reservations would count against its memory cap), nothing kept after a
    compile, and an epoch tick once a second rather than every 10 ms for nobody. Its
    artifacts are byte for byte an executing worker's (tests/test_compile_lane.py)."""
    return msgspec.structs.replace(config, pool_slots=0, cache_size=1, epoch_tick_ms=1000.0)


def precheck_blob(path: str) -> None:
    """Refuse a binary blob that is not a core module or cannot be linked, from its first
    pages (an mmap), before the whole file is read and hashed for the compile."""
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size < len(WASM_MAGIC):
            return  # the compile explains
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            if mapped[: len(WASM_MAGIC)] == WASM_MAGIC:  # WAT is checked after wat2wasm
                precheck_imports(mapped)


class Worker:
    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        # Compiled modules are held by the sandbox's cache alone (LRU, sandbox.cache_size), so
        # a worker's memory is bounded however many distinct binaries it runs.
        self.compiles_only = settings.role == ROLE_COMPILE
        sandbox = settings.sandbox
        # Host methods: their targets are imported now, before the worker confines itself.
        self.methods = (None if self.compiles_only
                        else HostMethods(settings.host_methods, preempt=True))
        self.sandbox = Sandbox(for_compiles(sandbox) if self.compiles_only else sandbox,
                               methods=self.methods)
        self.ctx = zmq.Context()
        self.back = self.ctx.socket(zmq.DEALER)
        self.back.setsockopt(zmq.IDENTITY, settings.worker_id.encode())
        self.back.setsockopt(zmq.LINGER, 1000)
        self.back.copy_threshold = COPY_THRESHOLD  # zero-copy only pays off for large frames
        self.back.connect(settings.back_endpoint)
        # Reload broadcasts say which artifacts to map: a compile worker maps none.
        self.sub: zmq.Socket[bytes] | None = None
        if not self.compiles_only:
            self.sub = self.ctx.socket(zmq.SUB)
            self.sub.setsockopt(zmq.SUBSCRIBE, b"")
            self.sub.connect(settings.pub_endpoint)
        self.pid = os.getpid()  # asked once: getpid is a real syscall, costly on a VM
        self._limits_cache: dict[tuple[int, int, int], Limits] = {}
        self.compiled = 0
        self.deserialized = 0
        self.unit_progress = 0  # executes of units started, ever (read by the heartbeat thread)
        self.outbox: list[list[Any]] = []  # messages ready to leave, in the order they ran
        # Small replies since the last message in the outbox, leaving as one DonePack frame.
        self._packed: list[tuple[p.JobDone, bytes, bytes | None]] = []
        self.exec_us: dict[str, float] = {}  # per module: moving average of execution time
        self.running = True
        # A direct execute is running since (time.monotonic; 0: none), under this timeout:
        # read by the heartbeat thread, so the supervisor can tell a hung one.
        self.direct_since = 0.0
        self.direct_timeout_ms = 0
        self.lane = self._open_lane(settings)
        self._stop_heartbeat = threading.Event()
        self._heartbeat = threading.Thread(target=self._heartbeat_loop, daemon=True)

    def _open_lane(self, settings: WorkerSettings) -> DirectLane | None:
        """The direct lane's socket, bound now (before the worker confines itself), if the
        supervisor asked for one; None if it did not or the socket cannot be bound."""
        if self.compiles_only or not settings.direct_socket_prefix:
            return None
        max_input = settings.shm_threshold_bytes if settings.shm_dir else _DIRECT_INPUT_BYTES
        try:
            return DirectLane(self.ctx, f"ipc://{settings.direct_socket_prefix}"
                              f"{settings.worker_id}", max_input, settings.shm_dir)
        except zmq.ZMQError as exc:
            print(f"wasm-core worker {settings.worker_id}: no direct lane: {exc}",
                  file=sys.stderr, flush=True)
            return None

    # ------------------------------------------------------------------ main loop

    def run(self, protections: list[str] | None = None) -> int:
        self.back.send(
            p.encode(
                p.Ready(
                    worker_id=self.settings.worker_id,
                    pid=os.getpid(),
                    fingerprint=engine_fingerprint(),
                    protections=protections or [],
                    direct_endpoint=self.lane.endpoint if self.lane is not None else "",
                )
            )
        )
        self._heartbeat.start()
        poller = zmq.Poller()
        poller.register(self.back, zmq.POLLIN)
        if self.sub is not None:
            poller.register(self.sub, zmq.POLLIN)
        lane = self.lane.socket if self.lane is not None else None
        if lane is not None:
            poller.register(lane, zmq.POLLIN)
        try:
            while self.running:
                events = dict(poller.poll(1000))
                if os.getppid() != self.settings.parent_pid:
                    return EXIT_PARENT_GONE
                if self.sub is not None and self.sub in events:
                    self._drain_broadcasts()
                if self.back in events:
                    self._drain_jobs()
                # One direct execute per turn, after the supervisor's messages: a Revoke or a
                # job is never queued behind a client's stream of direct executes.
                if lane is not None and lane in events and self.running:
                    self._serve_direct()
        finally:
            self.close()
        return EXIT_OK

    def _drain_jobs(self) -> None:
        try:
            recv = self.back.recv_multipart
            while self.running:
                # Trying beats asking ZMQ_EVENTS first: see Supervisor._drain_front.
                try:
                    frames = recv(NOBLOCK, copy=False)
                except zmq.Again:
                    return
                self._handle(frames)
        finally:
            self._flush()

    def _send(self, frames: list[Any]) -> None:
        """Replies of one batch of quick jobs leave together: zmq wakes its I/O thread once
        for a burst instead of once per message (the largest cost per request, measured)."""
        self._close_pack()
        self.outbox.append(frames)

    def _send_run_reply(self, done: p.JobDone, header: bytes, payload: bytes | None) -> None:
        """A run job's reply: packed with its neighbours unless its payload is large. Order
        is kept: the supervisor matches replies to its FIFO of jobs for this worker."""
        if not p.fits_in_pack(payload):
            self._send([p.encode(done), header, payload])
        else:
            self._packed.append((done, header, payload))

    def _close_pack(self) -> None:
        if self._packed:
            done: list[p.JobDone] = []
            replies: list[bytes] = []
            payloads: list[bytes | None] = []
            for one, reply, payload in self._packed:
                done.append(one)
                if one.count:  # a unit: its replies and payloads, one per execute
                    replies.extend(reply)
                    payloads.extend(payload)
                else:
                    replies.append(reply)
                    payloads.append(payload)
            self.outbox.append([p.encode(p.DonePack(done=done, replies=replies,
                                                    payloads=payloads))])
            self._packed = []

    def _flush(self) -> None:
        self._close_pack()
        for frames in self.outbox:
            self.back.send_multipart(frames, copy=False)  # copied below copy_threshold
        self.outbox.clear()

    def _record_time(self, sha256: str, started: float, count: int = 1) -> None:
        elapsed_us = (time.perf_counter() - started) * 1e6 / count
        previous = self.exec_us.get(sha256)
        if previous is None and len(self.exec_us) >= _MAX_TIMED_MODULES:
            self.exec_us.clear()  # one entry per binary ever run: bounded like the modules
        self.exec_us[sha256] = elapsed_us if previous is None else 0.8 * previous + 0.2 * elapsed_us

    def _flush_before(self, sha256s: list[str]) -> None:
        # Never hold finished replies while running something that may take long.
        held = self.outbox or self._packed
        if held and any(self.exec_us.get(s, _QUICK_US) >= _QUICK_US for s in sha256s):
            self._flush()

    def _handle(self, frames: list[zmq.Frame]) -> None:
        try:
            command = p.command_decoder.decode(frames[0].buffer)
        except msgspec.DecodeError:
            return  # only the supervisor talks to us; a bad frame is a bug, not a tenant
        if self.lane is not None and self.lane.lease is not None:
            # A lease lasts only while the worker holds no other work: any job (or the end)
            # takes it back first. A Revoke names the lease it ends.
            returned = self.lane.end(command.token or None if type(command) is p.Revoke
                                     else None)
            if returned is not None:
                self._send([p.encode(returned)])
        match command:
            case p.JobPack():
                for job, payload in zip(command.jobs, command.payloads, strict=True):
                    if job.unit:
                        self._run_unit(job, payload)  # type: ignore[arg-type]
                    else:
                        self._run(job, payload)  # type: ignore[arg-type]
            case p.RunJob():
                if command.batch:
                    self._run_batch(command, [f.bytes for f in frames[1:]])
                else:
                    self._run(command, frames[1].bytes if len(frames) > 1 else b"")
            case p.CompileJob():
                self._flush()
                self._compile(command)
            case p.Shutdown():
                self.running = False
            case p.HostMethodTable():
                if self.methods is not None:
                    self.methods.configure(command)
            case p.Revoke():
                pass  # ended above, if it was held

    # ------------------------------------------------------------------ the direct lane

    def _serve_direct(self) -> None:
        """Run one direct execute, if one is waiting, and answer it on the lane."""
        assert self.lane is not None
        taken = self.lane.take(self._report_lease)
        if taken is None:
            return
        identity, job, payload = taken
        self.direct_timeout_ms = job.timeout_ms
        self.direct_since = started = time.monotonic()
        try:
            self._run_on(job, payload, partial(self._answer_direct, identity, started))
        finally:
            self.direct_since = 0.0
        returned = self.lane.end_if_spent()
        if returned is not None:  # its last execute: back to the pool now, not at the next
            self._send([p.encode(returned)])
        self._flush()  # anything a slow module's flush or a lease report left in the outbox

    def _answer_direct(self, identity: bytes, started: float, done: p.JobDone, header: bytes,
                       payload: Any) -> None:
        assert self.lane is not None
        self.lane.record(done, time.monotonic() - started)
        self.lane.answer(identity, header, payload)

    def _report_lease(self, returned: p.LeaseReturned) -> None:
        self._send([p.encode(returned)])
        self._flush()

    def _drain_broadcasts(self) -> None:
        assert self.sub is not None
        while True:
            try:
                raw = self.sub.recv(NOBLOCK)
            except zmq.Again:
                return
            try:
                message = p.broadcast_decoder.decode(raw)
            except msgspec.DecodeError:
                continue
            if message.removed:
                self.sandbox.forget(message.sha256)
                self.exec_us.pop(message.sha256, None)
                continue
            if (self.sandbox.cached(message.sha256) is None
                    and Path(message.artifact_path).exists()):
                try:
                    self.sandbox.load_serialized(message.artifact_path, message.sha256)
                    self.deserialized += 1
                except WasmCoreError:
                    pass  # fetched again, or compiled, when a job needs it

    # ------------------------------------------------------------------ jobs

    def _module(self, ref: p.ModuleRef) -> CompiledModule:
        """The exact version the job names: a worker that missed a broadcast catches up here."""
        module = self.sandbox.cached(ref.sha256)
        if module is not None:
            return module
        if ref.artifact_path and Path(ref.artifact_path).exists():
            try:
                module = self.sandbox.load_serialized(ref.artifact_path, ref.sha256)
                self.deserialized += 1
            except WasmCoreError:
                module = None
        if module is None:
            module = self.sandbox.compile(Path(ref.blob_path).read_bytes())
            self.compiled += 1
            if ref.artifact_path:
                # The shared artifact is gone (/dev/shm after a reboot): put it back so the
                # other workers map it instead of compiling too.
                try:
                    self.sandbox.serialize(module, ref.artifact_path)
                except OSError:
                    pass
        return module

    def _run(self, job: p.RunJob, payload: bytes) -> None:
        if job.input_shm is None:
            self._run_on(job, payload)
            return
        try:
            source = shm.SegmentReader(self.settings.shm_dir, job.input_shm)
        except (shm.SegmentError, OSError) as exc:
            self._reply_error(job, BadRequest.code, f"cannot open the input segment: {exc}",
                              {"segment": job.input_shm.name})
            return
        with source:
            self._run_on(job, source)

    def _limits_for(self, job: p.RunJob) -> Limits:
        """The job's timeout, fuel and memory; output and log caps are the worker's own.
        Cached: nearly every job of a binary has the same three numbers."""
        key = (job.timeout_ms, job.fuel, job.memory_bytes)
        limits = self._limits_cache.get(key)
        if limits is None:
            if len(self._limits_cache) >= 256:
                self._limits_cache.clear()
            defaults = self.settings.sandbox.default_limits
            limits = self._limits_cache[key] = Limits(
                timeout_ms=job.timeout_ms,
                fuel=job.fuel,
                memory_bytes=job.memory_bytes,
                output_bytes=defaults.output_bytes,
                log_bytes=defaults.log_bytes,
            )
        return limits

    def _files_for(self, job: p.RunJob, index: int, module: Compiled) -> WasiFiles | None:
        """Arguments, /tmp and the operator's read-only dirs, for a module that imports WASI
        or a component (or arguments it cannot take, which the sandbox refuses)."""
        if (not isinstance(module, CompiledComponent) and not module.needs_wasi
                and not job.args):
            return None
        step = job.wasi[index] if index < len(job.wasi) else None
        return WasiFiles(args=tuple(job.args), argv0=step.name if step else ARGV0,
                         dirs=tuple(step.dirs.items()) if step else (),
                         scratch_root=self.settings.scratch_dir,
                         scratch_bytes=job.scratch_bytes)

    def _run_on(self, job: p.RunJob, payload: bytes | shm.SegmentReader,
                answer: Answer | None = None) -> None:
        """Run `job` and answer it: to the supervisor, or through `answer` (a direct
        execute)."""
        limits = self._limits_for(job)
        self._flush_before([ref.sha256 for ref in job.modules])
        pid = self.pid if job.report_pid else 0
        data = payload
        steps: list[p.StepResult] = []
        fuel_total = 0
        result: ExecutionResult | None = None
        # A large final output streams from guest memory into the segment the client lent.
        sink = (shm.SegmentWriter(self.settings.shm_dir, job.output_shm_into,
                                  self.settings.shm_threshold_bytes)
                if job.output_shm_into and self.settings.shm_dir and not job.chain else None)
        chain_started = time.perf_counter()
        for index, ref in enumerate(job.modules):
            started = time.perf_counter()
            try:
                if job.chain:  # timeout_ms is the whole chain's: each step gets what is left
                    limits = _time_left(limits, job.timeout_ms, started - chain_started)
                module = self._module(ref)
                files = self._files_for(job, index, module)
                entry = job.step_entries[index] if index < len(job.step_entries) else job.entry
                if job.fallback_entries:
                    result = self._execute_with_fallback(module, data, job, limits, started,
                                                         files)
                else:
                    result = self.sandbox.execute(
                        module, data, env=job.env,
                        entry=entry, limits=limits,
                        output_sink=sink if index == len(job.modules) - 1 else None,
                        tenant=job.tenant, files=files,
                    )
            except WasmCoreError as exc:
                if sink is not None:
                    sink.abort()
                self._record_time(ref.sha256, started)
                details = dict(exc.details)
                message = exc.message
                if job.chain:
                    if exc.code == Timeout.code:
                        details["timeout_ms"] = job.timeout_ms
                        message = (f"the chain ran past its {job.timeout_ms} ms time limit "
                                   "(all steps together)")
                    details.update(step=index, binary_id=ref.binary_id, steps_done=len(steps))
                    message = f"chain step {index} ({ref.binary_id}) failed: {message}"
                self._reply_error(job, exc.code, message, details, answer)
                return
            except shm.SegmentError as exc:  # the input segment let us down (not our files)
                if sink is not None:
                    sink.abort()
                self._reply_error(job, BadRequest.code, f"cannot read the input segment: {exc}",
                                  {"segment": job.input_shm.name if job.input_shm else ""},
                                  answer)
                return
            except Exception as exc:  # a bug of ours must still answer the request
                if sink is not None:
                    sink.abort()
                self._reply_error(job, InternalError.code, f"worker error: {exc!r}", {}, answer)
                return
            self._record_time(ref.sha256, started)
            fuel_total += result.metering.fuel_consumed
            data = result.output
            if job.chain:
                steps.append(
                    p.StepResult(
                        binary_id=ref.binary_id,
                        version=ref.version,
                        output_bytes=len(result.output),
                        logs=result.logs,
                        metering=result.metering,
                    )
                )
        assert result is not None
        output_shm: shm.ShmRef | None = None
        if job.chain:
            header: Any = p.Chained(id=job.request_id, steps=steps, worker_pid=pid)
        else:
            ref = job.modules[0]
            if sink is not None:
                try:
                    if not result.output_in_sink and len(data) >= sink.threshold:
                        sink.write_bytes(data)  # e.g. a WASI module's stdout, kept in memory
                    output_shm = sink.finish()
                except OSError as exc:
                    sink.abort()
                    if result.output_in_sink:
                        self._reply_error(job, InternalError.code,
                                          f"cannot hand over the output segment: {exc}", {},
                                          answer)
                        return
                if output_shm is not None:
                    data = b""
                elif result.output_in_sink:
                    data = sink.spilled()  # the lent segment was unusable: inline
            lease = (self.lane.grant(job, time.monotonic())
                     if job.lease_token and self.lane is not None and answer is None else None)
            header = p.Executed(
                id=job.request_id,
                logs=result.logs,
                logs_truncated=result.logs_truncated,
                metering=result.metering,
                binary_id=ref.binary_id,
                version=ref.version,
                worker_pid=pid,
                output_shm=output_shm,
                lease=lease,
            )
            if lease is not None:
                done = p.JobDone(token=job.token, fuel_consumed=fuel_total, leased=True)
                self._send_run_reply(done, p.encode(header), data)
                return
        done = p.JobDone(token=job.token, fuel_consumed=fuel_total)
        (answer or self._send_run_reply)(done, p.encode(header), data)

    def _execute_with_fallback(self, module: CompiledModule, data: Any, job: p.RunJob,
                               limits: Limits, started: float,
                               files: WasiFiles | None) -> ExecutionResult:
        """The binary's `entry_fallback`: try `job.entry`, then each fallback entry in turn
        while the one tried fails with a trap or a plugin error; each in a fresh store, all
        within the one timeout. Any other failure (a limit) ends the request. The output of a
        failed attempt is dropped (so none streams into a segment: it is written after)."""
        entries = [job.entry, *job.fallback_entries]
        attempts: list[dict[str, Any]] = []
        for index, entry in enumerate(entries):
            try:
                return self.sandbox.execute(
                    module, data, env=job.env, entry=entry,
                    limits=_time_left(limits, job.timeout_ms, time.perf_counter() - started),
                    tenant=job.tenant, files=files)
            except WasmCoreError as exc:
                attempts.append({"entry": entry, "code": exc.code, "message": exc.message})
                if index == len(entries) - 1 or exc.code not in (Trap.code, PluginError.code):
                    exc.details["attempts"] = attempts
                    raise
        raise InternalError("no entry to try")  # unreachable: entries is never empty

    def _run_unit(self, job: p.RunJob, inputs: list[bytes]) -> None:
        """A unit: executes of one client pack for one binary with the same limits (only
        inline inputs, no segments, one module). Each runs in a fresh store under its own
        timeout and is answered on its own, in order, in one entry of the reply pack; a
        failing execute fails only itself."""
        ref = job.modules[0]
        limits = self._limits_for(job)
        self._flush_before([ref.sha256])
        pid = self.pid if job.report_pid else 0
        replies: list[bytes] = []
        outputs: list[bytes | None] = []
        codes: list[str] = []
        fuel_total = 0
        failure: WasmCoreError | None = None
        try:
            module = self._module(ref)
            files = self._files_for(job, 0, module)
        except WasmCoreError as exc:
            failure = exc
        except Exception as exc:  # a bug of ours must still answer every request
            failure = InternalError(f"worker error: {exc!r}")
        if len(inputs) != len(job.unit):
            failure = InternalError(f"a unit of {len(job.unit)} executes came with "
                                    f"{len(inputs)} inputs")
            inputs = [b""] * len(job.unit)
        execute = self.sandbox.execute
        encode = p.encode
        started = time.perf_counter()
        for request_id, data in zip(job.unit, inputs, strict=True):
            self.unit_progress += 1  # heartbeats tell the supervisor the unit moves on
            error = failure
            if error is None:
                try:
                    if job.fallback_entries:
                        result = self._execute_with_fallback(module, data, job, limits,
                                                             time.perf_counter(), files)
                    else:
                        result = execute(module, data, env=job.env, entry=job.entry,
                                         limits=limits, tenant=job.tenant, files=files)
                except WasmCoreError as exc:
                    error = exc
                except Exception as exc:
                    error = InternalError(f"worker error: {exc!r}")
                else:
                    fuel_total += result.metering.fuel_consumed
                    replies.append(encode(p.Executed(
                        id=request_id, logs=result.logs, logs_truncated=result.logs_truncated,
                        metering=result.metering, binary_id=ref.binary_id,
                        version=ref.version, worker_pid=pid)))
                    outputs.append(result.output)
                    continue
            codes.append(error.code)
            replies.append(encode(p.ErrorReply(id=request_id, code=error.code,
                                               message=error.message,
                                               details=dict(error.details))))
            outputs.append(None)
        if failure is None:
            self._record_time(ref.sha256, started, len(job.unit))
        done = p.JobDone(token=job.token, fuel_consumed=fuel_total, count=len(replies),
                         codes=codes)
        self._packed.append((done, replies, outputs))  # type: ignore[arg-type]

    def _run_batch(self, job: p.RunJob, inputs: list[bytes]) -> None:
        """One module, many inputs, one reply: each input succeeds or fails on its own."""
        limits = self._limits_for(job)
        ref = job.modules[0]
        self._flush_before([ref.sha256])
        items: list[p.BatchItem] = []
        outputs: list[bytes] = []
        fuel_total = 0
        try:
            module = self._module(ref)
        except WasmCoreError as exc:
            self._reply_error(job, exc.code, exc.message, dict(exc.details))
            return
        files = self._files_for(job, 0, module)
        for data in inputs:
            self.unit_progress += 1  # heartbeats tell the supervisor the batch moves on
            started = time.perf_counter()
            try:
                if job.fallback_entries:
                    result = self._execute_with_fallback(module, data, job, limits, started,
                                                         files)
                else:
                    result = self.sandbox.execute(module, data, env=job.env, entry=job.entry,
                                                  limits=limits, tenant=job.tenant,
                                                  files=files)
            except WasmCoreError as exc:
                items.append(p.BatchItem(code=exc.code, message=exc.message,
                                         details=dict(exc.details)))
                outputs.append(b"")
            else:
                items.append(p.BatchItem(logs=result.logs, metering=result.metering))
                outputs.append(result.output)
                fuel_total += result.metering.fuel_consumed
            self._record_time(ref.sha256, started)
        header = p.BatchExecuted(id=job.request_id, items=items, binary_id=ref.binary_id,
                                 version=ref.version,
                                 worker_pid=self.pid if job.report_pid else 0)
        done = p.JobDone(token=job.token, fuel_consumed=fuel_total)
        self._send([p.encode(done), p.encode(header), *outputs])

    def _reply_error(
        self, job: p.RunJob | p.CompileJob, code: str, message: str, details: dict[str, Any],
        answer: Answer | None = None,
    ) -> None:
        done = p.JobDone(token=job.token, code=code)
        reply = p.encode(p.ErrorReply(id=job.request_id, code=code, message=message,
                                      details=details))
        if isinstance(job, p.RunJob):
            (answer or self._send_run_reply)(done, reply, None)
        else:
            self._send([p.encode(done), reply])  # its completion in the supervisor reads frames

    def _compile(self, job: p.CompileJob) -> None:
        ref = job.module
        try:
            precheck_blob(ref.blob_path)
            module = self.sandbox.compile(Path(ref.blob_path).read_bytes())
            self.compiled += 1
            Path(ref.artifact_path).parent.mkdir(parents=True, exist_ok=True)
            self.sandbox.serialize(module, ref.artifact_path)
        except WasmCoreError as exc:
            self._reply_error(job, exc.code, exc.message, dict(exc.details))
            return
        except MemoryError:
            # The compiler's allocations hit this process's RLIMIT_DATA.
            cap = self.settings.rlimit_data_bytes // MiB
            setting = "compile.memory_mb" if self.compiles_only else "pool.rlimit_data_mb"
            self._reply_error(job, MemoryLimit.code,
                              f"compiling this module needs more memory than this worker may "
                              f"use (its data limit is {cap} MiB, set by {setting}); make the "
                              "module smaller or ask the operator to raise it",
                              {"rlimit_data_bytes": cap * MiB})
            return
        except Exception as exc:
            self._reply_error(job, InternalError.code, f"compile failed: {exc!r}", {})
            return
        if self.compiles_only:
            self.sandbox.forget(ref.sha256)  # the artifact is the product; free the memory
        done = p.JobDone(token=job.token, kind=module.kind, exports=list(module.exports))
        self._send([p.encode(done)])
        self._flush()

    # ------------------------------------------------------------------ heartbeats

    def _heartbeat_loop(self) -> None:
        # A host method's deadline (SIGALRM) must interrupt the main thread, not this one.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        socket = self.ctx.socket(zmq.DEALER)
        socket.setsockopt(zmq.IDENTITY, f"{self.settings.worker_id}.hb".encode())
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SNDHWM, 4)
        socket.connect(self.settings.back_endpoint)
        interval = self.settings.heartbeat_interval_ms / 1000
        try:
            while not self._stop_heartbeat.wait(interval):
                since = self.direct_since
                beat = p.Heartbeat(worker_id=self.settings.worker_id, compiled=self.compiled,
                                   deserialized=self.deserialized,
                                   unit_progress=self.unit_progress, direct_since=since,
                                   direct_timeout_ms=self.direct_timeout_ms if since else 0)
                try:
                    socket.send(p.encode(beat), NOBLOCK)
                except zmq.Again:
                    pass
        finally:
            socket.close()

    def close(self) -> None:
        self._stop_heartbeat.set()
        if self._heartbeat.is_alive():
            self._heartbeat.join(timeout=2)
        self.sandbox.close()
        if self.methods is not None:
            self.methods.close()
        if self.lane is not None:
            self.lane.close()
        self.back.close()
        if self.sub is not None:
            self.sub.close()
        self.ctx.term()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m wasmcore.sandbox_worker <settings-json>", file=sys.stderr)
        return EXIT_BOOT_ERROR
    try:
        settings = msgspec.json.decode(args[0], type=WorkerSettings)
    except msgspec.DecodeError as exc:
        print(f"wasm-core worker: bad settings: {exc}", file=sys.stderr)
        return EXIT_BOOT_ERROR
    die_with_parent(settings.parent_pid)
    if settings.nice:
        # Before any thread exists (the compiler's too): they all inherit it. Absolute: the
        # supervisor set it already at spawn, if it was quick enough.
        os.setpriority(os.PRIO_PROCESS, 0, settings.nice)
    # The supervisor owns shutdown; a terminal's Ctrl-C must not kill workers mid-request.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(EXIT_OK))
    try:
        applied = cap_data_segment(settings.rlimit_data_bytes)
        if applied != settings.rlimit_data_bytes:
            print(f"wasm-core worker {settings.worker_id}: the hard RLIMIT_DATA is "
                  f"{applied // MiB} MiB, below pool.rlimit_data_mb "
                  f"({settings.rlimit_data_bytes // MiB} MiB); using {applied // MiB} MiB",
                  file=sys.stderr, flush=True)
        seccomp = os_sandbox.prepare(settings.os_sandbox)  # before any thread starts
        worker = Worker(settings)
    except os_sandbox.SandboxUnavailable as exc:
        print(f"wasm-core worker {settings.worker_id}: refusing to start: {exc}", file=sys.stderr)
        return EXIT_BOOT_ERROR
    except Exception as exc:
        print(f"wasm-core worker {settings.worker_id}: cannot start: {exc!r}", file=sys.stderr)
        return EXIT_BOOT_ERROR
    try:
        # Package metadata is read now: the interpreter's files may be out of the sandbox
        # user's reach (a Python under /root), so nothing is imported or read after this.
        engine_fingerprint()
        # Sockets exist, no wasm has run yet: the last moment to give up what it never needs.
        protections = os_sandbox.confine(settings.os_sandbox, seccomp)
    except os_sandbox.SandboxUnavailable as exc:
        print(f"wasm-core worker {settings.worker_id}: refusing to start: {exc}", file=sys.stderr)
        worker.close()
        return EXIT_BOOT_ERROR
    if settings.os_sandbox.uid >= 0:
        die_with_parent(settings.parent_pid)  # a change of user clears the parent-death signal
    return worker.run(protections)

