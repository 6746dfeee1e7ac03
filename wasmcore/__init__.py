"""wasm-core: a multi-tenant WebAssembly execution service."""

__version__ = "0.1.0"
