"""What a client can ask for: execute, execute_batch and chain (handed to the scheduler),
load and unload (a new version is validated and compiled by a worker, then committed and
broadcast), list, stats and hello (answered at once).

Every request names its tenant; a binary is found only among that tenant's own, and its limits
are the tightest of the server's, the binary's configured ones and the request's.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import zmq

from wasmcore.protocol import __version__, shm
from wasmcore.protocol import messages as p
from wasmcore.protocol.errors import (
    BadRequest,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    WasmCoreError,
    error_from_code,
)
from wasmcore.supervisor.config import Config, MiB
from wasmcore.supervisor.jobs import PendingJob
from wasmcore.supervisor.registry import Binary, Registry
from wasmcore.supervisor.workers import WorkerHandle

log = logging.getLogger("wasmcore.supervisor")


class OperationsMixin:
    """Supervisor's request handlers; the state they share is declared below."""

    config: Config
    registry: Registry
    artifact_dir: Path
    fingerprint: str
    shm_dir: str | None
    pub: zmq.Socket
    slots: list[WorkerHandle | None]
    by_id: dict[str, WorkerHandle]
    queue: collections.deque[PendingJob]
    next_token: int
    requests: int
    errors_by_code: collections.Counter[str]
    restarts: collections.Counter[str]
    started: float
    config_error: str | None
    _refs: dict[str, p.ModuleRef]

    if TYPE_CHECKING:  # provided by the other parts of Supervisor
        def _reply(self, envelope: list[bytes], header: Any, payload: Any = None) -> None: ...
        def _reply_error(self, envelope: list[bytes], request_id: int,
                         exc: WasmCoreError) -> None: ...
        def _submit(self, job: PendingJob, bounded: bool = True) -> None: ...
        def _update_watch(self) -> None: ...

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

    def _resolve_run(self, req: p.Execute | p.ExecuteBatch
                     ) -> tuple[Binary, str | None, tuple[int, int, int]]:
        """The tenant's binary, the entry to call, and (timeout ms, fuel, memory bytes)."""
        binary = self._owned(req.tenant, req.binary_id)
        entry = self._entry_for(binary, req.entry)
        return binary, entry, self._limits(binary, req.timeout_ms, req.memory_mb, req.fuel)

    def _on_execute(self, envelope: list[bytes], req: p.Execute, payload: Any) -> None:
        binary, entry, (timeout_ms, fuel, memory) = self._resolve_run(req)
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
        if req.output_shm_into and not shm.NAME.match(req.output_shm_into):
            raise BadRequest(f"not a segment name: {req.output_shm_into!r}")
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
            output_shm_into=req.output_shm_into if self.shm_dir else "",
        )
        # Its output may overwrite its own input: running it twice could read garbage.
        retryable = not (input_shm is not None and req.output_shm_into == input_shm.name)
        self._submit_run(envelope, req, job, payload, timeout_ms / 1000, [binary.binary_id],
                         retryable=retryable)

    def _submit_run(self, envelope: list[bytes], req: Any, job: p.RunJob, payload: Any,
                    budget_s: float, binary_ids: list[str], extra: list[Any] | None = None,
                    retryable: bool = True) -> None:
        """Queue a RunJob answering `req`; `budget_s` is what its deadline allows."""
        pending = PendingJob(token=job.token, envelope=envelope, request_id=req.id,
                             header=p.encode(job), payload=payload, budget_s=budget_s,
                             binary_ids=binary_ids, retryable=retryable)
        if extra:
            pending.extra = extra
        else:
            pending.packable = p.fits_in_pack(payload)
        self._submit(pending)

    def _on_batch(self, envelope: list[bytes], req: p.ExecuteBatch, inputs: list[Any]) -> None:
        binary, entry, (timeout_ms, fuel, memory) = self._resolve_run(req)
        token = self._token()
        job = p.RunJob(token=token, request_id=req.id, modules=[self._module_ref(binary)],
                       timeout_ms=timeout_ms, fuel=fuel, memory_bytes=memory, env=req.env,
                       entry=entry, batch=req.count)
        self._submit_run(envelope, req, job, None, timeout_ms * req.count / 1000,
                         [binary.binary_id], extra=inputs)

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
        self._submit_run(envelope, req, job, payload, job.timeout_ms * len(binaries) / 1000,
                         [b.binary_id for b in binaries])

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
                # A no-op for a first load: only an existing binary keeps its last error.
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
        message = p.Broadcast(
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
