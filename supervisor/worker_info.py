"""How workers look in `stats`: the process's side (pool) and its work (scheduler) together."""

from __future__ import annotations

from collections.abc import Iterable

from wasmcore.protocol import messages as p
from wasmcore.supervisor.scheduler import Scheduler
from wasmcore.supervisor.worker_process import WorkerHandle, WorkerState


def describe_workers(handles: Iterable[WorkerHandle], scheduler: Scheduler,
                     show_pids: bool) -> list[p.WorkerInfo]:
    """One WorkerInfo per live worker, by slot; pids only for those allowed to see them."""
    workers = []
    for handle in handles:
        state = str(handle.state)
        if handle.state is WorkerState.READY:
            state = "busy" if scheduler.jobs_on(handle.worker_id) else "idle"
        workers.append(p.WorkerInfo(
            slot=handle.slot,
            pid=handle.pid if show_pids else 0,
            state=state,
            rss_bytes=handle.rss_bytes or handle.sample_rss(),
            executions=scheduler.executions_on(handle.worker_id),
            started_at=handle.started_at,
            compiled=handle.compiled,
            deserialized=handle.deserialized,
            protections=handle.protections,
            leased=scheduler.is_leased(handle.worker_id),
        ))
    workers.sort(key=lambda w: (w.slot, w.started_at))
    return workers
