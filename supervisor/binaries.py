"""Binaries: how a module becomes a version every worker serves, and how it is updated.

The path of a load or a hot reload, in order:
1. `load` (a client's request: the bytes it sent, or a file the server may read) or
   `file_changed` (the watcher saw a loaded file change) reads, hashes and stores the blob in
   an I/O thread, never on the loop; an unchanged module costs nothing more.
2. `_stage` submits a compile job to the compile lane: a compile worker checks the
   imports, then validates and compiles the untrusted bytes (never the supervisor nor an
   executing worker) and writes the serialized artifact to the shared artifact dir. A
   module whose twin is already compiled skips this.
3. `_commit` makes it the binary's next version in the registry (durable) and broadcasts it
   on the PUB socket: every worker maps the artifact before a job needs it. The broadcast is
   only a hint: each job names the exact version (`module_ref`), so a worker that missed it
   catches up from the artifact or the blob.
An invalid new version is refused and the old one keeps serving; the error shows in list.
A refused version's blob is deleted; a replaced or unloaded version's blob and artifact are
deleted once no job submitted before the change is left (`collect`).
"""

from __future__ import annotations

import functools
import logging
import os
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import zmq

from wasmcore.protocol import messages as p
from wasmcore.protocol.errors import (
    BadRequest,
    InternalError,
    NotFound,
    PayloadTooLarge,
    QuotaExceeded,
    StorageError,
    WasmCoreError,
    error_from_code,
)
from wasmcore.supervisor.config import TenantConfig
from wasmcore.supervisor.jobs import PendingJob
from wasmcore.supervisor.module_files import PathPolicy, read_module, without_content
from wasmcore.supervisor.registry import Registry

log = logging.getLogger("wasmcore.supervisor")

# Runs a compile job for a tenant in the compile lane; `bounded` False: never refused for a
# full queue.
Submit = Callable[[str, PendingJob, bool], None]
# Called once when a staged version is committed (the binary) or refused (the error).
Staged = Callable[[p.BinaryInfo | None, WasmCoreError | None], None]
# Runs blocking work off the loop, then its continuation on the loop (offloop.OffLoop.run).
Offload = Callable[[Callable[[], Any], Callable[[Any, BaseException | None], None]], None]


