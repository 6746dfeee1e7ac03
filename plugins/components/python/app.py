"""A wasm-core plugin in Python, built into a WebAssembly component by componentize-py.

What it does: returns its input upper-cased, followed by the value of the env variable
SUFFIX when the request sets one, and logs one line. The inputs `fail`, `trap` and `loop` show
how a plugin's failures look from the service: PLUGIN_ERROR, TRAP and TIMEOUT.

With the env variable OP set, it works with files and arguments instead (what a component
sees of the host: the request's arguments, a private /tmp, the operator's read-only dirs):
OP=read (the output is the file at PATH), OP=write (the input goes into the file at PATH;
the output says how many bytes, then what reading the file back gives), OP=ls (the names in
the directory PATH, one a line), OP=fill (SIZE bytes of zeros into the file at PATH; without
SIZE, without end), OP=args (the arguments, argv[0] first, one a line). A failing file
operation is a PLUGIN_ERROR naming the error. OP=call calls the host method METHOD with the
input as its JSON request: the output is `ok ` then its response, or `err ` then its error.

It implements the three entries of the world `plugin-with-files` (wit/wasm-core.wit):
`process` gets the input as a value, `process-stream` reads it from stdin and writes the
output to stdout, `process-file` reads it from stdin and writes the output to the file the
host names (the fastest way to move large payloads: docs/performance.md).

Build: plugins/components/build.sh (docs/plugin-abi.md, "A plugin in Python").
"""

import os
import sys

import wit_world
from componentize_py_types import Err
from wit_world.imports import host


def upper(input: bytes, env: list[tuple[str, str]]) -> bytes:
    op = dict(env).get("OP")
    if op is not None:
        try:
            return files(op, input, dict(env))
        except OSError as exc:
            raise Err(f"{op}: {exc}") from None  # PLUGIN_ERROR, naming the errno
    host.log(f"python plugin: {len(input)} bytes in")
    if input == b"fail":
        raise Err("asked to fail")  # PLUGIN_ERROR, with this message
    if input == b"trap":
        raise RuntimeError("asked to trap")  # an uncaught exception traps: TRAP
    if input == b"loop":
        while True:  # stopped by the timeout (epoch) or fuel
            pass
    return input.upper() + dict(env).get("SUFFIX", "").encode()


def files(op: str, input: bytes, env: dict[str, str]) -> bytes:
    path = env.get("PATH", "/tmp")
    if op == "read":
        with open(path, "rb") as f:
            return f.read()
    if op == "write":
        with open(path, "wb") as f:
            f.write(input)
        with open(path, "rb") as f:  # and read back
            return f"wrote {len(input)}: ".encode() + f.read()
    if op == "ls":
        return "".join(f"{name}\n" for name in sorted(os.listdir(path))).encode()
    if op == "fill":
        left = int(env["SIZE"]) if "SIZE" in env else -1
        chunk = bytes(65536)
        with open(path, "wb") as f:
            while left != 0:
                piece = chunk if left < 0 else chunk[:min(left, len(chunk))]
                f.write(piece)
                left -= len(piece) if left > 0 else 0
        return b"filled"
    if op == "call":
        try:
            return b"ok " + host.call(env.get("METHOD", ""), input.decode()).encode()
        except Err as err:
            return b"err " + str(err.value).encode()
    if op == "args":
        return "".join(f"{arg}\n" for arg in sys.argv).encode()
    raise Err(f"unknown OP {op!r}: read, write, ls, fill, args or call")


class WitWorld(wit_world.WitWorld):
    def process(self, input: bytes, env: list[tuple[str, str]]) -> bytes:
        return upper(input, env)

    def process_stream(self, env: list[tuple[str, str]]) -> None:
        write_all(upper(sys.stdin.buffer.read(), env))

    def process_file(self, output_path: str, env: list[tuple[str, str]]) -> None:
        output = upper(sys.stdin.buffer.read(), env)
        with open(output_path, "wb") as f:
            f.write(output)


def write_all(data: bytes) -> None:
    """Stdout takes at most 8 KiB per write here, and sys.stdout.buffer.write may stop after
    the first: write to fd 1 until everything is out."""
    view = memoryview(data)
    while view:
        view = view[os.write(1, view):]
