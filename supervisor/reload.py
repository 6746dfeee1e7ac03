"""Hot reload: watched module files become new versions, and a changed config file (or
SIGHUP) is applied without a restart, resizing the pool if need be.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import zmq

from wasmcore.protocol.errors import WasmCoreError
from wasmcore.supervisor.config import Config, parse_config, resolved
from wasmcore.supervisor.registry import Binary, Registry
from wasmcore.supervisor.restart_policy import RestartPolicy
from wasmcore.supervisor.watcher import FileWatcher
from wasmcore.supervisor.workers import RestartCause, WorkerHandle, WorkerState

log = logging.getLogger("wasmcore.supervisor")


class ReloadMixin:
    config: Config
    config_path: str | None
    config_error: str | None
    registry: Registry
    policy: RestartPolicy
    slots: list[WorkerHandle | None]
    spawn_at: dict[int, float]
    draining: bool
    watcher: FileWatcher
    watch_events: zmq.Socket
    _config_text: bytes
    _reloading: set[tuple[str, str]]

    if TYPE_CHECKING:  # provided by the other parts of Supervisor
        def stage_version(self, tenant: str, name: str, path: str | None, data: bytes,
                          sha256: str, binary_id: str, done: Any,
                          bounded: bool = True) -> None: ...
        def _spawn(self, slot: int) -> None: ...
        def _retire(self, handle: WorkerHandle, cause: RestartCause,
                    replace: bool = True) -> None: ...

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
            # The bytes just read, not a second read of the file: what is compared is what
            # gets applied. (ConfigError and a bad UTF-8 decode are both ValueErrors.)
            new = resolved(parse_config(text.decode("utf-8"), str(self.config_path)))
        except (ValueError, OSError) as exc:
            self.config_error = str(exc)
            log.error("%s: refused the new config, the running one stays: %s", why, exc)
            return
        fixed = ("endpoint", "data_dir", "artifact_dir", "shm_dir")
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