class Binaries:
    def __init__(self, registry: Registry, artifact_dir: Path, fingerprint: str,
                 max_payload_bytes: int, submit: Submit, publish: Callable[[bytes], None],
                 next_token: Callable[[], int], watch: Callable[[set[str]], None],
                 offload: Offload, oldest_job: Callable[[], int | None],
                 quotas: Callable[[str], TenantConfig] = lambda tenant: TenantConfig(),
                 changed: Callable[[str], None] = lambda binary_id: None) -> None:
        self.registry = registry
        # Told the id of a binary that now runs another version, or none (direct lanes
        # serving the old one end).
        self._changed = changed
        self.max_payload_bytes = max_payload_bytes
        self._artifact_dir = artifact_dir
        self._fingerprint = fingerprint
        self._submit = submit
        self._publish = publish
        self._next_token = next_token
        self._watch = watch
        self._refs: dict[str, p.ModuleRef] = {}
        self._reloading: set[tuple[str, str]] = set()  # (binary id, sha256) being staged
        self._offload = offload
        self._oldest_job = oldest_job
        # Until the server knows its endpoint, no path is read for anyone.
        self.paths = PathPolicy((), any_path=False)
        # Watched files being read: path -> changed again meanwhile.
        self._reading: dict[str, bool] = {}
        # (first job token that cannot name it, sha256) of replaced and unloaded versions.
        self._superseded: list[tuple[int, str]] = []
        # A tenant's quotas (max_binaries, max_stored_bytes), from the running config.
        self._quotas = quotas
        # Loads being compiled, per tenant: binary id -> module size. They count against the
        # tenant's quotas already, so loads in parallel cannot pass them together.
        self._staging: dict[str, dict[str, int]] = {}

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

    def all_tenants(self) -> list[p.BinaryInfo]:
        """Every tenant's binaries (an admin's stats)."""
        return self.registry.all()

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

    def record_executions(self, binary_ids: list[str], count: int = 1) -> None:
        for binary_id in binary_ids:
            binary = self.registry.get(binary_id)
            if binary is not None:
                binary.executions += count

    def watched_paths(self) -> set[str]:
        """The module files the server watches: those it may read for their binary's tenant
        (`paths`, with the tenant's own load_roots)."""
        policies: dict[str, PathPolicy] = {}
        watched = set()
        for b in self.registry.all():
            if b.path:
                policy = policies.get(b.tenant) or policies.setdefault(
                    b.tenant, self._policy_for(b.tenant))
                if policy.may_read(b.path):
                    watched.add(b.path)
        return watched

    def set_paths(self, policy: PathPolicy) -> None:
        """Which files the server may read and watch (decided by the server at bind, and on
        a config reload)."""
        self.paths = policy
        self._watch(self.watched_paths())

    def usage(self, tenant: str) -> tuple[int, int]:
        """(binaries, stored bytes) of `tenant`, loads being compiled included."""
        sizes = self._sizes(tenant)
        return len(sizes), sum(sizes.values())

    def problems(self) -> list[str]:
        """What of the registry could not be read at start."""
        return list(self.registry.problems)

    # ------------------------------------------------------------------ changes

    def load(self, tenant: str, path: str | None, name: str | None, payload: Any,
             done: Callable[[p.Loaded], None], failed: Callable[[WasmCoreError], None]) -> None:
        """A client's load: the bytes it sent, known by their `path` (a file's identity) or
        their `name`; with no bytes, the file at `path`, read by the server if it may.
        Loading the same path (or name) again updates that binary in place, under the same
        id. Reading, hashing and storing happen off the loop; `done` or `failed` is called
        exactly once, later."""
        if path:
            path = os.path.abspath(path)
            name = name or Path(path).stem
        elif payload is None:
            raise BadRequest("load needs the module bytes (with a path or a name), or a path "
                             "under the server's load roots")
        elif not name:
            raise BadRequest("a load with bytes needs a name (loading it again updates it)")
        policy, limit = self._policy_for(tenant), self.max_payload_bytes
        server_read = payload is None
        if server_read:
            assert path is not None
            if not policy.may_read(path):
                raise policy.refusal(path)
            work = functools.partial(self._read_and_store, path, policy, limit)
        else:
            data = payload.bytes if isinstance(payload, zmq.Frame) else payload
            if len(data) > limit:
                raise PayloadTooLarge(f"module is {len(data)} bytes; limit is {limit}")
            work = functools.partial(self._store, data)
        watched = path is not None and policy.may_read(path)

        def stored(blob: _Stored | None, error: BaseException | None) -> None:
            if blob is None:
                failed(_stored_error(error, "load"))
                return
            assert name is not None
            existing = self.registry.find(tenant, name, path)
            if existing is not None and existing.sha256 == blob.sha256:
                self.registry.blobs.release(blob.sha256)
                done(_loaded(existing, changed=False, watched=watched))
                return

            try:
                self._check_quotas(tenant, existing, blob.size)
            except WasmCoreError as exc:
                self._let_go(blob.sha256)
                failed(exc)
                return
            binary_id = existing.binary_id if existing else self.registry.new_id()
            staging = self._staging.setdefault(tenant, {})
            staging[binary_id] = blob.size

            def staged(binary: p.BinaryInfo | None, error: WasmCoreError | None) -> None:
                staging.pop(binary_id, None)
                if not staging and self._staging.get(tenant) is staging:
                    del self._staging[tenant]
                if binary is None:
                    assert error is not None
                    failed(error)
                else:
                    done(_loaded(binary, changed=True, watched=watched))

            self._stage(tenant, name, path, blob, binary_id, staged, server_read=server_read)

        self._offload(work, stored)

    def file_changed(self, path: str) -> None:
        """A watched module file changed: read it off the loop; each binary loaded from it
        gets the new content as its next version, or keeps serving the old one if the new
        content is refused. A change while the file is being read reads it again after."""
        if path in self._reading:
            self._reading[path] = True
            return
        readers = self._readers(path)
        if not readers:
            return
        policy = self._policy_for(readers[0])
        self._reading[path] = False
        self._offload(functools.partial(self._read_and_store, path, policy,
                                        self.max_payload_bytes),
                      functools.partial(self._file_read, path))

    def unload(self, tenant: str, binary_id: str) -> p.BinaryInfo:
        binary = self.owned(tenant, binary_id)
        self.registry.blobs.hold(binary.sha256)  # until no job can name it (collect)
        try:
            self.registry.remove(binary.binary_id)
        except (sqlite3.Error, OSError) as exc:
            self.registry.blobs.release(binary.sha256)
            raise _storage_error(exc, "unload") from None
        self._refs.pop(binary.binary_id, None)
        self._superseded.append((self._next_token(), binary.sha256))
        self._changed(binary.binary_id)
        self.collect()
        self._watch(self.watched_paths())
        return binary

    # ------------------------------------------------------------------ garbage

    def sweep(self) -> None:
        """At start: delete blobs and artifacts no version references, and temp files."""
        removed = self.registry.blobs.sweep(lambda sha: [self._artifact_path(sha)])
        if removed:
            log.info("removed %d module blobs no binary uses", removed)

    @property
    def has_superseded(self) -> bool:
        return bool(self._superseded)

    def collect(self) -> None:
        """Let go of replaced and unloaded versions no job can still name (every job that
        could was submitted before the version was replaced), and delete their blobs and
        artifacts off the loop, unless something else uses them."""
        if not self._superseded:
            return
        oldest = self._oldest_job()
        waiting = []
        for boundary, sha in self._superseded:
            if oldest is not None and oldest < boundary:
                waiting.append((boundary, sha))
                continue
            self.registry.blobs.release(sha)
            if not self.registry.blob_in_use(sha):
                self._broadcast_removed(sha)
                self._discard(sha)
        self._superseded = waiting

    # ------------------------------------------------------------------ internals

    def _policy_for(self, tenant: str) -> PathPolicy:
        """The files the server may read for `tenant`: `paths` and its own load_roots."""
        return self.paths.with_roots(self._quotas(tenant).load_roots)

    def _readers(self, path: str) -> list[str]:
        """Tenants with a binary loaded from `path` that the server may read for them."""
        tenants = {b.tenant for b in self.registry.all() if b.path == path}
        return [t for t in sorted(tenants) if self._policy_for(t).may_read(path)]

    def _sizes(self, tenant: str) -> dict[str, int]:
        sizes = {b.binary_id: b.size for b in self.registry.for_tenant(tenant)}
        for binary_id, size in self._staging.get(tenant, {}).items():
            sizes[binary_id] = max(size, sizes.get(binary_id, 0))
        return sizes

    def _check_quotas(self, tenant: str, existing: p.BinaryInfo | None, size: int) -> None:
        """QuotaExceeded if storing `size` bytes as a new binary (or as `existing`'s next
        version) takes `tenant` past max_binaries or max_stored_bytes."""
        quotas = self._quotas(tenant)
        if not quotas.max_binaries and not quotas.max_stored_bytes:
            return
        sizes = self._sizes(tenant)
        replaced = existing.binary_id if existing is not None else ""
        if quotas.max_binaries and replaced not in sizes and len(sizes) >= quotas.max_binaries:
            raise QuotaExceeded(
                f"this tenant has {len(sizes)} binaries, its quota (max_binaries); unload one "
                "before loading another", {"quota": "max_binaries",
                                           "limit": quotas.max_binaries, "used": len(sizes)})
        stored = sum(sizes.values()) - sizes.get(replaced, 0)
        if quotas.max_stored_bytes and stored + size > quotas.max_stored_bytes:
            raise QuotaExceeded(
                f"this tenant's binaries take {stored} bytes and this module {size} more, past "
                f"its quota (max_stored_bytes, {quotas.max_stored_bytes}); unload some first",
                {"quota": "max_stored_bytes", "limit": quotas.max_stored_bytes,
                 "used": stored, "size": size})

    def _artifact_path(self, sha256: str) -> Path:
        return self._artifact_dir / f"{sha256}-{self._fingerprint}.cwasm"

    # Off the loop (an I/O thread):

    def _store(self, data: bytes) -> _Stored:
        sha256, blob = self.registry.blobs.put(data)
        return _Stored(sha256, len(data), str(blob), self._artifact_path(sha256).exists())

    def _read_and_store(self, path: str, policy: PathPolicy, limit: int) -> _Stored:
        return self._store(read_module(path, policy, limit))

    def _discard(self, sha256: str) -> None:
        def discarded(_: Any, error: BaseException | None) -> None:
            if error is not None:
                log.warning("cannot delete the files of module %s: %s", sha256, error)

        self._offload(functools.partial(self.registry.blobs.discard, sha256,
                                        [self._artifact_path(sha256)]), discarded)

    # On the loop:

    def _let_go(self, sha256: str) -> None:
        """A staged blob that became no version: delete it unless someone else holds it."""
        self.registry.blobs.release(sha256)
        self._discard(sha256)

    def _file_read(self, path: str, blob: _Stored | None, error: BaseException | None) -> None:
        if self._reading.pop(path, False):  # changed again meanwhile: this read is stale
            if blob is not None:
                self._let_go(blob.sha256)
            self.file_changed(path)
            return
        # Only binaries whose tenant may read the file: another tenant's binary named by the
        # same path (its own bytes) never gets a file of someone else's load roots.
        readers = set(self._readers(path))
        owners = [b for b in self.registry.all() if b.path == path and b.tenant in readers]
        if blob is None:
            if isinstance(error, NotFound):
                return  # deleted (or mid-rename): the last version keeps serving
            refusal = _stored_error(error, "reload")
            for binary in owners:
                log.error("reload of %s (%s) refused, version %d keeps serving: %s",
                          binary.binary_id, path, binary.version, refusal)
                self.registry.record_error(binary.binary_id, f"{refusal.code}: {refusal.message}")
            return
        stale = [b for b in owners if b.sha256 != blob.sha256
                 and (b.binary_id, blob.sha256) not in self._reloading]
        if not stale:
            self._let_go(blob.sha256)
            return
        for _ in stale[1:]:
            self.registry.blobs.hold(blob.sha256)  # one hold per stage
        for binary in stale:
            key = (binary.binary_id, blob.sha256)
            self._reloading.add(key)

            def staged(new: p.BinaryInfo | None, error: WasmCoreError | None, key=key,
                       old=binary) -> None:
                self._reloading.discard(key)
                if error is not None:
                    log.error("reload of %s (%s) refused, version %d keeps serving: %s",
                              old.binary_id, path, old.version, error)
                elif new is not None:
                    log.info("hot reload: %s (%s) is now version %d", new.binary_id, path,
                             new.version)

            # A hot reload is never refused for a full queue (bounded=False): it would be lost.
            self._stage(binary.tenant, binary.name, path, blob, binary.binary_id, staged,
                        bounded=False, server_read=True)

    def _stage(self, tenant: str, name: str, path: str | None, blob: _Stored, binary_id: str,
               staged: Staged, bounded: bool = True, server_read: bool = False) -> None:
        """Have the compile lane validate and compile the stored blob once, then commit and
        broadcast. Untrusted bytes never reach the compiler inside the supervisor. Takes
        over the caller's hold on the blob; `staged` is called exactly once."""
        staged = _once(staged)
        sha256 = blob.sha256
        twin = next((b for b in self.registry.all() if b.sha256 == sha256), None)
        if twin is not None and blob.artifact_exists:
            self._settle(sha256, staged, lambda: self._commit(
                tenant, name, path, sha256, blob.size, binary_id, twin.kind, twin.exports))
            return
        ref = p.ModuleRef(binary_id=binary_id, version=0, sha256=sha256,
                          blob_path=blob.blob_path, artifact_path=str(self._artifact_path(sha256)))
        token = self._next_token()
        header = p.encode(p.CompileJob(token=token, request_id=0, module=ref))

        def compiled(code: str, event: Any, frames: list[zmq.Frame]) -> None:
            if code:
                error = _error_from_frames(code, frames)
                if server_read and event is not None and path is not None:
                    error = without_content(error, path)  # the worker quotes the content
                # A no-op for a first load: only an existing binary keeps its last error.
                self.registry.record_error(binary_id, f"{error.code}: {error.message}")
                self._let_go(sha256)
                staged(None, error)
                return
            self._settle(sha256, staged, lambda: self._commit(
                tenant, name, path, sha256, blob.size, binary_id, event.kind,
                list(event.exports)))

        def lost(error: WasmCoreError) -> None:
            # The completion above raised (a bug): the blob is kept until the next start.
            staged(None, error)

        try:
            # budget_s: the lane sets it (compile.timeout_ms).
            self._submit(tenant, PendingJob(token=token, envelope=None, request_id=0,
                                            header=header, payload=None, budget_s=0.0,
                                            on_done=compiled, on_error=lost, tenant=tenant,
                                            size_bytes=len(header)), bounded)
        except WasmCoreError as exc:  # BUSY
            self._let_go(sha256)
            staged(None, exc)

    def _settle(self, sha256: str, staged: Staged, commit: Callable[[], p.BinaryInfo]) -> None:
        try:
            binary = commit()
        except (sqlite3.Error, OSError) as exc:
            log.error("cannot commit module %s: %s", sha256, exc)
            self._let_go(sha256)
            staged(None, _storage_error(exc, "commit"))
            return
        self.registry.blobs.release(sha256)  # the registry holds it now
        staged(binary, None)

    def _commit(self, tenant: str, name: str, path: str | None, sha256: str, size: int,
                binary_id: str, kind: str, exports: list[str]) -> p.BinaryInfo:
        previous = self.registry.get(binary_id)
        replaced = previous is not None and previous.sha256 != sha256
        if replaced:
            assert previous is not None
            self.registry.blobs.hold(previous.sha256)  # until no job can name it (collect)
        try:
            binary = self.registry.commit(binary_id=binary_id, tenant=tenant, name=name,
                                          path=path, sha256=sha256, size=size, kind=kind,
                                          exports=exports)
        except BaseException:
            if replaced:
                assert previous is not None
                self.registry.blobs.release(previous.sha256)
            raise
        if replaced:
            assert previous is not None
            self._superseded.append((self._next_token(), previous.sha256))
            self._changed(binary_id)
        self._broadcast(binary, removed=False)
        log.info("binary %s (%s) is now version %d", binary_id, name, binary.version)
        if path is not None:
            self._watch(self.watched_paths())
        self.collect()
        return binary

    def _broadcast(self, binary: p.BinaryInfo, removed: bool) -> None:
        self._publish(p.encode(p.Broadcast(sha256=binary.sha256,
                                           artifact_path=str(self._artifact_path(binary.sha256)),
                                           removed=removed)))

    def _broadcast_removed(self, sha256: str) -> None:
        self._publish(p.encode(p.Broadcast(sha256=sha256,
                                           artifact_path=str(self._artifact_path(sha256)),
                                           removed=True)))


