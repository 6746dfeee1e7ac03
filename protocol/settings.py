"""What the supervisor tells a worker when it starts one (JSON on the worker's command line),
and the exit codes a worker reports back. The supervisor starts workers by module name and
never imports the worker's runtime: this is all the two share about starting.
"""

from __future__ import annotations

import msgspec

from wasmcore.protocol.limits import Limits
from wasmcore.protocol.messages import HostMethodTable

WORKER_MODULE = "wasmcore.sandbox_worker"

# Exit codes the supervisor reads (gunicorn's arbiter does the same with WORKER_BOOT_ERROR).
EXIT_OK = 0
EXIT_BOOT_ERROR = 3
EXIT_PARENT_GONE = 4

# Worker roles: an execution worker runs jobs and maps artifacts; a compile worker (the
# compile lane) only compiles untrusted modules into artifacts, at a lower CPU priority.
ROLE_EXECUTE = "execute"
ROLE_COMPILE = "compile"


class SandboxConfig(msgspec.Struct, frozen=True):
    default_limits: Limits = Limits()
    max_wasm_stack: int = 512 * 1024  # engine-wide (wasmtime Config.max_wasm_stack)
    epoch_tick_ms: float = 1.0  # ticker period; timeout resolution
    cache_size: int = 256  # compiled modules kept (LRU by content hash)
    # Pooling instance allocator: instance/memory slots reused across executions instead of
    # an mmap + page faults + munmap per execution. 0 = wasmtime's on-demand allocator.
    # Only one execution is live at a time, so a few slots suffice.
    pool_slots: int = 16
    # Bytes of each memory/table slot reset with memset (kept resident) instead of madvise.
    keep_resident_bytes: int = 64 * 1024
    # Tick with a GIL-free POSIX timer (Linux) instead of a Python thread; see ticker.py.
    native_ticker: bool = True
    # The most linear memory any job may ask for: the size of a pool memory slot.
    # 0: default_limits.memory_bytes.
    max_memory_bytes: int = 0


class OsSandboxSettings(msgspec.Struct, frozen=True, kw_only=True):
    """The OS sandbox under wasm (sandbox_worker/os_sandbox.py). The defaults are the safe
    ones: a worker started without these settings still confines itself."""

    enabled: bool = True  # no_new_privs, not dumpable, rlimits; seccomp and the user below
    seccomp: bool = True  # a worker that cannot install its filter refuses to start
    seccomp_action: str = "errno"  # "errno": forbidden calls fail with EPERM; "kill": SIGSYS
    uid: int = -1  # switch to this user and group after connecting (-1: stay)
    gid: int = -1
    max_open_files: int = 1024  # RLIMIT_NOFILE
    max_file_bytes: int = 0  # RLIMIT_FSIZE; 0: not set
    # Paths the worker must reach once it runs as `uid`: sockets ("w": connect), directories
    # ("wx": create files in, "x": open known names in, "rx": read). Checked at boot, so a
    # worker that could not do its job refuses to start and says which path is in the way.
    reach: dict[str, str] = {}


class WorkerSettings(msgspec.Struct, kw_only=True):
    worker_id: str
    back_endpoint: str
    pub_endpoint: str
    parent_pid: int
    sandbox: SandboxConfig = SandboxConfig()
    heartbeat_interval_ms: int = 250
    rlimit_data_bytes: int = 0
    shm_dir: str = ""  # empty: shared-memory payloads are off
    shm_threshold_bytes: int = 256 * 1024
    os_sandbox: OsSandboxSettings = OsSandboxSettings()
    role: str = ROLE_EXECUTE
    nice: int = 0  # added to the worker's CPU niceness at start (compile workers: lower priority)
    # Host methods at start: their targets are imported before the worker confines itself.
    host_methods: HostMethodTable = HostMethodTable()
    # Where this worker creates its executions' WASI scratch directories; empty: none.
    scratch_dir: str = ""
    # The direct lane: the worker binds ipc://<this><its id>; empty: it serves none.
    direct_socket_prefix: str = ""
