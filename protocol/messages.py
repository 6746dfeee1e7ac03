"""The wire protocol: msgspec MessagePack, tagged-union Structs, one typed Decoder per direction.

Framing. Every message is one or two ZeroMQ frames: a small MessagePack header and, for
operations that carry bytes (execute input, load data, execute output), a raw payload frame.
Keeping payloads out of the header means the supervisor routes large inputs without decoding
or copying them.

Client -> supervisor:   [Request header, payload?]
Supervisor -> client:   [Reply header, payload?]
Supervisor -> worker:   [Job header, payload?]
Worker -> supervisor:   [WorkerEvent header, client reply header?, payload?]

Every request carries a client-chosen `id`; its one reply carries the same `id`. New fields
always get defaults so older peers keep decoding.

Bounds. Nothing in a request header is trusted: the decoder itself refuses any string, list or
map longer than its bound (msgspec checks a container's length before building it), so a
header can never make the supervisor build a huge object. The server also refuses a header
frame over `server.max_header_bytes` before decoding it at all. The bounds are in
docs/protocol.md, section 8.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import msgspec

from .limits import Metering
from .shm import ShmRef

PROTOCOL_VERSION = 1
DEFAULT_TENANT = "default"

# --------------------------------------------------------------------------- request bounds

MAX_TENANT_CHARS = 256
MAX_NAME_CHARS = 256  # a binary's name (load)
MAX_ENTRY_CHARS = 256
MAX_BINARY_ID_CHARS = 64  # ids are UUIDs (36 characters)
MAX_PATH_CHARS = 4096  # PATH_MAX
# The wire bound on a chain's steps: generous, so the decoder never builds a huge list; the
# server's own (lower) step limit is a config check on top of it.
MAX_CHAIN_STEPS = 1024
MAX_BATCH_INPUTS = 4096
MAX_PACK_EXECUTES = 8192
MAX_ENV_ENTRIES = 256
MAX_ENV_KEY_CHARS = 256
MAX_ENV_VALUE_CHARS = 16_384
# A WASI command's arguments (argv[1:]): at most 256 of at most 4096 characters each (and the
# header as a whole stays under server.max_header_bytes).
MAX_ARGS = 256
MAX_ARG_CHARS = 4096

Tenant = Annotated[str, msgspec.Meta(max_length=MAX_TENANT_CHARS)]
BinaryId = Annotated[str, msgspec.Meta(max_length=MAX_BINARY_ID_CHARS)]
Entry = Annotated[str, msgspec.Meta(max_length=MAX_ENTRY_CHARS)]
Env = Annotated[
    dict[Annotated[str, msgspec.Meta(max_length=MAX_ENV_KEY_CHARS)],
         Annotated[str, msgspec.Meta(max_length=MAX_ENV_VALUE_CHARS)]],
    msgspec.Meta(max_length=MAX_ENV_ENTRIES),
]
Args = Annotated[list[Annotated[str, msgspec.Meta(max_length=MAX_ARG_CHARS)]],
                 msgspec.Meta(max_length=MAX_ARGS)]


# --------------------------------------------------------------------------- client requests


class Load(msgspec.Struct, tag="load", kw_only=True):
    """Load the payload frame's bytes under `path` (a file's identity) or `name`; with no
    payload, the server reads `path` itself, if it may (docs/operations.md, load roots)."""

    id: int = 0
    tenant: Tenant = DEFAULT_TENANT
    path: Annotated[str, msgspec.Meta(max_length=MAX_PATH_CHARS)] | None = None
    name: Annotated[str, msgspec.Meta(max_length=MAX_NAME_CHARS)] | None = None


class RunOptions(msgspec.Struct, kw_only=True):
    """What every request that runs wasm may ask for: lower limits (None or 0: the
    configured one), the environment the plugin sees, and a WASI module's arguments
    (argv[1:]; argv[0] is the binary's name)."""

    timeout_ms: int | None = None
    memory_mb: int | None = None
    fuel: int | None = None
    env: Env = {}
    args: Args = []


class Execute(RunOptions, tag="execute", kw_only=True):
    """Run one binary on the payload frame (the input), or on a shared-memory segment."""

    id: int = 0
    tenant: Tenant = DEFAULT_TENANT
    binary_id: BinaryId
    entry: Entry | None = None
    input_shm: ShmRef | None = None  # the input is in this segment (no payload frame)
    # A segment of the caller's that a large output may overwrite in place, once the input
    # has been read. None lent (or none usable): the output comes back inline. The server
    # never creates a segment for a client, nor takes an owner pid from one.
    output_shm_into: str = ""
    # The client can reach the server's ipc directory and asks for a direct lane: the
    # server may answer with `Executed.lease` (docs/protocol.md, "Direct lane").
    direct: bool = False


class ExecuteBatch(RunOptions, tag="execute_batch", kw_only=True):
    """Run one binary on each of `count` inputs (frames 2..count+1); one reply, one result
    per input, in order. A failing input fails only its own item."""

    id: int = 0
    tenant: Tenant = DEFAULT_TENANT
    binary_id: BinaryId
    count: Annotated[int, msgspec.Meta(le=MAX_BATCH_INPUTS)]
    entry: Entry | None = None


class Hello(msgspec.Struct, tag="hello", kw_only=True):
    """What the server offers: limits, and shared memory for clients on the same host."""

    id: int = 0
    tenant: Tenant = DEFAULT_TENANT


class Chain(RunOptions, tag="chain", kw_only=True):
    """Run binaries in order; each step's output is the next step's input."""

    id: int = 0
    tenant: Tenant = DEFAULT_TENANT
    binary_ids: Annotated[list[BinaryId], msgspec.Meta(max_length=MAX_CHAIN_STEPS)]


class ListBinaries(msgspec.Struct, tag="list", kw_only=True):
    id: int = 0
    tenant: Tenant = DEFAULT_TENANT


class Unload(msgspec.Struct, tag="unload", kw_only=True):
    id: int = 0
    tenant: Tenant = DEFAULT_TENANT
    binary_id: BinaryId


class Stats(msgspec.Struct, tag="stats", kw_only=True):
    id: int = 0
    tenant: Tenant = DEFAULT_TENANT
    # Every tenant's binaries, not only the caller's: for admins only (FORBIDDEN otherwise).
    all_tenants: bool = False


class ExecutePack(msgspec.Struct, tag="xpack", kw_only=True):
    """Many executes in one frame: `payloads[i]` is the input of `executes[i]` (None: no
    payload frame). Each is answered on its own, and from then on this connection's replies
    may come packed in ReplyPack frames. Why: ZeroMQ costs ~1.5 us per frame on each side;
    one frame for a burst of requests instead of two per request. Inputs that take a frame
    of their own (shared-memory segments, large payloads) go unpacked."""

    executes: Annotated[list[Execute], msgspec.Meta(max_length=MAX_PACK_EXECUTES)]
    payloads: Annotated[list[bytes | None], msgspec.Meta(max_length=MAX_PACK_EXECUTES)]


class UndecodedPack(msgspec.Struct, tag="xpack", kw_only=True):
    """An ExecutePack read with its executes left encoded, for a pack that failed to decode
    whole: each execute is then decoded (and, if malformed, refused) on its own, so one bad
    execute does not leave the others in its pack unanswered."""

    executes: Annotated[list[msgspec.Raw], msgspec.Meta(max_length=MAX_PACK_EXECUTES)]
    payloads: Annotated[list[bytes | None], msgspec.Meta(max_length=MAX_PACK_EXECUTES)]


Request = (Load | Execute | ExecuteBatch | Chain | ListBinaries | Unload | Stats | Hello
           | ExecutePack)


# A lease's token: random bytes the server made, the only proof a direct request carries.
LEASE_TOKEN_BYTES = 16
LeaseToken = Annotated[bytes, msgspec.Meta(max_length=64)]


class DirectExecute(msgspec.Struct, tag="direct", kw_only=True):
    """Client -> a leased worker's own socket (`DirectLease.endpoint`): run the leased
    binary, with the leased options, on the payload frame. Answered by the worker with
    Executed or ErrorReply, or LeaseEnded (send it through the server instead)."""

    id: int = 0
    token: LeaseToken
    # As in Execute: a segment of the caller's a large output may be written into.
    output_shm_into: Annotated[str, msgspec.Meta(max_length=64)] = ""


direct_decoder = msgspec.msgpack.Decoder(DirectExecute)


# --------------------------------------------------------------------------- replies


class Loaded(msgspec.Struct, tag="loaded", kw_only=True):
    id: int
    binary_id: str
    version: int
    changed: bool
    sha256: str
    kind: str = "core"
    exports: list[str] = []
    watched: bool = False  # the server watches `path` and reloads it when it changes


class Executed(msgspec.Struct, tag="executed", kw_only=True):
    """The output travels in the payload frame."""

    id: int
    logs: list[str] = []
    logs_truncated: bool = False
    metering: Metering = Metering()
    binary_id: str = ""
    version: int = 0
    worker_pid: int = 0
    # The output is in the segment the request lent (output_shm_into), which stays the
    # client's: read it, then reuse or remove it.
    output_shm: ShmRef | None = None
    # Only to an execute that asked (`direct`): the worker that ran it serves more executes
    # of the same binary with the same options directly, until the lease ends.
    lease: DirectLease | None = None


class DirectLease(msgspec.Struct, kw_only=True, array_like=True):
    """A direct lane: send DirectExecute with `token` to `endpoint` (the worker's own ipc
    socket) for executes of the binary and options of the execute that got it, at most
    `executions` of them; the server may end it sooner (LeaseEnded, LeaseLost)."""

    endpoint: str
    token: bytes
    executions: int
    max_input_bytes: int = 0  # a larger input goes through the server


class LeaseEnded(msgspec.Struct, tag="lease_ended", kw_only=True):
    """A worker's answer to a DirectExecute whose lease is over (used up, expired, revoked
    or unknown): nothing ran; send the execute through the server."""

    id: int


class LeaseLost(msgspec.Struct, tag="lease_lost", kw_only=True):
    """The server's message to the client holding a lease whose worker died (or was killed
    for a direct execute past its deadline): a direct execute waiting on it has failed with
    `code` (WORKER_LOST, TIMEOUT, MEMORY_LIMIT)."""

    id: int = 0
    token: bytes
    code: str
    message: str
    details: dict[str, Any] = {}


class BatchItem(msgspec.Struct, kw_only=True):
    """One input's outcome; its output is the matching payload frame (empty on error)."""

    code: str = ""  # empty: success
    message: str = ""
    details: dict[str, Any] = {}
    logs: list[str] = []
    metering: Metering = Metering()


class BatchExecuted(msgspec.Struct, tag="batch_executed", kw_only=True):
    id: int
    items: list[BatchItem] = []
    binary_id: str = ""
    version: int = 0
    worker_pid: int = 0


class LimitsOffer(msgspec.Struct, kw_only=True):
    """Per-execution limits for the asking tenant: what a request that asks for nothing
    gets, and the most it may ask for (above it: QUOTA_EXCEEDED)."""

    timeout_ms: int = 0
    max_timeout_ms: int = 0
    fuel: int = 0  # 0: no fuel cap (metered only; the timeout binds)
    max_fuel: int = 0  # 0: any fuel cap may be asked for
    memory_mb: int = 0
    max_memory_mb: int = 0
    output_bytes: int = 0  # server-wide; a request cannot change them
    log_bytes: int = 0


class Welcome(msgspec.Struct, tag="welcome", kw_only=True):
    id: int
    server_version: str
    protocol_version: int = PROTOCOL_VERSION
    max_payload_bytes: int = 0
    shm_dir: str = ""  # empty: shared-memory payloads are off
    shm_threshold_bytes: int = 0
    boot_id: str = ""  # a client with the same boot id shares the server's /dev/shm
    workers: int = 0
    # Last, with a default: a client built before it still decodes the reply.
    limits: LimitsOffer | None = None


class StepResult(msgspec.Struct, kw_only=True):
    binary_id: str
    version: int
    output_bytes: int
    logs: list[str] = []
    metering: Metering = Metering()


class Chained(msgspec.Struct, tag="chained", kw_only=True):
    """The final output travels in the payload frame."""

    id: int
    steps: list[StepResult] = []
    worker_pid: int = 0


class BinaryInfo(msgspec.Struct, kw_only=True):
    binary_id: str
    tenant: str
    name: str
    path: str | None
    version: int
    sha256: str
    size: int
    kind: str
    exports: list[str] = []
    executions: int = 0
    created_at: float = 0.0
    updated_at: float = 0.0
    last_error: str | None = None


class Listed(msgspec.Struct, tag="listed", kw_only=True):
    id: int
    binaries: list[BinaryInfo] = []


class Unloaded(msgspec.Struct, tag="unloaded", kw_only=True):
    id: int
    binary_id: str


class WorkerInfo(msgspec.Struct, kw_only=True):
    slot: int
    pid: int
    state: str
    rss_bytes: int
    executions: int
    started_at: float
    compiled: int = 0
    deserialized: int = 0
    # OS sandbox in force in this worker, as it reported at start: e.g. no_new_privs,
    # nondumpable, rlimits, seccomp, uid:65534, gid:65534. Empty: none.
    protections: list[str] = []
    # It serves a client's direct lane (state "idle": it takes no job until the lease is
    # revoked, which any waiting job does at once).
    leased: bool = False


class TenantUsage(msgspec.Struct, kw_only=True):
    """The calling tenant's use against its quotas ([tenants.<name>]; 0: unlimited)."""

    tenant: str
    pending: int = 0  # requests queued or running
    queued_bytes: int = 0  # payload bytes they hold
    binaries: int = 0
    stored_bytes: int = 0  # sum of its binaries' module sizes
    max_pending: int = 0
    max_queued_bytes: int = 0
    max_binaries: int = 0
    max_stored_bytes: int = 0
    requests_per_s: float = 0.0
    burst: int = 0
    max_timeout_ms: int = 0
    max_fuel: int = 0
    max_memory_mb: int = 0
    weight: int = 1


class StatsReply(msgspec.Struct, tag="stats", kw_only=True):
    id: int
    workers: list[WorkerInfo] = []
    binaries: list[BinaryInfo] = []
    queue_depth: int = 0
    in_flight: int = 0
    requests: int = 0
    errors_by_code: dict[str, int] = {}
    restarts_by_cause: dict[str, int] = {}
    uptime_s: float = 0.0
    config_error: str | None = None  # why the last config change was refused, if it was
    # What of the registry could not be read at start (skipped rows, a broken file kept).
    registry_problems: list[str] = []
    compile_workers: list[WorkerInfo] = []  # the compile lane's workers (not in `workers`)
    compile_queue_depth: int = 0  # loads waiting for a compile worker or their tenant's turn
    tenant_usage: TenantUsage | None = None  # the calling tenant's use against its quotas
    # Executes answered from units (several executes of one pack run as one job), since
    # start; admins only, like `requests`.
    unit_executes: int = 0
    # Executes workers ran on direct lanes (without the server in between), counted when
    # each lease ends; admins only.
    direct_executes: int = 0


class ErrorReply(msgspec.Struct, tag="error", kw_only=True):
    id: int
    code: str
    message: str
    details: dict[str, Any] = {}


SingleReply = (Loaded | Executed | BatchExecuted | Chained | Listed | Unloaded | StatsReply
               | Welcome | ErrorReply | LeaseEnded | LeaseLost)


class ReplyPack(msgspec.Struct, tag="rpack", kw_only=True):
    """Many replies in one frame, only to a connection that has sent an ExecutePack:
    `payloads[i]` is the payload frame of `replies[i]` (None: it has none)."""

    replies: list[SingleReply]
    payloads: list[bytes | None]


Reply = SingleReply | ReplyPack


# --------------------------------------------------------------------------- supervisor <-> worker


class ModuleRef(msgspec.Struct, kw_only=True, array_like=True):
    """Which exact module version a job needs, and where a worker can get it if it lacks it."""

    binary_id: str
    version: int
    sha256: str
    blob_path: str
    artifact_path: str


class WasiStep(msgspec.Struct, kw_only=True, array_like=True):
    """What one module of a run job sees of the WASI world beyond stdin and env: its argv[0]
    (the binary's name) and the directories the operator maps into it read-only
    ({guest path: host path}, from the config only)."""

    name: str
    dirs: dict[str, str] = {}


class RunJob(msgspec.Struct, tag="run", kw_only=True):
    """Execute (one module) or chain (several). The worker answers the client directly in
    the client's format, so the supervisor forwards the reply frames untouched."""

    token: int
    request_id: int
    modules: list[ModuleRef]
    timeout_ms: int
    fuel: int
    memory_bytes: int
    env: dict[str, str] = {}
    entry: str | None = None
    chain: bool = False
    batch: int = 0  # > 0: that many inputs in the payload frames, one result each
    input_shm: ShmRef | None = None
    output_shm_into: str = ""
    # False: the reply's worker_pid is 0 (the requester is not an admin: no pids for it).
    report_pid: bool = True
    # Whose execution this is: host methods check it and key-value state is scoped by it.
    tenant: str = ""
    # More entries to try, in order, when `entry` fails with a trap or a plugin error (the
    # binary's `entry_fallback`); empty: only `entry`.
    fallback_entries: list[str] = []
    args: list[str] = []  # argv[1:] of every WASI module the job runs
    wasi: list[WasiStep] = []  # one per module, in order; empty: argv[0] "plugin", no dirs
    scratch_bytes: int = 0  # cap of each execution's scratch directory; 0: none is given
    # A chain's entry per step, from each binary's configured `entries`; empty: `entry` (the
    # module's default) for every step.
    step_entries: list[str | None] = []
    # A unit: executes of one client pack with the same binary and limits, run one after
    # another, each in a fresh store and under its own timeout. The request id of each, in
    # order; its inputs are the job's entry in JobPack.payloads (a list). Empty: one request.
    unit: list[int] = []
    # A direct lane offered with this execute: the worker, if it ran it and holds no other
    # job, keeps serving the client directly with this token for at most `lease_executions`
    # executes or `lease_ms` (JobDone.leased says it did; Revoke ends it).
    lease_token: bytes = b""
    lease_executions: int = 0
    lease_ms: int = 0


class CompileJob(msgspec.Struct, tag="compile", kw_only=True):
    """Validate and compile a blob; write its serialized artifact for every worker to map."""

    token: int
    request_id: int
    module: ModuleRef


class Revoke(msgspec.Struct, tag="revoke", kw_only=True):
    """End the lease with this token: direct executes get LeaseEnded from now on; answered
    with LeaseReturned (unless the lease was already over and reported)."""

    token: bytes


class Shutdown(msgspec.Struct, tag="shutdown", kw_only=True):
    """Finish nothing new; exit once idle."""

    reason: str = ""


class JobPack(msgspec.Struct, tag="pack", kw_only=True):
    """Several small run jobs for one worker in a single frame, run in order.

    Why: ZeroMQ costs about 1.5 us per frame on each side, several times what packing costs,
    so the jobs one loop turn gives a worker travel as one frame instead of two each. The
    supervisor encodes `jobs` from RunJob headers it already holds encoded (msgspec.Raw).
    """

    jobs: list[RunJob]
    payloads: list[bytes | list[bytes]]  # a unit's entry: the list of its inputs


# A payload up to this size travels inside a pack (copied into it); a larger one keeps its
# own frame.
PACKED_PAYLOAD_MAX_BYTES = 64 * 1024
# A client's ExecutePack frame never grows past this: the server drops a connection whose
# frame is over 2 x max_payload_bytes + 1 MiB (ZMQ_MAXMSGSIZE), and this stays under it for
# any setting.
EXECUTE_PACK_MAX_BYTES = 512 * 1024


def fits_in_pack(payload: object) -> bool:
    """A payload frame that may ride inside a pack: none at all, or small plain bytes."""
    return payload is None or (type(payload) is bytes and len(payload) <= PACKED_PAYLOAD_MAX_BYTES)


class HostMethodSpec(msgspec.Struct, frozen=True, kw_only=True):
    """One operator host method ([host_methods."<name>"]), as a worker needs it."""

    name: str
    target: str  # "package.module:function", imported by the worker
    tenants: list[str] = []  # who may call it; ["*"]: every tenant
    timeout_ms: int = 1000
    max_request_bytes: int = 65536
    max_response_bytes: int = 1048576


class HostMethodTable(msgspec.Struct, frozen=True, tag="methods", kw_only=True):
    """What plugins may call through `host.call`: the operator's methods and the built-in
    key-value state (its SQLite file and each tenant's quota). Sent to an executing worker
    when it is ready and on every config reload that changes it, on the same socket as its
    jobs, so every job sent after a reload runs with the new table."""

    methods: list[HostMethodSpec] = []
    kv_path: str = ""  # the key-value database; empty: kv.* methods answer an error
    # tenant -> [max_keys, max_bytes] (0: unlimited); "default" for tenants not named
    kv_quotas: dict[str, list[int]] = {}


WorkerCommand = RunJob | CompileJob | Shutdown | JobPack | HostMethodTable | Revoke


class Ready(msgspec.Struct, tag="ready", kw_only=True):
    worker_id: str
    pid: int
    fingerprint: str
    protections: list[str] = []  # the OS sandbox in force (sandbox_worker/os_sandbox.py)
    direct_endpoint: str = ""  # its direct-lane socket; empty: it serves none


class Heartbeat(msgspec.Struct, tag="hb", kw_only=True):
    worker_id: str
    compiled: int = 0  # modules this worker compiled itself
    deserialized: int = 0  # modules it mapped from a shared artifact
    # Executes of units it has started, ever: while this grows, the supervisor moves the
    # deadline of the unit running on it (Scheduler.progress).
    unit_progress: int = 0
    # A direct execute is running: since when (time.monotonic, one clock for all processes
    # on the host), and its timeout. The supervisor kills a worker stuck past it.
    direct_since: float = 0.0
    direct_timeout_ms: int = 0


class JobDone(msgspec.Struct, tag="done", kw_only=True):
    """Frames 2 and 3 are the client's reply header and payload, forwarded as they are."""

    token: int
    code: str = ""
    kind: str = ""
    exports: list[str] = []
    fuel_consumed: int = 0
    # A unit's reply (RunJob.unit): its `count` replies follow in the DonePack, in order, and
    # `codes` are the error codes of those that failed (for the supervisor's counters).
    count: int = 0
    codes: list[str] = []
    # The job offered a lease (RunJob.lease_token) and the worker now holds it.
    leased: bool = False


class LeaseReturned(msgspec.Struct, tag="returned", kw_only=True):
    """A lease is over (revoked, used up, expired, or ended by a job): what was run on it,
    for the supervisor's accounting (fair share, counters, the rate allowance's unused
    part)."""

    token: bytes
    executions: int = 0
    busy_ms: float = 0.0
    fuel_consumed: int = 0
    codes: list[str] = []  # error codes of the direct executes that failed


class DonePack(msgspec.Struct, tag="dpack", kw_only=True):
    """Several small finished jobs in a single frame, in the order they ran: for each, the
    JobDone, the client's reply header (encoded, forwarded as it is) and the payload frame
    (None: the reply has no payload frame). A unit's JobDone (count > 0) has `count`
    consecutive entries in `replies` and `payloads`, one per execute in order."""

    done: list[JobDone]
    replies: list[bytes]
    payloads: list[bytes | None]


WorkerEvent = Ready | Heartbeat | JobDone | DonePack | LeaseReturned


class Broadcast(msgspec.Struct, kw_only=True, array_like=True):
    """Published on every load, update and unload: a hint to map (or drop) a module before a
    job needs it. Only a hint: PUB/SUB drops for slow joiners, so every job names the exact
    version it needs (ModuleRef) and a worker that missed a broadcast catches up from that."""

    sha256: str
    artifact_path: str
    removed: bool = False


# --------------------------------------------------------------------------- codecs

_encoder = msgspec.msgpack.Encoder()
encode = _encoder.encode

request_decoder = msgspec.msgpack.Decoder(Request)
execute_decoder = msgspec.msgpack.Decoder(Execute)
undecoded_pack_decoder = msgspec.msgpack.Decoder(UndecodedPack)
reply_decoder = msgspec.msgpack.Decoder(Reply)
command_decoder = msgspec.msgpack.Decoder(WorkerCommand)
event_decoder = msgspec.msgpack.Decoder(WorkerEvent)
broadcast_decoder = msgspec.msgpack.Decoder(Broadcast)


class _Peek(msgspec.Struct):
    """Only a header's `type` and `id`: every other value is skipped, never built."""

    type: Any = None
    id: Any = 0


_peek_decoder = msgspec.msgpack.Decoder(_Peek)


def peek_header(frame: bytes) -> tuple[str, int]:
    """Best-effort `type` and `id` of a header that is not (or not yet) decoded, so its error
    still correlates: ("", 0) where the frame does not say."""
    try:
        peeked = _peek_decoder.decode(frame)
    except Exception:
        return "", 0
    kind = peeked.type if isinstance(peeked.type, str) else ""
    value = peeked.id
    request_id = value if isinstance(value, int) and not isinstance(value, bool) else 0
    return kind, request_id


def peek_request_id(frame: bytes) -> int:
    """Best-effort `id` of a frame that failed to decode, so its error still correlates."""
    return peek_header(frame)[1]


_BOUND = re.compile(r"(?:length )?<= (\d+) - at (?:`key` in )?`\$\.?([^`]*)`")


def exceeded_bound(decode_error: str) -> tuple[str, int] | None:
    """The field and the bound of a decode error that is a request bound exceeded (msgspec:
    "Expected `str` of length <= 256 - at `$.tenant`"), else None."""
    found = _BOUND.search(decode_error)
    if found is None:
        return None
    return found.group(2), int(found.group(1))