@dataclass(frozen=True, slots=True)
class _Stored:
    """A module's bytes stored as a blob (and held for the load that stored them)."""

    sha256: str
    size: int
    blob_path: str
    artifact_exists: bool


def _once(staged: Staged) -> Staged:
    """`staged`, called at most once: a load gets exactly one reply."""
    called = False

    def once(binary: p.BinaryInfo | None, error: WasmCoreError | None) -> None:
        nonlocal called
        if not called:
            called = True
            staged(binary, error)

    return once


def _storage_error(exc: BaseException, what: str) -> StorageError:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return StorageError(f"the server could not store this {what} ({reason}); nothing was "
                        "changed. Retry once the server's data dir has room and is writable "
                        "(the operator sees the cause in its log)")


def _stored_error(error: BaseException | None, what: str) -> WasmCoreError:
    """What a failure to read or store a module means for its client."""
    if isinstance(error, WasmCoreError):
        return error
    if isinstance(error, OSError):
        log.error("cannot store a module for a %s: %s", what, error)
        return _storage_error(error, what)
    log.error("internal error storing a module for a %s: %r", what, error)
    return InternalError(f"internal error storing the module: {error!r}; please report it")


def _loaded(binary: p.BinaryInfo, changed: bool, watched: bool) -> p.Loaded:
    return p.Loaded(id=0, binary_id=binary.binary_id, version=binary.version,
                    changed=changed, sha256=binary.sha256, kind=binary.kind,
                    exports=binary.exports, watched=watched)


def _error_from_frames(code: str, frames: list[zmq.Frame]) -> WasmCoreError:
    try:
        reply = p.reply_decoder.decode(frames[0].bytes)
        if isinstance(reply, p.ErrorReply):
            return error_from_code(reply.code, reply.message, reply.details)
    except (msgspec.DecodeError, IndexError):
        pass
    return error_from_code(code, "the worker reported an error without details")
