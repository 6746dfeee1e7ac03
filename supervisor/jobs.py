"""A unit of work waiting for, or running on, a worker."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq

from wasmcore.protocol.errors import WasmCoreError

# Called with (error code or "", JobDone or None, reply frames) when the job ends, in place of
# forwarding the worker's reply to a client. Used by compiles, whose reply the supervisor
# builds itself.
Completion = Callable[[str, Any, list[zmq.Frame]], None]


@dataclass(eq=False, slots=True)
class PendingJob:
    token: int
    envelope: list[bytes] | None  # the client's ROUTER envelope; None for internal jobs
    request_id: int
    header: bytes
    payload: Any  # bytes or zmq.Frame, or None
    budget_s: float  # how long the execution may run, before the supervisor's grace
    binary_ids: list[str] = field(default_factory=list)
    on_done: Completion | None = None
    deadline: float = 0.0  # set when the job reaches the head of its worker's FIFO
    started: float = 0.0
    requeued: bool = False
    estimate_ms: float = 0.0  # expected run time when it was assigned (for prefetching)
    extra: list[Any] = field(default_factory=list)  # a batch's input frames
    # A run job whose payload is small bytes (or none): it may travel in a JobPack.
    packable: bool = False
    # False when running it may have destroyed its own input (a large output written over
    # the input segment the client lent): it must never run a second time.
    retryable: bool = True
    # Called instead when `on_done` raised, so whoever waits for the job is still answered.
    on_error: Callable[[WasmCoreError], None] | None = None
    tenant: str = "default"  # whose queue it waits in, whose share and caps it counts against
    size_bytes: int = 0  # what the supervisor holds for it until it ends (header and payload)
    charged_ms: float = 0.0  # run time charged to its tenant when it was sent (for fairness)
    # The requester is an admin: errors the supervisor answers it with may name worker pids.
    shows_pids: bool = True
    # A unit (executes of one pack run together, RunJob.unit): the request id of each, in
    # order; `payload` is then the list of their inputs. Empty: the job answers `request_id`.
    request_ids: list[int] = field(default_factory=list)
    count: int = 1  # executions it stands for: what it counts against quotas and the queue
    # Executions it runs one after another (a unit's executes, a batch's inputs), each under
    # its own timeout: its deadline covers one, and the worker's progress moves it.
    steps: int = 1
