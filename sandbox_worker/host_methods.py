"""Host methods: what a plugin calls by name with a JSON request (`host.call`, host.py), in
this worker process.

Two kinds: the operator's methods ([host_methods."<name>"] in the config: a Python callable
named by import path, imported here) and the built-in key-value state (kv.get, kv.set,
kv.incr, kv.delete, kv.list; kv_store.py). `HostMethods.call(tenant, name, request)` is the
one entry point, for the core ABI's `host.call` and for any other plugin kind (Extism's
`extism:host/user` imports): it returns (True, JSON response) or (False, JSON error) and never
raises.

Where the callable runs, and why: here, in the worker's main thread, synchronously inside the
plugin's host call. That is the fast path (a trivial call costs a few microseconds; a thread
or process hop would cost tens), and the callable is the operator's own code, not the
tenant's: the isolation boundary is wasm, which the plugin cannot leave through a method
call. The callable runs under the worker's OS sandbox (unprivileged user, seccomp: no inet
sockets, no new processes), so a method that needs those must hand the work to a service it
reaches over a Unix socket.

Timeouts: a Python call cannot be preempted from another thread, so the deadline is a
SIGALRM timer (ITIMER_REAL) armed around the call. Its handler raises in the main thread at
the next bytecode, which interrupts Python code, `time.sleep` and other calls that return
EINTR. C code that holds the GIL and never returns to Python cannot be interrupted; its
result is discarded after the fact (the elapsed time is checked too), and if it never
returns, the supervisor's deadline for the execution ends the worker like any stuck
execution. Called outside the main thread (an in-process Sandbox in a thread), or built
without `preempt` (the worker asks for it; an embedder may not want its SIGALRM taken), only
the check after the call applies.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import msgspec

from wasmcore.protocol.messages import HostMethodSpec, HostMethodTable

from .kv_store import MAX_KEY_BYTES, MAX_LIST, KvStore, QuotaExceeded

# Error codes a plugin can get in {"error": {"code": ..., "message": ...}}.
NOT_FOUND = "NOT_FOUND"  # no method of that name
NOT_ALLOWED = "NOT_ALLOWED"  # the method exists, the calling tenant may not call it
UNAVAILABLE = "UNAVAILABLE"  # its target could not be imported (the worker log says why)
BAD_REQUEST = "BAD_REQUEST"  # the request is not JSON, or not what the method takes
REQUEST_TOO_LARGE = "REQUEST_TOO_LARGE"
RESPONSE_TOO_LARGE = "RESPONSE_TOO_LARGE"
TIMEOUT = "TIMEOUT"
METHOD_FAILED = "METHOD_FAILED"  # the callable raised
BAD_RESPONSE = "BAD_RESPONSE"  # it returned something JSON cannot encode
QUOTA_EXCEEDED = "QUOTA_EXCEEDED"  # kv.set over the tenant's kv_max_keys / kv_max_bytes
STORAGE_ERROR = "STORAGE_ERROR"  # the key-value database failed

KV_MAX_REQUEST_BYTES = 1024 * 1024
_LOG_BURST = 20  # failure lines per method and minute in the worker log; the rest counted
_LOG_WINDOW_S = 60.0


class MethodError(Exception):
    """Raise from a host method to give the plugin this message (and code): unlike any other
    exception, whose text stays in the worker log, it is meant for the plugin."""

    def __init__(self, message: str, code: str = "METHOD_ERROR") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class MethodContext:
    """The second argument of every host method: who is calling."""

    __slots__ = ("tenant", "method")

    def __init__(self, tenant: str, method: str) -> None:
        self.tenant = tenant  # the tenant of the execution that called
        self.method = method  # the name it called


class _Deadline(BaseException):
    """Raised by the SIGALRM handler inside an overrunning call (BaseException: a method's
    own `except Exception` does not swallow it)."""


class _Method:
    __slots__ = ("spec", "func", "anyone", "tenants", "problem", "timeout_s")

    def __init__(self, spec: HostMethodSpec, func: Callable[..., Any] | None,
                 problem: str) -> None:
        self.spec = spec
        self.func = func
        self.problem = problem
        self.anyone = "*" in spec.tenants
        self.tenants = frozenset(spec.tenants)
        self.timeout_s = spec.timeout_ms / 1000


class _KeyRequest(msgspec.Struct, forbid_unknown_fields=True):
    key: str


class _SetRequest(msgspec.Struct, forbid_unknown_fields=True):
    key: str
    value: msgspec.Raw


class _IncrRequest(msgspec.Struct, forbid_unknown_fields=True):
    key: str
    by: int = 1


class _ListRequest(msgspec.Struct, forbid_unknown_fields=True):
    prefix: str = ""
    after: str = ""
    limit: int = 100


_decode = msgspec.json.decode
_encode = msgspec.json.encode
_key_decoder = msgspec.json.Decoder(_KeyRequest)
_set_decoder = msgspec.json.Decoder(_SetRequest)
_list_decoder = msgspec.json.Decoder(_ListRequest)
_incr_decoder = msgspec.json.Decoder(_IncrRequest)
_OK = b'{"ok":true}'
_NOT_FOUND_VALUE = b'{"found":false}'


def error_json(code: str, message: str, **details: Any) -> bytes:
    return _encode({"error": {"code": code, "message": message, **details}})


class HostMethods:
    """The methods this worker's plugins may call, from the table the supervisor sends."""

    def __init__(self, table: HostMethodTable | None = None,
                 log: Callable[[str], None] | None = None, preempt: bool = False) -> None:
        """`preempt`: interrupt overrunning calls with SIGALRM (the worker's choice). It takes
        the process's SIGALRM and ITIMER_REAL for itself, so it is off by default for
        embedders (pytest-timeout, say, uses them too); then only the check after the call
        applies."""
        self._log_line = log or _stderr
        self._methods: dict[str, _Method] = {}
        self._imported: dict[str, Callable[..., Any]] = {}  # target -> callable
        self._table = HostMethodTable()
        self._kv: KvStore | None = None
        self._quotas: dict[str, list[int]] = {}
        self._logged: dict[str, list[float]] = {}  # method -> [window start, lines, dropped]
        self._armed = False
        self._alarm = preempt and threading.current_thread() is threading.main_thread()
        self._main = threading.get_ident()
        if self._alarm:
            signal.signal(signal.SIGALRM, self._on_alarm)
        self.configure(table or HostMethodTable())

    # ------------------------------------------------------------------ table

    def configure(self, table: HostMethodTable) -> None:
        """Take a new table: methods added, removed or re-pointed; quotas; the database."""
        if table == self._table:
            return
        methods: dict[str, _Method] = {}
        for spec in table.methods:
            func, problem = self._resolve(spec.target)
            if problem:
                self._log(spec.name, "", f"target {spec.target!r} cannot be used: {problem}")
            methods[spec.name] = _Method(spec, func, problem)
        self._methods = methods
        self._quotas = dict(table.kv_quotas)
        if self._kv is None or self._kv.path != table.kv_path:
            if self._kv is not None:
                self._kv.close()
            self._kv = KvStore(table.kv_path) if table.kv_path else None
        self._table = table

    def _resolve(self, target: str) -> tuple[Callable[..., Any] | None, str]:
        func = self._imported.get(target)
        if func is not None:
            return func, ""
        module_name, _, attribute = target.partition(":")
        try:
            module = importlib.import_module(module_name)
            func = getattr(module, attribute)
        except BaseException as exc:  # an import runs the operator's module code
            return None, f"{type(exc).__name__}: {exc}"
        if not callable(func):
            return None, f"{attribute!r} in {module_name} is not callable"
        self._imported[target] = func
        return func, ""

    def names(self) -> list[str]:
        return sorted(self._methods)

    def close(self) -> None:
        if self._kv is not None:
            self._kv.close()

    # ------------------------------------------------------------------ calls

    def call(self, tenant: str, name: str, request: bytes) -> tuple[bool, bytes]:
        """Call method `name` for `tenant` with a JSON `request`: (True, JSON response) or
        (False, JSON error `{"error": {"code", "message", ...}}`). Never raises."""
        try:
            if name.startswith("kv."):
                return self._kv_call(tenant, name, request)
            return self._call(tenant, name, request)
        except BaseException as exc:  # a bug of ours: the plugin still gets an answer
            self._log(name, tenant, "internal error", exc)
            return False, error_json(METHOD_FAILED, f"host method {name!r} failed in the host")

    def _call(self, tenant: str, name: str, request: bytes) -> tuple[bool, bytes]:
        method = self._methods.get(name)
        if method is None:
            return False, error_json(NOT_FOUND, f"no host method named {name!r}")
        if not method.anyone and tenant not in method.tenants:
            return False, error_json(NOT_ALLOWED,
                                     f"this tenant may not call host method {name!r}")
        spec = method.spec
        if len(request) > spec.max_request_bytes:
            return False, error_json(REQUEST_TOO_LARGE,
                                     f"the request is {len(request)} bytes; {name!r} takes at "
                                     f"most {spec.max_request_bytes}",
                                     limit=spec.max_request_bytes)
        func = method.func
        if func is None:
            return False, error_json(UNAVAILABLE, f"host method {name!r} is not available "
                                     "(its target could not be imported; the operator's log "
                                     "says why)")
        try:
            value = _decode(request)
        except msgspec.DecodeError as exc:
            return False, error_json(BAD_REQUEST, f"the request is not JSON: {exc}")
        started = time.perf_counter()
        try:
            result = self._run(func, value, MethodContext(tenant, name), method.timeout_s)
        except _Deadline:
            return self._timed_out(method, tenant, started)
        except MethodError as exc:
            return False, error_json(exc.code, exc.message)
        except Exception as exc:
            self._log(name, tenant, "raised", exc)
            return False, error_json(METHOD_FAILED, f"host method {name!r} raised "
                                     f"{type(exc).__name__} (details in the operator's log)")
        if time.perf_counter() - started > method.timeout_s:
            return self._timed_out(method, tenant, started)
        try:
            body = _encode(result)
        except (TypeError, ValueError, OverflowError) as exc:
            self._log(name, tenant, f"returned what JSON cannot encode: {exc}")
            return False, error_json(BAD_RESPONSE, f"host method {name!r} returned "
                                     f"{type(result).__name__}, which is not JSON")
        if len(body) > spec.max_response_bytes:
            self._log(name, tenant, f"returned {len(body)} bytes, over max_response_bytes "
                      f"({spec.max_response_bytes})")
            return False, error_json(RESPONSE_TOO_LARGE,
                                     f"host method {name!r} returned {len(body)} bytes, over "
                                     f"its {spec.max_response_bytes}-byte limit",
                                     limit=spec.max_response_bytes)
        return True, body

    def _run(self, func: Callable[..., Any], value: Any, context: MethodContext,
             timeout_s: float) -> Any:
        if not self._alarm or threading.get_ident() != self._main:
            return func(value, context)
        self._armed = True
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            return func(value, context)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            self._armed = False

    def _on_alarm(self, signum: int, frame: object) -> None:
        if self._armed:
            self._armed = False
            raise _Deadline

    def _timed_out(self, method: _Method, tenant: str,
                   started: float) -> tuple[bool, bytes]:
        timeout_ms = method.spec.timeout_ms
        elapsed_ms = (time.perf_counter() - started) * 1000
        self._log(method.spec.name, tenant,
                  f"timed out after {elapsed_ms:.0f} ms (timeout_ms {timeout_ms})")
        return False, error_json(TIMEOUT, f"host method {method.spec.name!r} did not answer "
                                 f"within {timeout_ms} ms", timeout_ms=timeout_ms)

    # ------------------------------------------------------------------ key-value state

    def _kv_call(self, tenant: str, name: str, request: bytes) -> tuple[bool, bytes]:
        kv = self._kv
        if kv is None:
            return False, error_json(UNAVAILABLE, "key-value state is not available here")
        if len(request) > KV_MAX_REQUEST_BYTES:
            return False, error_json(REQUEST_TOO_LARGE, f"a {name} request takes at most "
                                     f"{KV_MAX_REQUEST_BYTES} bytes",
                                     limit=KV_MAX_REQUEST_BYTES)
        try:
            if name == "kv.get":
                key = _key(_key_decoder.decode(request).key)
                value = kv.get(tenant, key)
                if value is None:
                    return True, _NOT_FOUND_VALUE
                return True, b'{"found":true,"value":' + value + b"}"
            if name == "kv.set":
                req = _set_decoder.decode(request)
                max_keys, max_bytes = self._quotas.get(tenant) or self._quotas.get(
                    "default", [0, 0])
                kv.set(tenant, _key(req.key), bytes(req.value), max_keys, max_bytes)
                return True, _OK
            if name == "kv.incr":
                req = _incr_decoder.decode(request)
                if not -(2**53) <= req.by <= 2**53:
                    raise ValueError("by must be within +-2**53")
                max_keys, max_bytes = self._quotas.get(tenant) or self._quotas.get(
                    "default", [0, 0])
                value = kv.incr(tenant, _key(req.key), req.by, max_keys, max_bytes)
                return True, b'{"value":%d}' % value
            if name == "kv.delete":
                deleted = kv.delete(tenant, _key(_key_decoder.decode(request).key))
                return True, b'{"deleted":true}' if deleted else b'{"deleted":false}'
            if name == "kv.list":
                req = _list_decoder.decode(request) if request.strip() else _ListRequest()
                if not 1 <= req.limit <= MAX_LIST:
                    raise ValueError(f"limit must be 1 to {MAX_LIST}")
                keys, more = kv.list(tenant, req.prefix, req.after, req.limit)
                return True, _encode({"keys": keys, "more": more})
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
            return False, error_json(BAD_REQUEST, f"{name}: {exc}")
        except QuotaExceeded as exc:
            return False, error_json(QUOTA_EXCEEDED,
                                     f"{name}: this tenant's key-value quota {exc.quota} is "
                                     f"{exc.limit}; the write would make it {exc.used}",
                                     quota=exc.quota, limit=exc.limit, used=exc.used)
        except Exception as exc:  # sqlite3.Error, OSError: the database, not the plugin
            self._log(name, tenant, "key-value database error", exc)
            return False, error_json(STORAGE_ERROR, f"{name}: the key-value database failed; "
                                     "try again later")
        return False, error_json(NOT_FOUND, f"no host method named {name!r} "
                                 "(kv.get, kv.set, kv.incr, kv.delete, kv.list)")

    # ------------------------------------------------------------------ the operator's log

    def _log(self, name: str, tenant: str, what: str,
             exc: BaseException | None = None) -> None:
        """One line (and a traceback) in the worker log, at most _LOG_BURST per method and
        minute: a plugin calling a failing method in a loop cannot flood the log."""
        now = time.monotonic()
        window = self._logged.setdefault(name, [now, 0, 0])
        if now - window[0] > _LOG_WINDOW_S:
            if window[2]:
                self._log_line(f"host method {name!r}: {int(window[2])} more failures not "
                               "logged in the last minute")
            window[:] = [now, 0, 0]
        if window[1] >= _LOG_BURST:
            window[2] += 1
            return
        window[1] += 1
        line = f"host method {name!r} (tenant {tenant!r}): {what}"
        if exc is not None:
            detail = "".join(traceback.format_exception(exc)).rstrip()
            line = f"{line}\n{detail}"
        self._log_line(line)


def _key(key: str) -> str:
    if not key or len(key.encode()) > MAX_KEY_BYTES:
        raise ValueError(f"a key is 1 to {MAX_KEY_BYTES} bytes of UTF-8")
    return key


def _stderr(line: str) -> None:
    print(f"wasm-core worker {os.getpid()}: {line}", file=sys.stderr, flush=True)
