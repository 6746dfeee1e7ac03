"""Binaries: how a module becomes a version every worker serves, and how it is updated.

The path of a load or a hot reload, in order:
1. `load` (a client's request) or `file_changed` (the watcher saw a loaded file change)
   reads the bytes and hashes them; an unchanged module costs nothing more.
2. `_stage` stores the blob and submits a compile job to the compile lane: a compile worker
   checks the imports, then validates and compiles the untrusted bytes (never the supervisor
   nor an executing worker) and writes the serialized artifact to the shared artifact dir. A
   module whose twin is already compiled skips this.
3. `_commit` makes it the binary's next version in the registry (durable) and broadcasts it
   on the PUB socket: every worker maps the artifact before a job needs it. The broadcast is
   only a hint: each job names the exact version (`module_ref`), so a worker that missed it
   catches up from the artifact or the blob.
An invalid new version is refused and the old one keeps serving; the error shows in list.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import zmq

from wasmcore.protocol import messages as p
from wasmcore.protocol.errors import (
    BadRequest,
    NotFound,
    PayloadTooLarge,
    WasmCoreError,
    error_from_code,
)
from wasmcore.supervisor.jobs import PendingJob
from wasmcore.supervisor.registry import Registry

log = logging.getLogger("wasmcore.supervisor")

# Runs a compile job for a tenant in the compile lane; `bounded` False: never refused for a
# full queue.
Submit = Callable[[str, PendingJob, bool], None]
# Called once when a staged version is committed (the binary) or refused (the error).
Staged = Callable[[p.BinaryInfo | None, WasmCoreError | None], None]


class Binaries:
    def __init__(self, registry: Registry, artifact_dir: Path, fingerprint: str,
                 max_payload_bytes: int, submit: Submit, publish: Callable[[bytes], None],
                 next_token: Callable[[], int], watch: Callable[[set[str]], None]) -> None:
        self.registry = registry
        self.max_payload_bytes = max_payload_bytes
        self._artifact_dir = artifact_dir
        self._fingerprint = fingerprint
        self._submit = submit
        self._publish = publish
        self._next_token = next_token
        self._watch = watch
        self._refs: dict[str, p.ModuleRef] = {}
        self._reloading: set[tuple[str, str]] = set()  # (binary id, sha256) being staged

    # ------------------------------------------------------------------ lookups

    def owned(self, tenant: str, binary_id: str) -> p.BinaryInfo:
        binary = self.registry.get(binary_id)
        # Another tenant's binary looks exactly like a missing one: ids are not disclosed.
        if binary is None or binary.tenant != tenant:
            raise NotFound(
                f"no binary {binary_id} for tenant {tenant!r}; `wasm-client list` shows yours",
                {"binary_id": binary_id},
            )
        return binary

    def for_tenant(self, tenant: str) -> list[p.BinaryInfo]:
        return self.registry.for_tenant(tenant)

    def module_ref(self, binary: p.BinaryInfo) -> p.ModuleRef:
        """The exact version a job runs, and where a worker finds it."""
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

    def record_executions(self, binary_ids: list[str]) -> None:
        for binary_id in binary_ids:
            binary = self.registry.get(binary_id)
            if binary is not None:
                binary.executions += 1

    def watched_paths(self) -> set[str]:
        return {b.path for b in self.registry.all() if b.path}

    # ------------------------------------------------------------------ changes

    def load(self, tenant: str, path: str | None, name: str | None, payload: Any,
             done: Callable[[p.Loaded], None], failed: Callable[[WasmCoreError], None]) -> None:
        """A client's load: from a server-side path, or bytes under a name. Loading the same
        path (or name) again updates that binary in place, under the same id."""
        if path:
            path = os.path.abspath(path)
            try:
                data = Path(path).read_bytes()
            except FileNotFoundError:
                raise NotFound(f"no such file on the server: {path}", {"path": path}) from None
            except OSError as exc:
                raise BadRequest(f"cannot read {path}: {exc.strerror}", {"path": path}) from None
            name = name or Path(path).stem
            existing = self.registry.find(tenant, name, path)
        elif payload is not None:
            if not name:
                raise BadRequest("a load with bytes needs a name (loading it again updates it)")
            data = payload.bytes if isinstance(payload, zmq.Frame) else bytes(payload)
            path = None
            existing = self.registry.find(tenant, name, None)
        else:
            raise BadRequest("load needs a server-side path, or the module bytes and a name")
        if len(data) > self.max_payload_bytes:
            raise PayloadTooLarge(f"module is {len(data)} bytes; limit is "
                                  f"{self.max_payload_bytes}")
        sha256 = hashlib.sha256(data).hexdigest()
        if existing is not None and existing.sha256 == sha256:
            done(_loaded(existing, changed=False))
            return
        binary_id = existing.binary_id if existing else self.registry.new_id()

        def staged(binary: p.BinaryInfo | None, error: WasmCoreError | None) -> None:
            if error is not None:
                failed(error)
            else:
                assert binary is not None
                done(_loaded(binary, changed=True))

        self._stage(tenant, name, path, data, sha256, binary_id, staged)

    def file_changed(self, path: str) -> None:
        """A watched module file changed: each binary loaded from it gets the new content as
        its next version, or keeps serving the old one if the new content is refused."""
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
            if len(data) > self.max_payload_bytes:
                self.registry.record_error(binary.binary_id, "PAYLOAD_TOO_LARGE: file too big")
                continue
            self._reloading.add(key)

            def staged(new: p.BinaryInfo | None, error: WasmCoreError | None, key=key,
                       old=binary) -> None:
                self._reloading.discard(key)
                if error is not None:
                    log.error("reload of %s (%s) refused, version %d keeps serving: %s",
                              old.binary_id, path, old.version, error)
                    self.registry.record_error(old.binary_id, f"{error.code}: {error.message}")
                elif new is not None:
                    log.info("hot reload: %s (%s) is now version %d", new.binary_id, path,
                             new.version)

            # A hot reload is never refused for a full queue (bounded=False): it would be lost.
            self._stage(binary.tenant, binary.name, path, data, sha256, binary.binary_id,
                        staged, bounded=False)

    def unload(self, tenant: str, binary_id: str) -> p.BinaryInfo:
        binary = self.owned(tenant, binary_id)
        self.registry.remove(binary.binary_id)
        self._refs.pop(binary.binary_id, None)
        if not self.registry.blob_in_use(binary.sha256):
            self._broadcast(binary, removed=True)
            for stale in (self.registry.blobs.path_for(binary.sha256),
                          self._artifact_path(binary.sha256)):
                stale.unlink(missing_ok=True)
        self._watch(self.watched_paths())
        return binary

    # ------------------------------------------------------------------ internals

    def _artifact_path(self, sha256: str) -> Path:
        return self._artifact_dir / f"{sha256}-{self._fingerprint}.cwasm"

    def _stage(self, tenant: str, name: str, path: str | None, data: bytes, sha256: str,
               binary_id: str, staged: Staged, bounded: bool = True) -> None:
        """Store the blob, have the compile lane validate and compile it once, then commit and
        broadcast. Untrusted bytes never reach the compiler inside the supervisor."""
        _, blob_path = self.registry.blobs.put(data)
        size = len(data)  # the bytes are not kept while the compile waits
        twin = next((b for b in self.registry.all() if b.sha256 == sha256), None)
        if twin is not None and self._artifact_path(sha256).exists():
            staged(self._commit(tenant, name, path, sha256, len(data), binary_id, twin.kind,
                                twin.exports), None)
            return
        ref = p.ModuleRef(binary_id=binary_id, version=0, sha256=sha256,
                          blob_path=str(blob_path), artifact_path=str(self._artifact_path(sha256)))
        token = self._next_token()
        header = p.encode(p.CompileJob(token=token, request_id=0, module=ref))

        def compiled(code: str, event: Any, frames: list[zmq.Frame]) -> None:
            if code:
                error = _error_from_frames(code, frames)
                # A no-op for a first load: only an existing binary keeps its last error.
                self.registry.record_error(binary_id, f"{error.code}: {error.message}")
                staged(None, error)
                return
            staged(self._commit(tenant, name, path, sha256, size, binary_id, event.kind,
                                list(event.exports)), None)

        # budget_s: the lane sets it (compile.timeout_ms).
        self._submit(tenant, PendingJob(token=token, envelope=None, request_id=0,
                                        header=header, payload=None, budget_s=0.0,
                                        on_done=compiled), bounded)

    def _commit(self, tenant: str, name: str, path: str | None, sha256: str, size: int,
                binary_id: str, kind: str, exports: list[str]) -> p.BinaryInfo:
        binary = self.registry.commit(binary_id=binary_id, tenant=tenant, name=name, path=path,
                                      sha256=sha256, size=size, kind=kind, exports=exports)
        self._broadcast(binary, removed=False)
        log.info("binary %s (%s) is now version %d", binary_id, name, binary.version)
        if path is not None:
            self._watch(self.watched_paths())
        return binary

    def _broadcast(self, binary: p.BinaryInfo, removed: bool) -> None:
        self._publish(p.encode(p.Broadcast(sha256=binary.sha256,
                                           artifact_path=str(self._artifact_path(binary.sha256)),
                                           removed=removed)))


def _loaded(binary: p.BinaryInfo, changed: bool) -> p.Loaded:
    return p.Loaded(id=0, binary_id=binary.binary_id, version=binary.version,
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
