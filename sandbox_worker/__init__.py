"""The worker process and the wasmtime sandbox it runs executions in."""
