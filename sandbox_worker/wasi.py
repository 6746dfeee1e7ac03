"""WASI preview 1 context for one execution: stdin = input, stdout/stderr captured in memory,
the request's arguments, a private scratch directory at /tmp and the operator's read-only dirs.

Nothing of the host leaks in: no inherited env/args/stdio, and no directory but the two kinds
below. stdout goes through an in-process callback that enforces the output cap *while* the
plugin writes (a refused write returns EFBIG to the plugin), so a flooding plugin cannot grow
host memory; it is then stopped by fuel or the timeout if it keeps trying.

Files (only for a module that imports `path_open`, the one way WASI opens a file):
* `/tmp`: an empty directory per execution, under the worker's scratch root with a random
  name and mode 0700, emptied when the execution ends (then reused: `ScratchDirs`). Over
  its cap the run fails with SCRATCH_LIMIT. WASI gives the host no hook on each write, so
  the size is measured instead (`scratch_usage`): every 10 ms while the module runs
  (`ScratchWatch`, which stops it the way a timeout does) and once more when it has ended.
  A module can therefore write past the cap by what it writes in one interval (plus one
  write call) before it is stopped.
* the binary's `dirs` from the config, mapped read-only (no write, create, rename or unlink
  through WASI). Never a path from a client.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import wasmtime

from wasmcore.protocol.errors import BadRequest, InternalError, OutputLimit, ScratchLimit

from . import _raw
from .host import HostState, InputSource

ARGV0 = "plugin"
SCRATCH_GUEST_PATH = "/tmp"
# Every file or directory left in a scratch directory counts at least this much (its entry
# and inode cost the disk something even when empty).
_ENTRY_BYTES = 512
WATCH_INTERVAL_S = 0.01
_WATCH_IDLE_S = 1.0  # the watch thread sleeps after this long without a scratch directory


@dataclass(frozen=True, slots=True)
class WasiFiles:
    """What one execution of a WASI module gets beyond stdin and env."""

    args: tuple[str, ...] = ()  # argv[1:]
    argv0: str = ARGV0  # the binary's name in the service
    dirs: tuple[tuple[str, str], ...] = ()  # (guest path, host path), mapped read-only
    scratch_root: str = ""  # where the /tmp directory is made; "": no /tmp
    scratch_bytes: int = 0  # its cap; 0: no /tmp


def check_args(args: tuple[str, ...]) -> None:
    for arg in args:
        if "\0" in arg:
            raise BadRequest("an argument contains a NUL character, which WASI cannot pass",
                             {"arg": arg[:64]})


class ScratchDirs:
    """The empty directory a Sandbox hands to its next execution as /tmp, per scratch root.

    Why reuse: creating and removing a directory costs ~150-250 us on an ext4 disk (against
    ~6 us to check that one is empty), more than a small WASI run itself. A directory is
    handed out again only once it is empty again (`Scratch.finish`); otherwise it is dropped
    and a new one made. Names are `s<worker pid>-<random>`, mode 0700: the supervisor removes
    those of workers that are gone (supervisor/scratch.py)."""

    def __init__(self) -> None:
        self._empty: dict[str, str] = {}

    def take(self, root: str) -> str:
        path = self._empty.pop(root, None)
        if path is not None:
            return path
        path = os.path.join(root, f"s{os.getpid()}-{secrets.token_hex(8)}")
        try:
            os.mkdir(path, 0o700)
        except OSError as exc:
            raise InternalError(
                f"cannot create the execution's scratch directory in {root}: {exc.strerror}; "
                "the operator can set [wasi] scratch_mb = 0 to run without one",
                {"scratch_root": root}) from None
        return path

    def give_back(self, root: str, path: str) -> None:
        self._empty[root] = path

    def close(self) -> None:
        """Remove the kept directories (empty by construction)."""
        for path in self._empty.values():
            try:
                os.rmdir(path)
            except OSError:
                pass
        self._empty.clear()


class Scratch:
    """One execution's /tmp: empty at the start, measured, and emptied when it ends."""

    def __init__(self, dirs: ScratchDirs, root: str, cap: int) -> None:
        self.cap = cap
        self.seen = 0  # the most the watch measured while the module ran
        self._dirs = dirs
        self._root = root
        self.path = dirs.take(root)

    def finish(self) -> ScratchLimit | None:
        """Empty the directory (and hand it back for the next execution only if that
        worked); the error to report if the module put too much in it."""
        try:
            used = max(scratch_usage(self.path), self.seen)
        finally:
            # Handed out again only when seen empty: never on a measurement's word alone.
            if _emptied(self.path):
                self._dirs.give_back(self._root, self.path)
            else:
                shutil.rmtree(self.path, ignore_errors=True)
        if used <= self.cap:
            return None
        return ScratchLimit(
            f"the plugin put {used} bytes in its scratch directory /tmp, over the "
            f"{self.cap}-byte limit ([wasi] scratch_mb): have it write less, or ask the "
            "operator for a larger scratch_mb", {"scratch_bytes": used, "limit": self.cap})


