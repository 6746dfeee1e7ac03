"""A wasm-core plugin in Python, built into a WebAssembly component by componentize-py.

What it does: returns its input upper-cased, followed by the value of the env variable
SUFFIX when the request sets one, and logs one line. The inputs `fail`, `trap` and `loop` show
how a plugin's failures look from the service: PLUGIN_ERROR, TRAP and TIMEOUT.

Build: plugins/components/build.sh (docs/plugin-abi.md, "A plugin in Python").
"""

import wit_world
from componentize_py_types import Err
from wit_world.imports import host


class WitWorld(wit_world.WitWorld):
    def process(self, input: bytes, env: list[tuple[str, str]]) -> bytes:
        settings = dict(env)
        host.log(f"python plugin: {len(input)} bytes in")
        if input == b"fail":
            raise Err("asked to fail")  # PLUGIN_ERROR, with this message
        if input == b"trap":
            raise RuntimeError("asked to trap")  # an uncaught exception traps: TRAP
        if input == b"loop":
            while True:  # stopped by the timeout (epoch) or fuel
                pass
        return input.upper() + settings.get("SUFFIX", "").encode()
