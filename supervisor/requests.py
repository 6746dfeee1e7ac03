"""What a client asks for, turned into work: execute, execute_batch and chain become run jobs
for the scheduler; load, unload and list go to the binaries.

Every request names its tenant (the server has set it to the tenant the client's key proves,
when it has one); a binary is found only among that tenant's own. The limits a
job runs under are decided here (`run_limits`): what the request asked for within the
maximum (its tenant's ceilings, else [limits] max_*), else the configured defaults, lowered by
the binary's configured ones. The worker's sandbox applies them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from wasmcore.protocol import messages as p
from wasmcore.protocol import shm
from wasmcore.protocol.errors import (
    BadRequest,
    Forbidden,
    PayloadTooLarge,
    QuotaExceeded,
    WasmCoreError,
)
from wasmcore.protocol.limits import NO_FUEL_CAP, Limits, MiB
from wasmcore.supervisor.auth import redacted
from wasmcore.supervisor.binaries import Binaries
from wasmcore.supervisor.config import Config
from wasmcore.supervisor.jobs import PendingJob

Reply = Callable[[list[bytes], Any], None]
ReplyError = Callable[[list[bytes], int, WasmCoreError], None]
# (client envelope, tenant, binary id, job token) -> (lease token, executions, ms) or None.
OfferLease = Callable[[list[bytes], str, str, int], tuple[bytes, int, int] | None]


_LIMITS_KEPT = 4096


def run_limits(config: Config, tenant: str, binary_name: str, wanted: p.RunOptions) -> Limits:
    """Timeout, fuel and memory for one run: what the request asked for (lower or higher than
    [limits]) up to the maximum (the tenant's max_timeout_ms, max_fuel, max_memory_mb where
    set, else [limits] max_*), QUOTA_EXCEEDED above it; [limits] when nothing was asked,
    capped by the maximum. The binary's own settings lower the result."""
    configured = config.limits.to_limits()
    memory_mb = configured.memory_bytes // MiB
    limits = msgspec.structs.replace(
        configured,
        timeout_ms=_granted("max_timeout_ms", configured.timeout_ms, wanted.timeout_ms,
                            *_ceiling(config, tenant, "max_timeout_ms")),
        fuel=_granted("max_fuel", configured.fuel, wanted.fuel,
                      *_ceiling(config, tenant, "max_fuel")),
        memory_bytes=_granted("max_memory_mb", memory_mb, wanted.memory_mb,
                              *_ceiling(config, tenant, "max_memory_mb")) * MiB)
    per = config.binary(tenant, binary_name)
    if per is not None:
        limits = limits.lowered(per.timeout_ms, per.fuel,
                                per.memory_mb * MiB if per.memory_mb else None)
    return limits


def _ceiling(config: Config, tenant: str, key: str) -> tuple[int, str]:
    """The most a request of `tenant` may ask for (0: no maximum), and the table setting it."""
    own = getattr(config.tenant(tenant), key)
    if own:
        name = tenant if tenant in config.tenants else "default"
        return own, f"[tenants.{name}]"
    most = getattr(config.limits, key)
    if key == "max_fuel":
        return (max(most, config.limits.fuel) if most else 0), "[limits]"  # 0: no maximum
    default = config.limits.timeout_ms if key == "max_timeout_ms" else config.limits.memory_mb
    # A maximum below the default (0 too) counts as the default: what a request that asks
    # for nothing gets is always allowed.
    return max(most, default), "[limits]"


def offered_limits(config: Config, tenant: str) -> p.LimitsOffer:
    """What `welcome` tells a client of `tenant`: what a request that asks for nothing gets,
    and the most it may ask for (fuel 0: no cap; a maximum of 0: none)."""
    default = run_limits(config, tenant, "", p.RunOptions())
    fuel_max = _ceiling(config, tenant, "max_fuel")[0]
    return p.LimitsOffer(
        timeout_ms=default.timeout_ms,
        max_timeout_ms=_ceiling(config, tenant, "max_timeout_ms")[0],
        fuel=0 if default.fuel == NO_FUEL_CAP else default.fuel,
        max_fuel=fuel_max,
        memory_mb=default.memory_bytes // MiB,
        max_memory_mb=_ceiling(config, tenant, "max_memory_mb")[0],
        output_bytes=default.output_bytes,
        log_bytes=default.log_bytes,
    )


