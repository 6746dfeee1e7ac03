"""The supervisor's half of the OS sandbox its workers put themselves in
(sandbox_worker/os_sandbox.py): the settings each worker starts with and, when the service runs
as root, the unprivileged user they switch to and the access that user needs.

A worker running as `sandbox.user` must still reach: its two ipc sockets (connect needs write
permission on the socket file), the artifact directory (it writes compiled modules there and
maps them), the shared-memory directory (it reads clients' input segments and writes output
segments), the blob store (it compiles from it), the key-value state's directory (its
SQLite database, which workers create and write) and the WASI scratch root (it creates
its executions' /tmp directories there). All of it through a group, the sandbox
group: the supervisor gives that group access to the service's own directories, setgid, so
what is created in them later belongs to the group too; it runs with umask 027 from then on
(files readable by their group, nobody else); clients make their segments group-readable and
-writable in a setgid directory (protocol/shm.py); the blob store writes blobs 0640 in
02750 directories of the group (supervisor/registry.py, `blob_group`). The directory of the
sockets is shared when it is the runtime dir or private to the service's user (nobody else
may enter it); other directories (those above these, or an operator's endpoint directory
that others may enter) are only checked: if one is in the way, the service refuses to start
and names it.
"""

from __future__ import annotations

import ctypes
import grp
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

from wasmcore.protocol.endpoints import runtime_dir
from wasmcore.protocol.limits import MiB
from wasmcore.protocol.settings import OsSandboxSettings
from wasmcore.supervisor.config import Config

# RLIMIT_FSIZE when not configured: the largest file a worker writes is a compiled artifact.
# bench/bench_artifact_size.py measured 0.7-6x its module's size for ordinary code, up to 14x
# for call-dense code and 27x for the densest found (empty loops, each given an epoch and a
# fuel check): 32x never fails a module the service accepts. Output segments are bounded by
# limits.output_bytes.
ARTIFACT_SIZE_FACTOR = 32

# Modes of the service's own directories while workers run as the sandbox user.
_SOCKET_MODE = 0o660  # connect needs write; root (owner) and the group only
_RUNTIME_DIR_MODE = 0o710  # search only: workers open their sockets by name, list nothing
_SHARED_DIR_MODE = 0o2730  # artifacts, segments: create and open by name, no listing
_DATA_DIR_MODE = 0o710
_STATE_DIR_MODE = 0o2770  # the key-value database's directory: workers write in it
_UMASK = 0o027
_PR_SET_DUMPABLE = 4


class ConfinementError(RuntimeError):
    """The workers' user cannot be set up; the message says what to change."""


@dataclass(frozen=True, slots=True)
class WorkerUser:
    name: str
    uid: int
    group: str
    gid: int

    def __str__(self) -> str:
        return f"{self.name} (uid {self.uid}) / {self.group} (gid {self.gid})"


def resolve_user(config: Config, euid: int | None = None) -> WorkerUser | None:
    """The user workers switch to: only when the service runs as root, the sandbox is on
    and a user is configured."""
    sandbox = config.sandbox
    euid = os.geteuid() if euid is None else euid
    if euid != 0 or not sandbox.enabled or not sandbox.user:
        return None
    try:
        account = pwd.getpwnam(sandbox.user)
    except KeyError:
        raise ConfinementError(
            f"sandbox.user {sandbox.user!r} does not exist on this host: create it, name "
            "another, or set it to \"\" to keep workers running as root") from None
    if account.pw_uid == 0:
        raise ConfinementError(f"sandbox.user {sandbox.user!r} is root: name an unprivileged "
                               "user, or set it to \"\" to keep workers running as root")
    gid = account.pw_gid
    group_name = sandbox.group
    if group_name:
        try:
            gid = grp.getgrnam(group_name).gr_gid
        except KeyError:
            raise ConfinementError(f"sandbox.group {group_name!r} does not exist on this "
                                   "host") from None
    else:
        try:
            group_name = grp.getgrgid(gid).gr_name
        except KeyError:
            group_name = str(gid)
    if gid == 0:
        raise ConfinementError("the sandbox group is root's group: name another one in "
                               "sandbox.group")
    return WorkerUser(sandbox.user, account.pw_uid, group_name, gid)


def max_file_bytes(config: Config) -> int:
    if config.sandbox.max_file_mb > 0:
        return config.sandbox.max_file_mb * MiB
    return max(config.limits.output_bytes,
               ARTIFACT_SIZE_FACTOR * config.server.max_payload_bytes)


