"""Configuration: typed, validated TOML with a built-in default for every setting.

`load_config` refuses unknown keys and wrong types with a message naming the key and its line,
so a typo stops the service at start instead of silently using a default.
"""

from __future__ import annotations

import hashlib
import os
import re
import tomllib
from pathlib import Path

import msgspec

from wasmcore.protocol.endpoints import default_endpoint, runtime_dir
from wasmcore.protocol.limits import NO_FUEL_CAP, Limits

MiB = 1024 * 1024


class ServerConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    endpoint: str = ""  # empty: ipc://<runtime dir>/wasm-core.sock
    data_dir: str = ""  # empty: $XDG_DATA_HOME/wasm-core or ~/.local/share/wasm-core
    artifact_dir: str = ""  # empty: /dev/shm/wasm-core-<uid> (or the runtime dir)
    max_queue: int = 4096
    max_payload_bytes: int = 64 * MiB
    # Payloads at least this large travel through shared memory between a client on the
    # same host, the supervisor and the workers. Empty dir: this instance's own,
    # /dev/shm/wasm-core-<uid>/payloads-<hash of the endpoint>; "off" disables it.
    shm_dir: str = ""
    shm_threshold_bytes: int = 256 * 1024
    log_level: str = "info"
    # A request header frame over this is refused (PAYLOAD_TOO_LARGE) without being decoded.
    # An xpack frame may be EXECUTE_PACK_MAX_BYTES + PACKED_PAYLOAD_MAX_BYTES larger: its
    # small payloads ride inside it.
    max_header_bytes: int = 64 * 1024
    # Absolute directories whose module files the server may read and watch for any peer
    # (loads by path without bytes, hot reload). Other paths are only names for sent bytes,
    # unless every peer is the service's own user (a private ipc socket dir; operations.md).
    load_roots: list[str] = []
    # Payload bytes held for requests not yet answered (queued or on a worker), all tenants
    # together; each tenant also has its own bound ([tenants.<name>] max_queued_bytes).
    max_queued_bytes: int = 1024 * MiB
    # The most binaries one chain may name (BAD_REQUEST above it).
    max_chain_steps: int = 32
    # CURVE authentication of clients: "auto" (on tcp endpoints), "on" (ipc too), "off". With
    # it a tenant is proven by its key (`wasm-core tenant add`); docs/operations.md, section 7.
    curve: str = "auto"
    # Serve tcp without authentication: anyone who reaches the port may claim any tenant.
    # Only on a network you trust; logged as a warning at start.
    allow_unauthenticated_tcp: bool = False


# The most pool.unit_executions may be: a unit's deadline covers all of its executes.
MAX_UNIT_EXECUTIONS = 256


class PoolConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    workers: int = 0  # 0: one per core
    heartbeat_interval_ms: int = 250
    heartbeat_timeout_ms: int = 3000
    start_timeout_ms: int = 20000
    deadline_grace_ms: int = 1000
    watchdog_interval_ms: int = 250
    rss_soft_limit_mb: int = 768
    rss_hard_limit_mb: int = 1536
    rlimit_data_mb: int = 4096
    max_executions_per_worker: int = 200_000
    recycle_jitter: float = 0.1
    restart_backoff_initial_ms: int = 100
    restart_backoff_max_ms: int = 5000
    breaker_failures: int = 10
    breaker_window_s: float = 60.0
    shutdown_grace_ms: int = 10000
    python: str = ""  # interpreter for workers; empty: the supervisor's own
    # Epoch tick period: the resolution of execution timeouts. 1 ms ticks cost ~100 us of
    # round-trip latency through the service (measured), so the default is coarser.
    epoch_tick_ms: float = 10.0
    # Under load a worker may hold up to this many jobs of quick binaries (one wake-up, many
    # jobs), as long as their expected run time stays under 2 ms.
    prefetch: int = 64
    # Executes of one client pack with the same binary and limits run as one scheduling unit
    # (one job, one after another on one worker, each in a fresh store under its own
    # timeout) of at most this many, fewer as their expected run time reaches 2 ms. 1: off.
    unit_executions: int = 32
    # Direct lanes (ipc endpoint without CURVE only): a one-at-a-time client is leased an
    # idle worker and sends it executes of one binary directly, the supervisor off the path,
    # while another worker stays idle; revoked as soon as anyone's work waits.
    direct_lane: bool = True
    lease_executions: int = 1000  # the most executes one lease serves (and rate it reserves)
    lease_ms: int = 1000  # the longest a lease lasts before it goes back through the server


class LimitsConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What a request that asks for nothing gets, and (max_*) the most any request may ask
    for, unless its tenant has its own ceiling ([tenants.<name>] max_*)."""

    timeout_ms: int = 5000
    # 0: no fuel cap (fuel is metered and reported; the timeout stops long runs). A finite
    # default cap would stop compute-bound plugins long before their timeout on a fast
    # machine (2e9 units were ~0.26 s) and hide the timeout a request asked for.
    fuel: int = 0
    memory_mb: int = 64
    output_bytes: int = 16 * MiB
    log_bytes: int = 1 * MiB
    max_wasm_stack: int = 512 * 1024
    # The most a request may ask for (above it: QUOTA_EXCEEDED naming the key); a request
    # may ask for more than the defaults above, up to these. A maximum below its default
    # counts as the default (what a request that asks nothing gets is always allowed).
    max_timeout_ms: int = 60_000
    max_fuel: int = 0  # 0: any fuel cap may be asked for (the timeout still binds)
    # Also the size of each worker's instance-pool memory slot (fixed when a worker starts).
    max_memory_mb: int = 256

    def to_limits(self) -> Limits:
        return Limits(
            timeout_ms=self.timeout_ms,
            fuel=self.fuel or NO_FUEL_CAP,
            memory_bytes=self.memory_mb * MiB,
            output_bytes=self.output_bytes,
            log_bytes=self.log_bytes,
        )


class CompileConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The compile lane: worker processes that only compile, apart from the executing pool."""

    workers: int = 1  # compile worker processes
    timeout_ms: int = 60_000  # a compile past this gets TIMEOUT; its worker is replaced
    # Memory cap of a compile worker (the RSS kill; RLIMIT_DATA at twice it is the backstop):
    # a 30 MB module needs about 1 GiB. Past the pool's soft RSS limit it is recycled.
    memory_mb: int = 2048
    per_tenant: int = 1  # compiles of one tenant in the lane at a time; the rest wait


class BinaryConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Settings for one tenant's binaries of one name, under [tenants.<tenant>.binaries.<name>]
    (or the old [binaries.<name>], which applies to the tenant named `default` only)."""

    entries: list[str] = []  # allowed entry functions, tried in order when a call names none
    timeout_ms: int | None = None
    fuel: int | None = None
    memory_mb: int | None = None
    # With `entries`: when the entry tried fails (a trap or a plugin error), try the next one
    # on the list that the binary exports, instead of answering the failure.
    entry_fallback: bool = False
    # Host directories mapped read-only into this binary's WASI view, {guest path: host
    # path}, both absolute (e.g. {"/models" = "/srv/models"}). Only ever from this file.
    dirs: dict[str, str] = {}


class WasiConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What a WASI module may do with files ([wasi]; docs/operations.md)."""

    # Each execution of a module that opens files gets a private, empty directory at /tmp,
    # emptied after it; more than this in it stops the run with SCRATCH_LIMIT (measured
    # every 10 ms and at the end). 0: no scratch directory.
    scratch_mb: int = 16


class OsSandboxConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The OS sandbox under wasm, in every worker (docs/operations.md, Defence in depth)."""

    # Off: none of the below (no no_new_privs, rlimits, seccomp or user switch).
    enabled: bool = True
    # The seccomp filter; a worker that cannot install it (no libseccomp) refuses to start.
    seccomp: bool = True
    # What a forbidden system call gets: "errno" (fails with EPERM) or "kill" (SIGSYS).
    seccomp_action: str = "errno"
    # When the service runs as root, workers switch to this user; "" keeps them root.
    user: str = "nobody"
    # ...and to this group, which gets access to the directories workers use; "" is the
    # user's primary group.
    group: str = ""
    # RLIMIT_NOFILE in each worker.
    max_open_files: int = 1024
    # RLIMIT_FSIZE in each worker; 0 derives it: 32 x server.max_payload_bytes (a compiled
    # artifact measured at up to 27x its module), at least limits.output_bytes.
    max_file_mb: int = 0


class TenantConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One tenant's share and caps, under [tenants.<name>]; [tenants.default] applies to every
    tenant not named. A key left out of a table takes the built-in default below."""

    # Share of the workers' time while tenants compete: a tenant of weight 2 gets twice the
    # run time of one of weight 1.
    weight: int = 1
    # Jobs of this tenant on workers plus in the queue; past it, BUSY.
    max_pending: int = 1024
    # Payload bytes held for this tenant's unanswered requests; past it, QUOTA_EXCEEDED.
    max_queued_bytes: int = 256 * MiB
    # Quotas below: 0 is unlimited. Past one, QUOTA_EXCEEDED with its name, limit and use.
    max_binaries: int = 0  # binaries the tenant has loaded
    max_stored_bytes: int = 0  # sum of the sizes of its binaries' modules
    # Requests per second (a token bucket of `burst` tokens; burst 0: one second's worth).
    requests_per_s: float = 0.0
    burst: int = 0
    # Its compiles in the compile lane at a time; 0: compile.per_tenant.
    compile_concurrency: int = 0
    # Absolute directories the server may read this tenant's `load --path` files from, on top
    # of server.load_roots.
    load_roots: list[str] = []
    # The most a request of this tenant may ask for, instead of [limits] max_*; above it,
    # QUOTA_EXCEEDED. 0: [limits] max_timeout_ms, max_fuel, max_memory_mb.
    max_timeout_ms: int = 0
    max_fuel: int = 0
    max_memory_mb: int = 0
    # Per-binary settings of this tenant's binaries, by name: [tenants.<t>.binaries.<name>].
    # Never taken from [tenants.default]: one tenant's naming never picks up another's.
    binaries: dict[str, BinaryConfig] = {}
    # The tenant's key-value state (host methods kv.*): keys, and bytes of keys plus values
    # (JSON). Past one, kv.set answers QUOTA_EXCEEDED to the plugin. 0: unlimited.
    kv_max_keys: int = 10_000
    kv_max_bytes: int = 16 * MiB


class HostMethodConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One host method plugins may call by name: [host_methods."<name>"]."""

    # The Python callable, "package.module:function", importable by the workers' Python.
    target: str
    # Tenants allowed to call it; "*" (or ["*"]): every tenant. Empty: nobody.
    tenants: list[str] | str = []
    # A call running longer is interrupted (Python code) or its result discarded; the
    # plugin gets a TIMEOUT error either way.
    timeout_ms: int = 1000
    max_request_bytes: int = 64 * 1024
    max_response_bytes: int = 1 * MiB


_METHOD_TARGET = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def _default_tenants() -> dict[str, TenantConfig]:
    return {"default": TenantConfig()}


class Config(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    pool: PoolConfig = msgspec.field(default_factory=PoolConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    binaries: dict[str, BinaryConfig] = {}
    sandbox: OsSandboxConfig = msgspec.field(default_factory=OsSandboxConfig)
    tenants: dict[str, TenantConfig] = msgspec.field(default_factory=_default_tenants)
    compile: CompileConfig = msgspec.field(default_factory=CompileConfig)
    # Host methods plugins call with host.call, by name (docs/plugin-abi.md, section 5).
    host_methods: dict[str, HostMethodConfig] = {}
    wasi: WasiConfig = msgspec.field(default_factory=WasiConfig)

    def max_memory_bytes(self) -> int:
        """The most memory any request may get: the size of a worker's pool memory slot."""
        most = max([self.limits.max_memory_mb, self.limits.memory_mb]
                   + [t.max_memory_mb for t in self.tenants.values()])
        return most * MiB

    def tenant(self, name: str) -> TenantConfig:
        """The settings that apply to tenant `name`: its own table, else [tenants.default],
        else the built-in defaults."""
        return self.tenants.get(name) or self.tenants.get("default") or _BUILT_IN_TENANT

    def binary(self, tenant: str, name: str) -> BinaryConfig | None:
        """The settings of `tenant`'s binary `name`: from the tenant's own table only; the
        global [binaries.<name>] applies only to the tenant named `default`."""
        own = self.tenants.get(tenant)
        if own is not None and name in own.binaries:
            return own.binaries[name]
        return self.binaries.get(name) if tenant == "default" else None