def _granted(quota: str, configured: int, asked: int | None, ceiling: int,
             where: str) -> int:
    """One limit of a run: what was asked (None or <= 0: nothing asked) up to `ceiling`
    (0: no maximum), refused above it; nothing asked: `configured`, capped by `ceiling`."""
    if asked is None or asked <= 0:
        return min(configured, ceiling) if ceiling else configured
    if ceiling and asked > ceiling:
        raise QuotaExceeded(
            f"this request asks for {quota.removeprefix('max_')} = {asked}; at most "
            f"{ceiling} may be asked for ({where} {quota}): ask for less",
            {"quota": quota, "limit": ceiling, "used": asked})
    return asked


class Requests:
    def __init__(self, config: Config, binaries: Binaries, shm_dir: str | None,
                 submit: Callable[[PendingJob], None], next_token: Callable[[], int],
                 reply: Reply, reply_error: ReplyError,
                 offer_lease: OfferLease | None = None) -> None:
        self._config = config
        # Asked for each execute that wants a direct lane: the lease to offer with it.
        self._offer_lease = offer_lease
        # run_limits per (tenant, binary name, what was asked): building them costs more than
        # the rest of routing a quick execute; emptied when the config changes.
        self._limits: dict[tuple[Any, ...], Limits] = {}
        # WASI view (argv[0], read-only dirs) per (tenant, binary name): from the config.
        self._wasi: dict[tuple[str, str], list[p.WasiStep]] = {}
        self._binaries = binaries
        self._shm_dir = shm_dir
        self._submit = submit
        self._reply = reply
        self._reply_error = reply_error
        self._next_token = next_token

    @property
    def config(self) -> Config:
        return self._config

    @config.setter
    def config(self, config: Config) -> None:
        self._config = config
        self._limits.clear()
        self._wasi.clear()

    def _run_limits(self, tenant: str, binary_name: str, wanted: p.RunOptions) -> Limits:
        key = (tenant, binary_name, wanted.timeout_ms, wanted.fuel, wanted.memory_mb)
        limits = self._limits.get(key)
        if limits is None:
            limits = run_limits(self._config, tenant, binary_name, wanted)  # may raise
            if len(self._limits) >= _LIMITS_KEPT:
                self._limits.clear()
            self._limits[key] = limits
        return limits

    def _wasi_step(self, binary: p.BinaryInfo) -> list[p.WasiStep]:
        """[the binary's WASI view], cached as a one-element list that a one-module job
        uses as it is (this runs for every execute)."""
        key = (binary.tenant, binary.name)
        step = self._wasi.get(key)
        if step is None:
            per = self._config.binary(binary.tenant, binary.name)
            step = [p.WasiStep(name=binary.name, dirs=dict(per.dirs) if per is not None else {})]
            if len(self._wasi) >= _LIMITS_KEPT:
                self._wasi.clear()
            self._wasi[key] = step
        return step

    def _wasi_fields(self, req: p.RunOptions, binaries: list[p.BinaryInfo]) -> dict[str, Any]:
        """What a run job's WASI modules see: the request's arguments, the operator's
        directories and the scratch cap (never a path from the client)."""
        for arg in req.args:
            if "\0" in arg:
                raise BadRequest("an argument contains a NUL character, which WASI cannot pass",
                                 {"arg": arg[:64]})
        steps = (self._wasi_step(binaries[0]) if len(binaries) == 1
                 else [self._wasi_step(b)[0] for b in binaries])
        return {"args": req.args, "wasi": steps,
                "scratch_bytes": self._config.wasi.scratch_mb * MiB}

    def handle(self, envelope: list[bytes], request: Any, payload: Any, admin: bool) -> None:
        """One decoded request (its payload frame, or for a batch the list of input frames)
        from an admin or not: only admins are told worker pids. Raises WasmCoreError for the
        caller to answer."""
        match request:
            case p.Execute():
                self._execute(envelope, request, payload, admin)
            case p.ExecuteBatch():
                self._batch(envelope, request, payload, admin)
            case p.Chain():
                self._chain(envelope, request, payload, admin)
            case p.Load():
                self._load(envelope, request, payload, admin)
            case p.ListBinaries():
                self._reply(envelope, p.Listed(id=request.id,
                                               binaries=self._binaries.for_tenant(request.tenant)))
            case p.Unload():
                binary = self._binaries.unload(request.tenant, request.binary_id)
                self._reply(envelope, p.Unloaded(id=request.id, binary_id=binary.binary_id))

    # ------------------------------------------------------------------ runs

    def _entry_for(self, binary: p.BinaryInfo, requested: str | None) -> str | None:
        per = self.config.binary(binary.tenant, binary.name)
        if per is None or not per.entries:
            return requested
        if requested is not None:
            if requested not in per.entries:
                raise Forbidden(
                    f"entry {requested!r} is not allowed for {binary.name!r}; "
                    f"allowed: {', '.join(per.entries)}",
                    {"allowed": per.entries},
                )
            return requested
        for entry in per.entries:
            if entry in binary.exports:
                return entry
        raise BadRequest(
            f"none of the configured entries ({', '.join(per.entries)}) is exported by "
            f"{binary.name!r}; it exports: {', '.join(binary.exports) or 'nothing callable'}",
            {"allowed": per.entries, "exports": binary.exports},
        )

    def _fallbacks(self, binary: p.BinaryInfo, requested: str | None,
                   entry: str | None) -> list[str]:
        """The entries to try after `entry` fails, when the binary's settings ask for it and
        the request named none: the rest of its list that the binary exports."""
        per = self.config.binary(binary.tenant, binary.name)
        if per is None or not per.entry_fallback or requested is not None or entry is None:
            return []
        listed = [e for e in per.entries if e in binary.exports]
        return listed[listed.index(entry) + 1:] if entry in listed else []

    def _run_job(self, req: p.Execute | p.ExecuteBatch, admin: bool,
                 **fields: Any) -> tuple[p.RunJob, p.BinaryInfo]:
        binary = self._binaries.owned(req.tenant, req.binary_id)
        entry = self._entry_for(binary, req.entry)
        limits = self._run_limits(req.tenant, binary.name, req)
        job = p.RunJob(token=self._next_token(), request_id=req.id,
                       modules=[self._binaries.module_ref(binary)],
                       timeout_ms=limits.timeout_ms, fuel=limits.fuel,
                       memory_bytes=limits.memory_bytes, env=req.env, entry=entry,
                       report_pid=admin, tenant=req.tenant,
                       fallback_entries=self._fallbacks(binary, req.entry, entry), **fields,
                       **self._wasi_fields(req, [binary]))
        return job, binary

    def _execute(self, envelope: list[bytes], req: p.Execute, payload: Any,
                 admin: bool) -> None:
        input_shm = req.input_shm
        if input_shm is not None:
            if self._shm_dir is None:
                raise BadRequest("shared-memory payloads are off on this server; send the "
                                 "input inline")
            if not shm.NAME.match(input_shm.name):
                raise BadRequest(f"not a segment name: {input_shm.name!r}")
            if input_shm.size < 0:
                raise BadRequest(f"input_shm size is {input_shm.size}: the size is the "
                                 "segment's length in bytes, 0 or more",
                                 {"segment": input_shm.name, "size": input_shm.size})
            if payload is not None:
                raise BadRequest("an execute with input_shm takes no payload frame (an empty "
                                 "frame counts): the input is the segment")
            if input_shm.size > self.config.server.max_payload_bytes:
                raise PayloadTooLarge(f"input segment is {input_shm.size} bytes; limit is "
                                      f"{self.config.server.max_payload_bytes}")
        if req.output_shm_into and not shm.NAME.match(req.output_shm_into):
            raise BadRequest(f"not a segment name: {req.output_shm_into!r}")
        job, binary = self._run_job(
            req, admin, input_shm=input_shm,
            output_shm_into=req.output_shm_into if self._shm_dir else "")
        if req.direct and self._offer_lease is not None:
            offer = self._offer_lease(envelope, req.tenant, binary.binary_id, job.token)
            if offer is not None:
                job.lease_token, job.lease_executions, job.lease_ms = offer
        # Its output may overwrite its own input: running it twice could read garbage.
        retryable = not (input_shm is not None and req.output_shm_into == input_shm.name)
        self._queue(envelope, req, job, payload, job.timeout_ms / 1000, [binary.binary_id],
                    admin, retryable=retryable)

    def execute_unit(self, envelope: list[bytes], reqs: list[p.Execute],
                     payloads: list[bytes | None], admin: bool) -> None:
        """Executes of one pack with the same tenant, binary, entry, limits, env and
        arguments, inputs inline and no segments, as one job (a unit): one binary and limits
        lookup, one job holding every request id, charged and counted as len(reqs)
        executions. The worker runs each in a fresh store under its own timeout and answers
        each on its own. Raises WasmCoreError for all of them (the caller then handles them
        one by one, which answers each exactly as alone)."""
        first = reqs[0]
        job, binary = self._run_job(first, admin, unit=[req.id for req in reqs])
        header = p.encode(job)
        inputs = [b"" if payload is None else payload for payload in payloads]
        count = len(reqs)
        # Held bytes as the same executes would hold one by one (a header each), so a
        # tenant's max_queued_bytes binds at the same number of requests either way.
        size = len(header) * count + sum(map(len, inputs))
        # The deadline covers every execute running to its own timeout, one after another.
        pending = PendingJob(token=job.token, envelope=envelope, request_id=first.id,
                             header=header, payload=inputs,
                             budget_s=job.timeout_ms * count / 1000,
                             binary_ids=[binary.binary_id], tenant=first.tenant,
                             shows_pids=admin, packable=True, size_bytes=size,
                             request_ids=job.unit, count=count, steps=count)
        self._submit(pending)

    def _batch(self, envelope: list[bytes], req: p.ExecuteBatch, inputs: list[Any],
               admin: bool) -> None:
        job, binary = self._run_job(req, admin, batch=req.count)
        self._queue(envelope, req, job, None, job.timeout_ms * req.count / 1000,
                    [binary.binary_id], admin, extra=inputs, steps=req.count)

    def _chain(self, envelope: list[bytes], req: p.Chain, payload: Any, admin: bool) -> None:
        if not req.binary_ids:
            raise BadRequest("chain needs at least one binary id")
        limit = self.config.server.max_chain_steps
        if len(req.binary_ids) > limit:
            raise BadRequest(
                f"a chain has at most {limit} steps (server.max_chain_steps); this one has "
                f"{len(req.binary_ids)}: split it into several chains",
                {"steps": len(req.binary_ids), "limit": limit})
        binaries = [self._binaries.owned(req.tenant, binary_id) for binary_id in req.binary_ids]
        limits = [self._run_limits(req.tenant, b.name, req) for b in binaries]
        # Each step runs its binary's configured entry, as an execute would (a chain names no
        # entry, so one the operator did not allow is never reached through a chain).
        entries = [self._entry_for(b, None) for b in binaries]
        job = p.RunJob(
            token=self._next_token(),
            request_id=req.id,
            modules=[self._binaries.module_ref(b) for b in binaries],
            timeout_ms=min(limit.timeout_ms for limit in limits),
            fuel=min(limit.fuel for limit in limits),
            memory_bytes=min(limit.memory_bytes for limit in limits),
            env=req.env,
            chain=True,
            report_pid=admin,
            tenant=req.tenant,
            step_entries=entries if any(e is not None for e in entries) else [],
            **self._wasi_fields(req, binaries),
        )
        # timeout_ms is the whole chain's budget: the worker gives each step what is left.
        self._queue(envelope, req, job, payload, job.timeout_ms / 1000,
                    [b.binary_id for b in binaries], admin)

    def _queue(self, envelope: list[bytes], req: Any, job: p.RunJob, payload: Any,
               budget_s: float, binary_ids: list[str], admin: bool,
               extra: list[Any] | None = None, retryable: bool = True,
               steps: int = 1) -> None:
        """Hand a RunJob answering `req` to the scheduler; `budget_s` is what its deadline
        allows."""
        header = p.encode(job)
        size = len(header) + (len(payload) if payload is not None else 0)
        pending = PendingJob(token=job.token, envelope=envelope, request_id=req.id,
                             header=header, payload=payload, budget_s=budget_s,
                             binary_ids=binary_ids, retryable=retryable, tenant=req.tenant,
                             shows_pids=admin, steps=steps)
        if extra:
            pending.extra = extra
            size += sum(len(frame) for frame in extra)
        else:
            pending.packable = p.fits_in_pack(payload)
        pending.size_bytes = size
        self._submit(pending)

    # ------------------------------------------------------------------ loads

    def _load(self, envelope: list[bytes], req: p.Load, payload: Any, admin: bool) -> None:
        def done(loaded: p.Loaded) -> None:
            loaded.id = req.id
            self._reply(envelope, loaded)

        def failed(error: WasmCoreError) -> None:
            # A compile's worker lost or killed names its pid: only for admins.
            self._reply_error(envelope, req.id, error if admin else redacted(error))

        self._binaries.load(req.tenant, req.path, req.name, payload, done, failed)