class Confinement:
    """Decided at start: who workers run as and what they must reach. The rest of a worker's
    sandbox settings follow the config, so a reload applies to the workers started after it.
    The user and its group need a restart (the directories were prepared for them)."""

    def __init__(self, user: WorkerUser | None, enabled: bool = True) -> None:
        self.user = user
        self.enabled = enabled
        self._reach: dict[str, str] = {}

    @classmethod
    def from_config(cls, config: Config) -> Confinement:
        return cls(resolve_user(config), config.sandbox.enabled)

    @property
    def blob_group(self) -> int:
        """The group the blob store shares its blobs with (workers compile from them), or -1
        when workers keep the service's user and blobs stay owner-only."""
        return self.user.gid if self.user else -1

    def settings(self, config: Config) -> OsSandboxSettings:
        sandbox = config.sandbox
        user = self.user if sandbox.enabled else None
        return OsSandboxSettings(
            enabled=sandbox.enabled,
            seccomp=sandbox.seccomp,
            seccomp_action=sandbox.seccomp_action,
            uid=user.uid if user else -1,
            gid=user.gid if user else -1,
            max_open_files=sandbox.max_open_files,
            max_file_bytes=max_file_bytes(config),
            reach=dict(self._reach) if user else {},
        )

    def grant(self, *, sockets: list[str], data_dir: str, artifact_dir: str,
              shm_dir: str | None, state_dir: str | None = None,
              scratch_dir: str | None = None) -> None:
        """Give the sandbox group what workers need, then check that they can get there.
        Called once the sockets are bound. When workers keep the service's user, only makes
        the supervisor not dumpable."""
        user = self.user
        if user is None:
            if self.enabled:
                # Workers keep this process's user: one that broke out could otherwise open
                # /proc/<supervisor>/mem, which the kernel allows a process of the same user
                # unless the target is not dumpable (or Yama restricts ptrace).
                _not_dumpable()
            return
        os.umask(_UMASK)
        socket_paths = [Path(s[len("ipc://"):]) for s in sockets]
        for directory in {path.parent for path in socket_paths}:
            # Ours: the runtime dir, or one only this user may enter (the service's private
            # socket dir). Any other endpoint's directory is the operator's, only checked.
            # The group may then enter, but never connect to the client socket beside the
            # workers' (it is not group-writable): server.py judges that.
            if directory == runtime_dir() or _private_to_me(directory):
                _share(directory, user.gid, _RUNTIME_DIR_MODE)
        for path in socket_paths:
            _share(path, user.gid, _SOCKET_MODE)
            self._reach[str(path)] = "w"
        for directory in filter(None, [artifact_dir, shm_dir]):
            _share(Path(directory), user.gid, _SHARED_DIR_MODE)
            self._reach[directory] = "wx"
        # The blob store below gives its group read itself (registry.py, `blob_group`).
        _share(Path(data_dir), user.gid, _DATA_DIR_MODE)
        _unshare_files(Path(data_dir))
        self._reach[str(Path(data_dir) / "blobs")] = "x"
        if state_dir:
            # The key-value database: workers create it, and SQLite its -wal and -shm files.
            _share(Path(state_dir), user.gid, _STATE_DIR_MODE)
            for entry in os.scandir(state_dir):
                if entry.is_file(follow_symlinks=False):
                    os.chown(entry.path, -1, user.gid, follow_symlinks=False)
                    os.chmod(entry.path, 0o660)
            self._reach[state_dir] = "rwx"
        if scratch_dir:  # workers create their executions' WASI scratch directories in it
            _share(Path(scratch_dir), user.gid, _SHARED_DIR_MODE)
            self._reach[scratch_dir] = "wx"
        for path, modes in self._reach.items():
            blocked = _first_blocking(Path(path), modes, user)
            if blocked is not None:
                raise ConfinementError(
                    f"workers run as {user} but cannot reach {path}: {blocked}. Put it where "
                    "they can (server.data_dir, server.endpoint, server.artifact_dir, "
                    "server.shm_dir: e.g. /var/lib/wasm-core and /run/wasm-core), let the "
                    f"group search that directory if it is the service's own (chgrp "
                    f"{user.group} DIR; chmod g+x DIR), or set `[sandbox] user = \"\"` to keep "
                    "workers running as root (docs/operations.md, Defence in depth)")


def _not_dumpable() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)


def _share(path: Path, gid: int, mode: int) -> None:
    os.chown(path, -1, gid, follow_symlinks=False)
    os.chmod(path, mode)


def _unshare_files(directory: Path) -> None:
    """The registry beside the blobs: workers pass through this directory, so its files lose
    what they gave everyone (SQLite's -wal and -shm files copy the database's mode)."""
    for entry in os.scandir(directory):
        if entry.is_file(follow_symlinks=False):
            mode = stat.S_IMODE(entry.stat(follow_symlinks=False).st_mode)
            os.chmod(entry.path, mode & ~0o007)


def _private_to_me(directory: Path) -> bool:
    try:
        info = directory.lstat()
    except OSError:
        return False
    return (stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid()
            and info.st_mode & 0o077 == 0)


def _allows(info: os.stat_result, user: WorkerUser, modes: str) -> bool:
    if info.st_uid == user.uid:
        shift = 6
    elif info.st_gid == user.gid:
        shift = 3
    else:
        shift = 0
    bits = {"r": 4, "w": 2, "x": 1}
    return all(info.st_mode >> shift & bits[m] for m in modes)


def _first_blocking(path: Path, modes: str, user: WorkerUser) -> str | None:
    """Why `user` (with only its group) could not use `path` so, by mode bits; None if it
    can. The worker checks again for real (ACLs, security modules) once it has switched."""
    path = path.absolute()
    for directory in reversed(path.parents):
        try:
            if not _allows(directory.stat(), user, "x"):
                return f"{directory} is not searchable by them"
        except OSError as exc:
            return f"{directory}: {exc.strerror}"
    try:
        if not _allows(path.stat(), user, modes):
            return f"{path} lacks {modes!r} for them"
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    return None
