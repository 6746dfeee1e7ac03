"""The contract every wasm-core process shares: wire messages, error codes, limits,
shared-memory segments, the settings a worker is started with, and the engine fingerprint.

It imports no other wasmcore package, so the client, the supervisor and the worker can each
depend on it without depending on each other.
"""

__version__ = "0.1.0"
