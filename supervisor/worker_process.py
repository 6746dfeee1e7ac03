"""Worker processes as the supervisor sees them: spawn, signal through pidfds, reap, sample RSS.

Workers are started with spawn semantics (`python -m wasmcore.sandbox_worker`), never by
forking a process that already holds a ZeroMQ context or a wasmtime engine. Each worker's pidfd
is polled by the supervisor's loop: it turns readable the moment the process exits, so a death
is noticed at once, and signals sent through it can never hit a recycled PID.
"""

from __future__ import annotations

import enum
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import msgspec
import psutil

from wasmcore.protocol.settings import WORKER_MODULE, WorkerSettings


class WorkerState(enum.StrEnum):
    """The process's lifecycle; whether a ready worker is idle or busy is the scheduler's."""

    STARTING = "starting"
    READY = "ready"
    RETIRING = "retiring"  # finishes its jobs, takes no more, then exits
    DEAD = "dead"


class RestartCause(enum.StrEnum):
    CRASH = "crash"
    TIMEOUT = "timeout"
    MEMORY = "memory"
    RECYCLE = "recycle"
    HEARTBEAT = "heartbeat"
    START_FAILURE = "start_failure"


@dataclass(eq=False)
class WorkerHandle:
    slot: int
    worker_id: str
    process: subprocess.Popen[bytes]
    pidfd: int
    started_at: float
    recycle_after: int  # executions before it is replaced (jittered per worker)
    state: WorkerState = WorkerState.STARTING
    last_seen: float = field(default_factory=time.monotonic)
    rss_bytes: int = 0
    compiled: int = 0
    deserialized: int = 0
    kill_cause: RestartCause | None = None
    retire_cause: RestartCause | None = None
    replaced: bool = False  # a successor already holds this slot
    protections: list[str] = field(default_factory=list)  # its OS sandbox, from its Ready
    _ps: psutil.Process | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def sample_rss(self) -> int:
        """Resident set size in bytes (memory_info is ~5 us; full_info would be ~90 us)."""
        try:
            if self._ps is None:
                self._ps = psutil.Process(self.pid)
            self.rss_bytes = self._ps.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            self.rss_bytes = 0
        return self.rss_bytes

    def send_signal(self, signum: int) -> None:
        if self.pidfd < 0:
            return
        try:
            signal.pidfd_send_signal(self.pidfd, signum)
        except ProcessLookupError:
            pass

    def kill(self, cause: RestartCause) -> None:
        if self.kill_cause is None:
            self.kill_cause = cause
        self.send_signal(signal.SIGKILL)

    def reap(self) -> int | None:
        """The exit status once the process is gone (and reaped), else None."""
        code = self.process.poll()
        if code is not None and self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        return code


def spawn_worker(
    slot: int,
    generation: int,
    settings: WorkerSettings,
    python: str | None = None,
    prefix: str = "w",
) -> WorkerHandle:
    worker_id = f"{prefix}{slot}g{generation}p{os.getpid()}"
    settings = msgspec.structs.replace(settings, worker_id=worker_id, parent_pid=os.getpid())
    argv = [python or sys.executable, "-m", WORKER_MODULE]
    argv.append(msgspec.json.encode(settings).decode())
    process = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        close_fds=True,
        # Own process group: a terminal's Ctrl-C reaches the supervisor only, which drains.
        process_group=0,
    )
    if settings.nice:
        # Now, while it is still one thread starting Python: its imports and every thread it
        # starts run at this priority too (the worker sets it again itself, for certain).
        try:
            os.setpriority(os.PRIO_PROCESS, process.pid, settings.nice)
        except OSError:
            pass  # already gone: the loop sees it through its pidfd
    try:
        pidfd = os.pidfd_open(process.pid)
    except ProcessLookupError:
        pidfd = -1  # already gone and reaped; the loop sees it through poll()
    return WorkerHandle(
        slot=slot,
        worker_id=worker_id,
        process=process,
        pidfd=pidfd,
        started_at=time.time(),
        recycle_after=0,
    )
