"""WASI preview 1 context for one execution: stdin = input, stdout/stderr captured in memory.

Nothing of the host leaks in: no inherited env/args/stdio, no preopened directories.
stdout goes through an in-process callback that enforces the output cap *while* the plugin
writes (a refused write returns EFBIG to the plugin), so a flooding plugin cannot grow host
memory; it is then stopped by fuel or the timeout if it keeps trying.
"""

from __future__ import annotations

import errno

import wasmtime

from wasmcore.protocol.errors import OutputLimit

from . import _raw
from .host import HostState

ARGV0 = "plugin"


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
    stdin: bytes,
    stderr: StderrSink,
    *,
    stdout_is_output: bool,
) -> wasmtime.WasiConfig:
    """A WasiConfig wired to `state`. `stdout_is_output=False` sends stdout to the log
    (core-ABI modules that happen to link WASI: their output channel is host.output)."""
    config = wasmtime.WasiConfig()
    config.argv = [ARGV0]
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
