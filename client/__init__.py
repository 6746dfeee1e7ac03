"""Python clients of wasm-core: `Client` (blocking) and `AsyncClient` (asyncio), the
`wasm-client` CLI, a load generator, and a launcher that starts a real server for scripts and
tests. Depends on `wasmcore.protocol` only: importing a client loads neither the supervisor
nor the wasm runtime.

Modules: `operations` is the transport-free core (each request, its reply wait, its result),
`results` and `shared_memory` what it builds on, and `core` the two clients that send and wait.
"""

from wasmcore.client.core import AsyncClient, ChainExecution, Client, Execution
from wasmcore.protocol import errors

__all__ = ["AsyncClient", "ChainExecution", "Client", "Execution", "errors"]
