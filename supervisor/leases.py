"""Direct-lane leases: which worker serves which client connection directly, and until when.

Pure bookkeeping, like the scheduler: no sockets, no clock of its own. The server offers a
lease with an execute (RunJob.lease_token) when the pool has room to spare; the worker that
runs it accepts (JobDone.leased) or not; from then on the lease is *active* until the worker
returns it (LeaseReturned: revoked, used up, expired, or ended by a job it was given) or dies.
Every decision to end one is the server's (`to_revoke`, `hung`, `lost`): it revokes a lease
when anyone's work waits for a worker, when the binary changes, when the config is reloaded,
on drain, and when a lease outlives its time.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

from wasmcore.protocol import messages as p


@dataclass(eq=False, slots=True)
class Lease:
    token: bytes
    job_token: int  # the execute that offered it
    tenant: str
    binary_id: str
    envelope: list[bytes]  # the client connection that holds it
    allowance: int  # executions it may serve (taken from the tenant's request rate)
    worker_id: str = ""
    granted: float = 0.0  # when the worker accepted it
    revoking: bool = False  # a Revoke is on its way
    # A direct execute is running since (time.monotonic; from heartbeats), with its timeout.
    direct_since: float = 0.0
    direct_timeout_s: float = 0.0
    # Set when the server killed the worker for a hung direct execute: the client's error.
    killed_for: str = ""


class Leases:
    def __init__(self) -> None:
        self._offered: dict[int, Lease] = {}  # by the offering job's token
        self._active: dict[str, Lease] = {}  # by worker id

    @property
    def offered(self) -> bool:
        return bool(self._offered)

    @property
    def active(self) -> int:
        return len(self._active)

    def held_by(self, connection: bytes) -> int:
        """Leases offered to or held by one client connection."""
        return sum(1 for lease in self._all() if lease.envelope[0] == connection)

    def offer(self, job_token: int, tenant: str, binary_id: str, envelope: list[bytes],
              allowance: int) -> Lease:
        lease = Lease(token=os.urandom(p.LEASE_TOKEN_BYTES), job_token=job_token,
                      tenant=tenant, binary_id=binary_id, envelope=envelope,
                      allowance=allowance)
        self._offered[job_token] = lease
        return lease

    def settle_offer(self, job_token: int, worker_id: str, accepted: bool,
                     now: float) -> Lease | None:
        """The offering job ended. Accepted: the lease is active on `worker_id` (a worker
        holds at most one). Either way the lease, or None if the job offered none."""
        lease = self._offered.pop(job_token, None)
        if lease is None or not accepted:
            return lease
        lease.worker_id = worker_id
        lease.granted = now
        self._active[worker_id] = lease
        return lease

    def returned(self, worker_id: str, token: bytes) -> Lease | None:
        """The worker reports the lease over; None if it is not the one it holds (late)."""
        lease = self._active.get(worker_id)
        if lease is None or lease.token != token:
            return None
        del self._active[worker_id]
        return lease

    def lost(self, worker_id: str) -> Lease | None:
        """The worker is gone: its lease with it."""
        return self._active.pop(worker_id, None)

    def heartbeat(self, worker_id: str, since: float, timeout_ms: int) -> None:
        lease = self._active.get(worker_id)
        if lease is not None:
            lease.direct_since = since
            lease.direct_timeout_s = timeout_ms / 1000

    def to_revoke(self, binary_id: str | None = None, older_than: float | None = None,
                  worker_id: str | None = None) -> list[Lease]:
        """Active leases not yet being revoked, all or those matching: marked revoking."""
        out: list[Lease] = []
        for lease in self._active.values():
            if lease.revoking:
                continue
            if binary_id is not None and lease.binary_id != binary_id:
                continue
            if older_than is not None and lease.granted >= older_than:
                continue
            if worker_id is not None and lease.worker_id != worker_id:
                continue
            lease.revoking = True
            out.append(lease)
        return out

    def hung(self, now: float, grace_s: float) -> list[Lease]:
        """Leases whose worker has run one direct execute past its timeout and the grace."""
        return [lease for lease in self._active.values()
                if lease.direct_since and now > (lease.direct_since + lease.direct_timeout_s
                                                  + grace_s) and not lease.killed_for]

    def _all(self) -> Iterator[Lease]:
        yield from self._offered.values()
        yield from self._active.values()
