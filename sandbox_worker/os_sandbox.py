"""The OS sandbox under the wasm sandbox: what a worker process may still do if a plugin ever
broke out of wasmtime into it.

Applied in two steps at boot (`worker.main`):

* `prepare`, before any thread exists: no_new_privs (every later thread inherits it), not
  dumpable (another process of the same user can neither ptrace this one nor open its
  /proc/<pid>/mem), and rlimits (no core files, bounded open files and file size). It also
  loads libseccomp, so a host without it fails here, before anything heavy starts.
* `confine`, once the sockets exist and before any wasm runs: switch to the unprivileged
  user (when the supervisor runs as root), check that every path the worker needs is still
  reachable, then install the seccomp filter on every thread at once (TSYNC: ZeroMQ's I/O
  threads and the epoch timer's thread already run).

The filter is a deny list over an allow-by-default policy: the calls a worker never makes
and an intruder wants (new programs and processes, other processes' memory and signals,
mounts and namespaces, kernel modules, network sockets, io_uring, which would bypass the
filter). An allow list would be tighter, but Python, glibc, wasmtime and ZeroMQ between them
use a long and version-dependent set of calls; a missing one would kill workers in
production. Forbidden calls fail with EPERM by default (`seccomp_action = "errno"`): the
request in flight gets an error that names the refusal, and a library that merely probes
keeps working. "kill" ends the worker with SIGSYS instead, for operators who prefer a loud
signal; the supervisor then reports WORKER_LOST and restarts it.

`protections` lists what is really in force, read back from /proc/self/status where the
kernel shows it; the worker reports them in its Ready message and `stats` shows them.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import resource
import socket
from collections.abc import Iterator
from types import ModuleType

from wasmcore.protocol.settings import OsSandboxSettings

_PR_SET_DUMPABLE = 4
_PR_SET_NO_NEW_PRIVS = 38
_CLONE_THREAD = 0x00010000
_TIOCSTI = 0x5412  # push bytes into a terminal's input: a classic escape through stderr's tty
_TIOCLINUX = 0x541C

# Refused outright (when this libseccomp knows the name; names unknown to it are skipped).
FORBIDDEN: tuple[str, ...] = (
    # new programs and processes (threads are allowed: see `_filter`)
    "execve", "execveat", "fork", "vfork",
    # other processes: debugging, memory, descriptors
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_open", "pidfd_getfd",
    "pidfd_send_signal", "tkill", "kcmp",
    # mounts, roots, namespaces
    "mount", "umount2", "pivot_root", "chroot", "fsopen", "fsconfig", "fsmount", "fspick",
    "move_mount", "open_tree", "mount_setattr", "unshare", "setns",
    # the kernel itself
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load",
    "reboot", "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key",
    "acct", "swapon", "swapoff", "syslog", "vhangup", "iopl", "ioperm", "quotactl",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "sethostname",
    "setdomainname", "open_by_handle_at", "name_to_handle_at", "lookup_dcookie",
    # io_uring runs operations (socket, openat...) without passing through this filter
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    # identity: the worker switched users (or chose not to) before the filter went on
    "setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid", "setgroups",
    "setfsuid", "setfsgid", "capset",
)

# Signals only to this process (glibc's abort() and raise() use tgkill on ourselves).
_SELF_SIGNALS = ("kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo")


class SandboxUnavailable(RuntimeError):
    """A protection the settings ask for cannot be put in place: the worker must not start."""


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, value: int) -> None:
    if _libc().prctl(option, value, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise SandboxUnavailable(f"prctl({option}, {value}) failed: {os.strerror(err)}")


# pyseccomp finds libc and libseccomp with ctypes.util.find_library, which runs `ldconfig -p`
# in a subprocess each time: ~170 ms of every worker start on the 2-core test VM, against
# ~2 ms for loading the well-known sonames directly (the same libraries).
_SONAMES = {"c": "libc.so.6", "seccomp": "libseccomp.so.2"}


@contextlib.contextmanager
def _sonames_first() -> Iterator[None]:
    original = ctypes.util.find_library

    def find_library(name: str) -> str | None:
        soname = _SONAMES.get(name)
        if soname is not None:
            try:
                ctypes.CDLL(soname)
                return soname
            except OSError:
                pass
        return original(name)

    ctypes.util.find_library = find_library
    try:
        yield
    finally:
        ctypes.util.find_library = original


def load_seccomp() -> ModuleType:
    """pyseccomp, over the system's libseccomp.so.2 (it raises RuntimeError without it)."""
    try:
        with _sonames_first():
            import pyseccomp
    except (ImportError, RuntimeError, OSError) as exc:
        raise SandboxUnavailable(
            f"cannot load libseccomp ({exc}); install the system package (Debian: libseccomp2) "
            "and the Python package pyseccomp, or turn the filter off with "
            "`[sandbox] seccomp = false` (or `enabled = false`) in the config") from None
    return pyseccomp


def prepare(settings: OsSandboxSettings) -> ModuleType | None:
    """Before any thread exists. Returns pyseccomp when the filter is wanted."""
    if not settings.enabled:
        return None
    seccomp = load_seccomp() if settings.seccomp else None
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)
    _prctl(_PR_SET_DUMPABLE, 0)
    _set_limit(resource.RLIMIT_CORE, 0)
    if settings.max_open_files > 0:
        _set_limit(resource.RLIMIT_NOFILE, settings.max_open_files)
    if settings.max_file_bytes > 0:
        # Python ignores SIGXFSZ: a write past the limit fails with EFBIG instead of killing.
        _set_limit(resource.RLIMIT_FSIZE, settings.max_file_bytes)
    return seccomp


