"""What a refused module's imports say about the toolchain that built it, and what to build
instead.

Only imports the service does *not* provide are looked at, so once the service learns a
family's imports (Extism's kernel, say) its hint stops appearing by itself. The advice is one
table in one function (`toolchain_hint`, plus `binary_hint` for what is not a core module at
all): edit it there when the service learns to run another kind of plugin. Pure: no wasmtime.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .imports_scan import WASM_MAGIC, Buffer


@dataclass(frozen=True, slots=True)
class Hint:
    toolchain: str  # stable: details.toolchain of the refusal
    advice: str  # a sentence: what the module looks like, and what to build instead


def toolchain_hint(missing: Iterable[tuple[str, str]]) -> Hint | None:
    """The toolchain whose imports are among `missing` ((module, name) pairs the service does
    not provide), first match in the table's order; None when none is recognised."""
    missing = list(missing)
    for toolchain, matches, advice in _TABLE:
        if any(matches(module, name) for module, name in missing):
            return Hint(toolchain, advice)
    return None


def binary_hint(data: Buffer) -> Hint | None:
    """For a binary that is not a core module: a component (its preamble's layer field is 1)
    gets advice; anything else None."""
    if len(data) >= 8 and bytes(data[:4]) == WASM_MAGIC and bytes(data[6:8]) == b"\x01\0":
        return Hint("component", _COMPONENT)
    return None


_ABI = "docs/plugin-abi.md"
_COMPONENT = (
    "Where components are not run, build a core module instead (Rust: --target "
    "wasm32-wasip1, not wasm32-wasip2; or the core module from before `wasm-tools component "
    f"new`); see {_ABI}.")

# (toolchain, does this missing import belong to it, advice). Order matters where families
# overlap: napi-rs's Node-API shims are built with emscripten's tools, Go's with nothing else.
_TABLE = (
    ("extism",
     lambda module, name: module.startswith("extism:"),
     "It is an Extism plugin (built with an Extism PDK), and this server does not provide "
     "the Extism host functions named here; a plugin that needs its embedder's own host "
     "functions (extism:host/user) cannot run here. "
     f"See {_ABI} for the plugins and imports this server runs."),
    ("go-js",
     lambda module, name: module in ("gojs", "go"),
     "It was built with GOOS=js GOARCH=wasm, whose imports only Go's wasm_exec.js provides: "
     "build with GOOS=wasip1 GOARCH=wasm (Go 1.21+) for a WASI command, or with TinyGo "
     "-target=wasi."),
    ("wasm-bindgen",
     lambda module, name: (module in ("wbg", "__wbindgen_placeholder__",
                                      "__wbindgen_externref_xform__")
                           or name.startswith(("__wbindgen_", "__wbg_"))),
     "It was built with wasm-bindgen, whose imports only its generated JavaScript provides: "
     "build without wasm-bindgen, for wasm32-wasip1 (a WASI command: stdin in, stdout out) "
     f"or for wasm32-unknown-unknown exporting memory, alloc and process ({_ABI})."),
    ("napi-rs",
     lambda module, name: module == "env" and name.startswith(("napi_", "emnapi_")),
     "It is a Node-API addon (napi-rs), whose env.napi_* functions only Node.js provides: "
     "build the code without napi as a wasm32-wasip1 binary (a WASI command, or the "
     f"process ABI of {_ABI})."),
    ("emscripten",
     lambda module, name: module == "env" and name.startswith(
         ("emscripten_", "_emscripten_", "invoke_", "__syscall_")),
     "It was built with emscripten for its JavaScript runtime (env.emscripten_*, invoke_*): "
     "build a standalone WASI module (emcc -sSTANDALONE_WASM, with -fno-exceptions or "
     "-fwasm-exceptions so that no invoke_* trampolines are needed), or use clang "
     "--target=wasm32-wasi with wasi-libc."),
)
