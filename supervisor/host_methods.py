"""The host methods table workers get: the operator's methods ([host_methods."<name>"]) and
where the built-in key-value state lives, with each tenant's quota on it.

The supervisor never imports or runs an operator's callable: it only names it. Workers
import and call it (sandbox_worker/host_methods.py). The table is built from the config, so
it changes with a reload; the server sends it to every executing worker on the socket its
jobs take (docs/architecture.md, "How a config reload reaches the workers").
"""

from __future__ import annotations

from pathlib import Path

from wasmcore.protocol import messages as p
from wasmcore.supervisor.config import Config

KV_DIR = "kv"
KV_FILE = "state.sqlite3"


def kv_dir(config: Config) -> Path:
    """The directory of the key-value database: workers create the file (and SQLite its
    -wal and -shm files) there, so the sandbox group may write in it."""
    return Path(config.server.data_dir) / KV_DIR


def method_table(config: Config) -> p.HostMethodTable:
    methods = [
        p.HostMethodSpec(
            name=name,
            target=method.target,
            tenants=["*"] if method.tenants == "*" else list(method.tenants),
            timeout_ms=method.timeout_ms,
            max_request_bytes=method.max_request_bytes,
            max_response_bytes=method.max_response_bytes,
        )
        for name, method in sorted(config.host_methods.items())
    ]
    quotas = {name: [tenant.kv_max_keys, tenant.kv_max_bytes]
              for name, tenant in config.tenants.items()}
    fallback = config.tenant("default")  # [tenants.default], else the built-in defaults
    quotas["default"] = [fallback.kv_max_keys, fallback.kv_max_bytes]
    return p.HostMethodTable(methods=methods, kv_path=str(kv_dir(config) / KV_FILE),
                             kv_quotas=quotas)