_BUILT_IN_TENANT = TenantConfig()


class ConfigError(ValueError):
    """An invalid config file; the message names the key and, when found, its line."""


def load_config(path: str | os.PathLike[str] | None) -> Config:
    if path is None:
        return validate(Config())
    text = Path(path).read_text(encoding="utf-8")
    return parse_config(text, str(path))


def parse_config(text: str, source: str = "<config>") -> Config:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    try:
        config = msgspec.convert(raw, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(_locate(str(exc), text, source)) from None
    return validate(config, text, source)


def validate(config: Config, text: str = "", source: str = "<config>") -> Config:
    checks: list[tuple[str, bool, str]] = [
        ("pool.workers", config.pool.workers >= 0, "must be 0 (one per core) or more"),
        ("pool.heartbeat_interval_ms", config.pool.heartbeat_interval_ms > 0, "must be > 0"),
        ("pool.prefetch", config.pool.prefetch >= 1, "must be at least 1"),
        ("pool.unit_executions", 1 <= config.pool.unit_executions <= MAX_UNIT_EXECUTIONS,
         f"must be between 1 and {MAX_UNIT_EXECUTIONS}"),
        ("pool.lease_executions", 1 <= config.pool.lease_executions <= 1_000_000,
         "must be between 1 and 1000000"),
        ("pool.lease_ms", 1 <= config.pool.lease_ms <= 60_000, "must be between 1 and 60000"),
        ("pool.epoch_tick_ms", 0.1 <= config.pool.epoch_tick_ms <= 1000, "must be in [0.1, 1000]"),
        (
            "pool.heartbeat_timeout_ms",
            config.pool.heartbeat_timeout_ms > config.pool.heartbeat_interval_ms,
            "must be greater than heartbeat_interval_ms",
        ),
        (
            "pool.rss_hard_limit_mb",
            config.pool.rss_hard_limit_mb >= config.pool.rss_soft_limit_mb,
            "must be at least rss_soft_limit_mb",
        ),
        ("pool.max_executions_per_worker", config.pool.max_executions_per_worker > 0, "> 0"),
        ("pool.recycle_jitter", 0 <= config.pool.recycle_jitter < 1, "must be in [0, 1)"),
        ("server.max_queue", config.server.max_queue >= 0, "must be >= 0"),
        ("server.max_payload_bytes", config.server.max_payload_bytes > 0, "must be > 0"),
        ("server.shm_threshold_bytes", config.server.shm_threshold_bytes >= 0, "must be >= 0"),
        ("server.max_header_bytes", config.server.max_header_bytes >= 4096, "must be >= 4096"),
        ("server.load_roots", all(os.path.isabs(r) for r in config.server.load_roots),
         "must list absolute directories"),
        ("server.max_queued_bytes", config.server.max_queued_bytes >= 0, "must be >= 0"),
        ("server.max_chain_steps", config.server.max_chain_steps >= 1, "must be at least 1"),
        ("server.curve", config.server.curve in ("auto", "on", "off"),
         'must be "auto", "on" or "off"'),
        ("limits.timeout_ms", config.limits.timeout_ms > 0, "must be > 0"),
        ("limits.fuel", config.limits.fuel >= 0, "must be >= 0 (0: no fuel cap)"),
        ("limits.memory_mb", config.limits.memory_mb > 0, "must be > 0"),
        ("limits.output_bytes", config.limits.output_bytes > 0, "must be > 0"),
        ("limits.log_bytes", config.limits.log_bytes >= 0, "must be >= 0"),
        ("limits.max_wasm_stack", config.limits.max_wasm_stack >= 64 * 1024, ">= 65536"),
        ("limits.max_timeout_ms", config.limits.max_timeout_ms >= 0, "must be >= 0"),
        ("limits.max_fuel", config.limits.max_fuel >= 0, "must be >= 0 (0: no maximum)"),
        ("limits.max_memory_mb", config.limits.max_memory_mb >= 0, "must be >= 0"),
        ("sandbox.seccomp_action", config.sandbox.seccomp_action in ("errno", "kill"),
         'must be "errno" or "kill"'),
        ("sandbox.max_open_files", config.sandbox.max_open_files >= 64, "must be at least 64"),
        ("sandbox.max_file_mb", config.sandbox.max_file_mb >= 0, "must be >= 0"),
        ("compile.workers", config.compile.workers >= 1, "must be at least 1"),
        ("compile.timeout_ms", config.compile.timeout_ms > 0, "must be > 0"),
        ("compile.memory_mb", config.compile.memory_mb >= 128,
         "must be at least 128 (a compile worker needs about 40 MiB to start)"),
        ("compile.per_tenant", config.compile.per_tenant >= 1, "must be at least 1"),
    ]
    for name, tenant in config.tenants.items():
        checks += [
            (f"tenants.{name}.weight", tenant.weight >= 1, "must be at least 1"),
            (f"tenants.{name}.max_pending", tenant.max_pending >= 0, "must be >= 0"),
            (f"tenants.{name}.max_queued_bytes", tenant.max_queued_bytes >= 0, "must be >= 0"),
            (f"tenants.{name}.max_binaries", tenant.max_binaries >= 0, "must be >= 0"),
            (f"tenants.{name}.max_stored_bytes", tenant.max_stored_bytes >= 0, "must be >= 0"),
            (f"tenants.{name}.requests_per_s", tenant.requests_per_s >= 0, "must be >= 0"),
            (f"tenants.{name}.burst", tenant.burst >= 0, "must be >= 0"),
            (f"tenants.{name}.compile_concurrency", tenant.compile_concurrency >= 0,
             "must be >= 0 (0: compile.per_tenant)"),
            (f"tenants.{name}.load_roots", all(os.path.isabs(r) for r in tenant.load_roots),
             "must list absolute directories"),
            (f"tenants.{name}.max_timeout_ms", tenant.max_timeout_ms >= 0, "must be >= 0"),
            (f"tenants.{name}.max_fuel", tenant.max_fuel >= 0, "must be >= 0"),
            (f"tenants.{name}.max_memory_mb", tenant.max_memory_mb >= 0, "must be >= 0"),
            (f"tenants.{name}.kv_max_keys", tenant.kv_max_keys >= 0, "must be >= 0"),
            (f"tenants.{name}.kv_max_bytes", tenant.kv_max_bytes >= 0, "must be >= 0"),
        ]
    for name, method in config.host_methods.items():
        key = f'host_methods."{name}"'
        checks += [
            (key, 0 < len(name) <= 256 and not name.startswith("kv."),
             "needs a name of 1 to 256 characters, not starting with `kv.` (built in)"),
            (f"{key}.target", bool(_METHOD_TARGET.match(method.target)),
             'must be "package.module:function"'),
            (f"{key}.tenants", method.tenants == "*" or isinstance(method.tenants, list),
             'must be "*" or a list of tenant names'),
            (f"{key}.timeout_ms", method.timeout_ms > 0, "must be > 0"),
            (f"{key}.max_request_bytes", method.max_request_bytes > 0, "must be > 0"),
            (f"{key}.max_response_bytes", method.max_response_bytes > 0, "must be > 0"),
        ]
    checks.append(("wasi.scratch_mb", config.wasi.scratch_mb >= 0, "must be >= 0"))
    per_binary = [(f"binaries.{name}", binary) for name, binary in config.binaries.items()]
    per_binary += [(f"tenants.{tenant}.binaries.{name}", binary)
                   for tenant, table in config.tenants.items()
                   for name, binary in table.binaries.items()]
    for key, binary in per_binary:
        for guest, host in binary.dirs.items():
            checks.append((f"{key}.dirs", _valid_mapping(guest, host),
                           f"maps {guest!r} to {host!r}: both must be absolute paths, the "
                           "guest one normalised and not / or /tmp (the scratch directory)"))
    endpoint = config.server.endpoint
    checks.append(
        (
            "server.endpoint",
            endpoint == "" or endpoint.startswith(("ipc://", "tcp://")),
            "must start with ipc:// or tcp://",
        )
    )
    for key, ok, why in checks:
        if not ok:
            raise ConfigError(_with_line(f"{source}: `{key}` {why}", key, text))
    return config


def _valid_mapping(guest: str, host: str) -> bool:
    return (guest.startswith("/") and os.path.normpath(guest) == guest
            and guest not in ("/", "/tmp") and os.path.isabs(host) and "\0" not in host)


def _locate(message: str, text: str, source: str) -> str:
    """Turn msgspec's `... - at `$.pool.workers`` into a message with the key's line."""
    match = re.search(r"at `\$\.?([^`]*)`", message)
    key = match.group(1) if match else ""
    unknown = re.search(r"unknown field `([^`]*)`", message)
    if unknown:
        key = f"{key}.{unknown.group(1)}" if key else unknown.group(1)
    return _with_line(f"{source}: {message}", key, text)


def _with_line(message: str, dotted_key: str, text: str) -> str:
    line = _find_key_line(dotted_key, text)
    return f"{message} (line {line})" if line else message


def _find_key_line(dotted_key: str, text: str) -> int | None:
    if not dotted_key or not text:
        return None
    parts = [p.strip("[]'\"") for p in re.split(r"\.|\[", dotted_key) if p]
    leaf = parts[-1]
    table = ".".join(parts[:-1])
    current_table = ""
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        header = re.match(r"^\[+\s*([^\]]+?)\s*\]+", stripped)
        if header:
            current_table = header.group(1).replace('"', "")
            if current_table == ".".join(parts):
                return number
            continue
        key = re.match(r"^([A-Za-z0-9_\-\"]+)\s*=", stripped)
        if key and key.group(1).strip('"') == leaf and current_table == table:
            return number
    return None


# --------------------------------------------------------------------------- default places


def default_data_dir() -> Path:
    if os.geteuid() == 0:
        # A service run by root: its workers switch to an unprivileged user ([sandbox] user)
        # that must reach the blobs, which root's home (0700) would hide from them.
        return Path("/var/lib/wasm-core")
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "wasm-core"


def default_artifact_dir() -> Path:
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm / f"wasm-core-{os.getuid()}"
    return runtime_dir() / "artifacts"


def default_shm_dir(endpoint: str) -> Path:
    """The instance's own segment directory, named from its endpoint: instances never share
    one (whatever is left in one cannot reach another), and a restart finds its own again."""
    name = "payloads-" + hashlib.sha256(endpoint.encode()).hexdigest()[:16]
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm / f"wasm-core-{os.getuid()}" / name
    return runtime_dir() / name


def resolved(config: Config) -> Config:
    """The config with every empty place filled in with its default."""
    endpoint = config.server.endpoint or default_endpoint()
    server = msgspec.structs.replace(
        config.server,
        endpoint=endpoint,
        data_dir=config.server.data_dir or str(default_data_dir()),
        artifact_dir=config.server.artifact_dir or str(default_artifact_dir()),
        shm_dir=config.server.shm_dir or str(default_shm_dir(endpoint)),
    )
    pool = config.pool
    if pool.workers == 0:
        pool = msgspec.structs.replace(pool, workers=os.cpu_count() or 1)
    return msgspec.structs.replace(config, server=server, pool=pool)
