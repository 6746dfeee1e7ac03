"""What a request returns: replies unpacked into results, or into the exception of their code."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from wasmcore.protocol import messages as p
from wasmcore.protocol.errors import Unavailable, WasmCoreError, error_from_code

if TYPE_CHECKING:
    from wasmcore.client.shared_memory import SharedMemory


@dataclass(slots=True)
class Execution:
    """The result of one execute: the plugin's output, its logs and its metering."""

    output: bytes  # a read-only memoryview for shared-memory outputs of a zero_copy client
    logs: list[str]
    metering: p.Metering
    binary_id: str = ""
    version: int = 0
    worker_pid: int = 0
    logs_truncated: bool = False


@dataclass(slots=True)
class ChainExecution:
    output: bytes
    steps: list[p.StepResult] = field(default_factory=list)
    worker_pid: int = 0


def unpack(reply: Any, frames: list[bytes], shared: SharedMemory | None = None) -> Any:
    """What the caller gets for `reply` and its payload `frames`: raises an error reply as its
    exception; `shared` reads an output that came back in a segment."""
    payload = frames[0] if frames else b""
    match reply:
        case p.ErrorReply():
            raise error_from_code(reply.code, reply.message, reply.details)
        case p.Executed():
            if reply.output_shm is not None:
                if shared is None:
                    raise Unavailable("the server sent a shared-memory output to a client "
                                      "that did not ask for one")
                payload = shared.take_output(reply.output_shm)
            return Execution(output=payload, logs=reply.logs, metering=reply.metering,
                             binary_id=reply.binary_id, version=reply.version,
                             worker_pid=reply.worker_pid, logs_truncated=reply.logs_truncated)
        case p.Chained():
            return ChainExecution(output=payload, steps=reply.steps, worker_pid=reply.worker_pid)
        case p.BatchExecuted():
            results: list[Execution | WasmCoreError] = []
            for item, output in zip(reply.items, frames, strict=False):
                if item.code:
                    results.append(error_from_code(item.code, item.message, item.details))
                else:
                    results.append(Execution(output=output, logs=item.logs,
                                             metering=item.metering, binary_id=reply.binary_id,
                                             version=reply.version, worker_pid=reply.worker_pid))
            return results
        case p.Listed():
            return reply.binaries
        case p.Unloaded():
            return None
        case _:
            return reply  # Loaded, StatsReply, Welcome: the reply is the result