def _emptied(path: str) -> bool:
    """Remove everything in `path` (not `path` itself); whether it is empty now."""
    try:
        with os.scandir(path) as found:
            entries = list(found)
        if not entries:
            return True
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
        return not os.listdir(path)
    except OSError:
        return False


class ScratchWatch:
    """Measures the running execution's scratch directory every WATCH_INTERVAL_S from a
    thread of its own; past the cap it calls `stop` (the sandbox ends the execution through
    the engine's epoch, as a timeout does). One per Sandbox, started on first use.

    The thread polls while executions with a scratch directory keep coming and sleeps after
    a second without any, so a busy worker pays no thread wake-up per execution."""

    def __init__(self, stop: Callable[[], None]) -> None:
        self._stop = stop
        self._lock = threading.Lock()
        self._current: Scratch | None = None
        self._sleeping = False
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, scratch: Scratch) -> None:
        with self._lock:
            self._current = scratch
            sleeping = self._sleeping
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="scratch-watch",
                                            daemon=True)
            self._thread.start()
        elif sleeping:
            self._wake.set()

    def unwatch(self) -> None:
        """After this returns, `stop` is not called for the scratch that was watched."""
        with self._lock:
            self._current = None

    def _loop(self) -> None:
        idle_since = time.monotonic()
        while True:
            with self._lock:
                scratch = self._current
            if scratch is not None:
                idle_since = time.monotonic()
                used = scratch_usage(scratch.path)
                with self._lock:
                    if self._current is scratch and used > scratch.cap:
                        scratch.seen = used
                        self._current = None
                        self._stop()
            elif time.monotonic() - idle_since > _WATCH_IDLE_S:
                with self._lock:
                    self._sleeping = self._current is None
                if self._sleeping:
                    self._wake.wait()
                    self._wake.clear()
                    with self._lock:
                        self._sleeping = False
                idle_since = time.monotonic()
                continue
            time.sleep(WATCH_INTERVAL_S)


def scratch_usage(path: str) -> int:
    """Bytes a directory tree takes: each file by the larger of its size and its blocks (a
    sparse file counts whole), each entry at least _ENTRY_BYTES. Follows no symlink."""
    total = 0
    pending = [path]
    while pending:
        try:
            entries = list(os.scandir(pending.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            total += max(info.st_size, info.st_blocks * 512, _ENTRY_BYTES)
            if entry.is_dir(follow_symlinks=False):
                pending.append(entry.path)
    return total


class StderrSink:
    """Collects stderr bytes (bounded by the log budget) and turns them into log lines."""

    def __init__(self, state: HostState) -> None:
        self._state = state
        self._buffer = bytearray()
        self._room = max(0, state.log_cap - state.log_len)

    def write(self, data: bytes) -> None:
        if len(data) > self._room:
            data = data[: self._room]
            self._state.logs_truncated = True
        self._room -= len(data)
        self._buffer += data

    def flush(self) -> None:
        """Move collected bytes into the log lines (called once, after the run)."""
        if self._buffer:
            self._state.add_log_stream(bytes(self._buffer))
            self._buffer.clear()


def make_wasi_config(
    state: HostState,
    env: dict[str, str],
    stdin: bytes | InputSource,
    stderr: StderrSink,
    *,
    stdout_is_output: bool,
    files: WasiFiles | None = None,
    scratch: Scratch | None = None,
    map_dirs: bool = False,
) -> wasmtime.WasiConfig:
    """A WasiConfig wired to `state`. `stdout_is_output=False` sends stdout to the log
    (core-ABI modules that happen to link WASI: their output channel is host.output).
    `map_dirs`: the module can open files (the operator's dirs are opened only then)."""
    config = wasmtime.WasiConfig()
    config.argv = [files.argv0, *files.args] if files is not None else [ARGV0]
    if scratch is not None:
        config.preopen_dir(scratch.path, SCRATCH_GUEST_PATH, True)
    if files is not None and map_dirs:
        for guest, host in files.dirs:
            try:
                config.preopen_dir(host, guest, False)  # read-only: dirs and files
            except wasmtime.WasmtimeError:
                raise InternalError(
                    f"cannot map {host} at {guest} for this binary: the worker cannot open "
                    f"it (as uid {os.getuid()}): the operator should fix [binaries] dirs or "
                    "the directory's permissions", {"dir": guest}) from None
    config.env = [(key, value) for key, value in env.items()]
    if stdin:
        _raw.set_stdin_bytes(config, stdin)

    def on_stdout(data: bytes) -> int | None:
        if state.output_len + len(data) > state.output_cap:
            if state.failure is None:
                state.failure = OutputLimit(
                    f"plugin output exceeds the {state.output_cap}-byte limit",
                    {"output_bytes": state.output_cap},
                )
            return -errno.EFBIG
        state.output.append(data)
        state.output_len += len(data)
        return None

    def on_stderr(data: bytes) -> None:
        stderr.write(data)

    config.stdout_custom = on_stdout if stdout_is_output else on_stderr
    config.stderr_custom = on_stderr
    return config