def _set_limit(which: int, value: int) -> None:
    """Soft and hard: the worker cannot raise it again."""
    _, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(which, (value, value))


def confine(settings: OsSandboxSettings, seccomp: ModuleType | None) -> list[str]:
    """Once the sockets exist, before any wasm runs. Returns the protections in force."""
    if not settings.enabled:
        return []
    if settings.uid >= 0:
        drop_user(settings.uid, settings.gid)
    check_reach(settings.reach)
    if seccomp is not None:
        install_filter(seccomp, settings.seccomp_action)
    return protections(switched_user=settings.uid >= 0)


def drop_user(uid: int, gid: int) -> None:
    """All three ids of user and group, no supplementary groups; then prove it sticks.
    glibc applies set*id to every thread of the process, not just the caller."""
    if gid < 0:
        raise SandboxUnavailable("a user to switch to needs a group too")
    try:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError as exc:
        raise SandboxUnavailable(f"cannot switch to uid {uid} gid {gid}: {exc}") from None
    if uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:
            raise SandboxUnavailable("switched user but could become root again")


_ACCESS = {"r": os.R_OK, "w": os.W_OK, "x": os.X_OK}


def check_reach(reach: dict[str, str]) -> None:
    for path, modes in reach.items():
        mask = 0
        for letter in modes:
            mask |= _ACCESS[letter]
        if not os.access(path, mask):
            raise SandboxUnavailable(
                f"as uid {os.getuid()} gid {os.getgid()} this worker cannot {modes!r} {path}: "
                "give the sandbox group access to it and search access to every directory "
                "above it (docs/operations.md, Defence in depth), or set `[sandbox] user = \"\"`")


def build_filter(seccomp: ModuleType, action: str, pid: int) -> object:
    if action == "errno":
        deny = seccomp.ERRNO(errno.EPERM)
    elif action == "kill":
        deny = seccomp.KILL_PROCESS
    else:
        raise SandboxUnavailable(f"unknown seccomp action {action!r}: use \"errno\" or \"kill\"")
    rules = seccomp.SyscallFilter(seccomp.ALLOW)
    rules.set_attr(seccomp.Attr.ACT_BADARCH, seccomp.KILL_PROCESS)  # i386 int 0x80, x32
    rules.set_attr(seccomp.Attr.CTL_TSYNC, 1)  # every thread, not only this one
    rules.set_attr(seccomp.Attr.CTL_NNP, 1)
    arg = seccomp.Arg

    def rule(action_: int, name: str, *args: object) -> None:
        if seccomp.resolve_syscall(seccomp.Arch.NATIVE, name) != -1:  # -1: unknown name
            rules.add_rule(action_, name, *args)

    for name in FORBIDDEN:
        rule(deny, name)
    # glibc creates threads with clone3 and falls back to clone on ENOSYS; clone3's flags
    # live in memory a filter cannot read, so threads are made through clone, whose flags
    # it can: anything without CLONE_THREAD would be a new process.
    rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    rule(deny, "clone", arg(0, seccomp.MASKED_EQ, _CLONE_THREAD, 0))
    # ZeroMQ's ipc endpoints (and their reconnects) need AF_UNIX; nothing else.
    rule(deny, "socket", arg(0, seccomp.NE, socket.AF_UNIX))
    rule(deny, "socketpair", arg(0, seccomp.NE, socket.AF_UNIX))
    for name in _SELF_SIGNALS:
        rule(deny, name, arg(0, seccomp.NE, pid))
    rule(deny, "ioctl", arg(1, seccomp.MASKED_EQ, 0xFFFFFFFF, _TIOCSTI))
    rule(deny, "ioctl", arg(1, seccomp.MASKED_EQ, 0xFFFFFFFF, _TIOCLINUX))
    return rules


def install_filter(seccomp: ModuleType, action: str) -> None:
    rules = build_filter(seccomp, action, os.getpid())
    try:
        rules.load()  # type: ignore[attr-defined]
    except OSError as exc:
        raise SandboxUnavailable(f"cannot install the seccomp filter: {exc}") from None


def protections(switched_user: bool = False, status_path: str = "/proc/self/status"
                ) -> list[str]:
    """What the kernel says is in force for this process (read back, not assumed)."""
    fields: dict[str, str] = {}
    try:
        with open(status_path) as status:
            for line in status:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
    except OSError:
        return []
    active: list[str] = []
    if fields.get("NoNewPrivs") == "1":
        active.append("no_new_privs")
    if fields.get("Seccomp") == "2":
        active.append("seccomp")
    if not _dumpable():
        active.append("nondumpable")
    if resource.getrlimit(resource.RLIMIT_CORE) == (0, 0):
        active.append("rlimits")
    if switched_user:
        # Real, effective, saved and filesystem ids: all four must be the new user's.
        uids, gids = set(fields.get("Uid", "").split()), set(fields.get("Gid", "").split())
        if len(uids) == 1 and len(gids) == 1 and "0" not in uids:
            active.append(f"uid:{uids.pop()}")
            active.append(f"gid:{gids.pop()}")
    return active


def _dumpable() -> bool:
    return bool(_libc().prctl(3, 0, 0, 0, 0))  # PR_GET_DUMPABLE

