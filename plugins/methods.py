"""Sample host methods (docs/plugin-abi.md, section 5): Python callables an operator names in
the config, e.g.

    [host_methods."echo"]
    target = "wasmcore.plugins.methods:echo"
    tenants = "*"

Each takes the decoded JSON request and a context (`context.tenant`, `context.method`) and
returns what JSON can encode. They run inside the worker process (as its unprivileged user,
under its seccomp filter). Some misbehave on purpose, for the tests: `fail`, `slow`,
`not_json`.
"""

from __future__ import annotations

import time
from typing import Any

from wasmcore.sandbox_worker.host_methods import MethodContext, MethodError


def echo(request: Any, context: MethodContext) -> Any:
    """The request, unchanged."""
    return request


def whoami(request: Any, context: MethodContext) -> dict[str, str]:
    """Who called: the tenant of the execution, and the method's name."""
    return {"tenant": context.tenant, "method": context.method}


def shout(request: Any, context: MethodContext) -> Any:
    """Strings in the request upper-cased (the same shape otherwise)."""
    if isinstance(request, str):
        return request.upper()
    if isinstance(request, list):
        return [shout(item, context) for item in request]
    if isinstance(request, dict):
        return {key: shout(value, context) for key, value in request.items()}
    return request


def fail(request: Any, context: MethodContext) -> Any:
    """Raises: the plugin gets METHOD_FAILED, the worker log the traceback."""
    raise RuntimeError("sample method failing on purpose")


def refuse(request: Any, context: MethodContext) -> Any:
    """Raises MethodError: its message is meant for the plugin."""
    raise MethodError("refused: this sample always says no", code="REFUSED")


def slow(request: Any, context: MethodContext) -> Any:
    """Sleeps request["ms"] milliseconds (default 10 s), then answers."""
    ms = request.get("ms", 10_000) if isinstance(request, dict) else 10_000
    time.sleep(ms / 1000)
    return {"slept_ms": ms}


def not_json(request: Any, context: MethodContext) -> Any:
    """Returns an object JSON cannot encode: the plugin gets BAD_RESPONSE."""
    return object()
