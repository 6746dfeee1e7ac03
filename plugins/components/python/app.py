"""A wasm-core plugin in Python, built into a WebAssembly component by componentize-py.

What it does: returns its input upper-cased, followed by the value of the env variable
SUFFIX when the request sets one, and logs one line. The inputs `fail`, `trap` and `loop` show
how a plugin's failures look from the service: PLUGIN_ERROR, TRAP and TIMEOUT.

It implements both entries of the world `plugin-with-stream` (wit/wasm-core.wit): `process`
gets the input as a value, `process-stream` reads it from stdin and writes the output to
stdout (the way to move large payloads at memory speed).

Build: plugins/components/build.sh (docs/plugin-abi.md, "A plugin in Python").
"""

import os
import sys

import wit_world
from componentize_py_types import Err
from wit_world.imports import host


def upper(input: bytes, env: list[tuple[str, str]]) -> bytes:
    host.log(f"python plugin: {len(input)} bytes in")
    if input == b"fail":
        raise Err("asked to fail")  # PLUGIN_ERROR, with this message
    if input == b"trap":
        raise RuntimeError("asked to trap")  # an uncaught exception traps: TRAP
    if input == b"loop":
        while True:  # stopped by the timeout (epoch) or fuel
            pass
    return input.upper() + dict(env).get("SUFFIX", "").encode()


class WitWorld(wit_world.WitWorld):
    def process(self, input: bytes, env: list[tuple[str, str]]) -> bytes:
        return upper(input, env)

    def process_stream(self, env: list[tuple[str, str]]) -> None:
        write_all(upper(sys.stdin.buffer.read(), env))


def write_all(data: bytes) -> None:
    """Stdout takes at most 8 KiB per write here, and sys.stdout.buffer.write may stop after
    the first: write to fd 1 until everything is out."""
    view = memoryview(data)
    while view:
        view = view[os.write(1, view):]
