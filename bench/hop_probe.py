"""Timestamps at every hop of a request, in every process of the service (a probe only).

Installed by a `sitecustomize.py` that bench/latency_breakdown.py puts on PYTHONPATH, so the
supervisor and its workers (which inherit the environment) load it at start-up. It wraps, on
the main thread only (a worker's heartbeat thread is left out):

- `zmq.Poller.poll`: when it returns with events (the process has been woken);
- `zmq.Socket.recv_multipart`: when a message has been received, and on which socket;
- `zmq.Socket.send_multipart`: when a send begins and ends, and on which socket;
- `Sandbox.execute` (workers): when the execution begins and ends.

Times are `time.monotonic_ns()` (CLOCK_MONOTONIC, one clock for every process). Each process
appends `pid role kind socket t_ns` lines to `$WASMCORE_HOP_PROBE/<pid>.hops` through a file
opened at start-up (before a worker confines itself or switches users), every 256 events.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
import weakref
from typing import Any

ENV = "WASMCORE_HOP_PROBE"
FUNCS_ENV = "WASMCORE_HOP_PROBE_FUNCS"
_FLUSH_EVERY = 256

_events: list[tuple[int, str, str]] = []
_fd = -1
_role = "client"
_main = threading.main_thread().ident
# By socket, not by id(): a closed socket's id can come back for a new one.
_labels: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
_wrapped: list[bool] = []


def _flush() -> None:
    global _events
    if _fd < 0 or not _events:
        return
    pid = os.getpid()
    lines = "".join(f"{pid} {_role} {kind} {label} {t}\n" for t, kind, label in _events)
    _events = []
    os.write(_fd, lines.encode())


def _note(kind: str, label: str, t: int | None = None) -> None:
    if _fd < 0:
        return
    _events.append((time.monotonic_ns() if t is None else t, kind, label))
    if len(_events) >= _FLUSH_EVERY:
        _flush()


def mark(kind: str) -> None:
    """A timestamp of the driver's own (the client's call begins / returns)."""
    _note(kind, "-")


def _label(sock: Any) -> str:
    """The socket's endpoint (bound or connected), read once per socket."""
    label = _labels.get(sock)
    if label is None:
        import zmq

        try:
            label = sock.get(zmq.LAST_ENDPOINT).decode() or "?"
        except Exception:
            label = "?"
        label = label.replace(" ", "_")
        if label != "?":
            _labels[sock] = label
    return label


def _wrap_zmq() -> None:
    import zmq

    poll, recv, send = zmq.Poller.poll, zmq.Socket.recv_multipart, zmq.Socket.send_multipart

    def probed_poll(self: Any, timeout: Any = None) -> Any:
        events = poll(self, timeout)
        if events and threading.get_ident() == _main:
            _note("poll", "-")
        return events

    def probed_recv(self: Any, *args: Any, **kwargs: Any) -> Any:
        frames = recv(self, *args, **kwargs)
        if threading.get_ident() == _main:
            _note("recv", _label(self))
        return frames

    def probed_send(self: Any, *args: Any, **kwargs: Any) -> Any:
        if threading.get_ident() != _main:
            return send(self, *args, **kwargs)
        began = time.monotonic_ns()
        result = send(self, *args, **kwargs)
        label = _label(self)
        _note("send0", label, began)
        _note("send1", label)
        return result

    zmq.Poller.poll = probed_poll  # type: ignore[method-assign]
    zmq.Socket.recv_multipart = probed_recv  # type: ignore[method-assign]
    zmq.Socket.send_multipart = probed_send  # type: ignore[method-assign]


def _wrap_sandbox() -> None:
    from wasmcore.sandbox_worker.runtime import Sandbox

    execute = Sandbox.execute

    def probed_execute(self: Any, *args: Any, **kwargs: Any) -> Any:
        _note("exec0", "-")
        try:
            return execute(self, *args, **kwargs)
        finally:
            _note("exec1", "-")

    Sandbox.execute = probed_execute  # type: ignore[method-assign]


def _wrap_functions(specs: str) -> None:
    """`role|module:Class.method` or `role|module:function`, comma-separated: each call of
    those of this process's role is timed (events `f0:<name>` / `f1:<name>`)."""
    import importlib

    for spec in filter(None, specs.split(",")):
        role, _, target = spec.partition("|")
        if role != _role:
            continue
        module_name, _, qualname = target.partition(":")
        owner: Any = importlib.import_module(module_name)
        *path, name = qualname.split(".")
        for part in path:
            owner = getattr(owner, part)
        original = getattr(owner, name)
        label = qualname.rsplit(".", 1)[-1]

        def timed(*args: Any, __original: Any = original, __label: str = label,
                  **kwargs: Any) -> Any:
            if threading.get_ident() != _main:
                return __original(*args, **kwargs)
            _note("f0", __label)
            try:
                return __original(*args, **kwargs)
            finally:
                _note("f1", __label)

        setattr(owner, name, timed)


def install(directory: str, role: str | None = None) -> None:
    global _fd, _role
    argv = " ".join(sys.orig_argv)
    _role = role or ("worker" if "sandbox_worker" in argv
                     else "supervisor" if "cli_server" in argv
                     else "echo" if "bench.echo" in argv else "other")
    if _role == "other":
        return
    _fd = os.open(os.path.join(directory, f"{os.getpid()}.hops"),
                  os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    if _wrapped:
        return
    _wrapped.append(True)
    _wrap_zmq()
    if _role == "worker":
        _wrap_sandbox()
    _wrap_functions(os.environ.get(FUNCS_ENV, ""))
    atexit.register(_flush)


def uninstall() -> None:
    """Flush and stop recording in this process (its wraps stay, recording nothing)."""
    global _fd
    _flush()
    if _fd >= 0:
        os.close(_fd)
        _fd = -1
