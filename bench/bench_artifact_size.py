"""How large a compiled artifact is against its module: the figure behind the workers'
RLIMIT_FSIZE (`[sandbox] max_file_mb`, derived as 32 x server.max_payload_bytes).

    python bench/bench_artifact_size.py

A worker writes two kinds of files: output segments (at most limits.output_bytes) and compiled
artifacts, whose size depends on the code. This compiles modules of a few shapes with the
workers' own engine settings (`Sandbox`) and prints artifact bytes / module bytes.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import wasmtime  # noqa: E402

from wasmcore.protocol.settings import SandboxConfig  # noqa: E402
from wasmcore.sandbox_worker.runtime import Sandbox  # noqa: E402

PLUGINS = ROOT / "plugins"


def with_abi(functions: str) -> bytes:
    """The uppercase plugin (so the module has an entry) plus `functions`."""
    upper = (PLUGINS / "uppercase.wat").read_text()
    return wasmtime.wat2wasm(upper.rstrip().rstrip(")") + "\n" + functions + "\n)")


def arithmetic(n: int) -> bytes:  # bench_reload's big module
    body = " ".join(f"(i32.add (local.get 0) (i32.const {i}))" for i in range(40))
    return with_abi("\n".join(
        f'(func (export "f{i}") (param i32) (result i32) {body} '
        f"{' '.join(['i32.xor'] * 39)} (i32.const 0) i32.add)" for i in range(n)))


def calls(n: int) -> bytes:
    return with_abi("\n".join(
        f"(func $c{i} (param i32) (result i32) "
        + "".join(f"(call $c{max(0, i - 1 - k)} " for k in range(8)) + "(local.get 0)"
        + ")" * 8 + ")" for i in range(n)))


def memory(n: int) -> bytes:
    body = " ".join(f"(i32.store offset={4 * k} (local.get 0) (i32.load offset={4 * k + 4} "
                    "(local.get 0)))" for k in range(30))
    return with_abi("\n".join(f"(func (param i32) {body})" for i in range(n)))


def locals_heavy(n: int) -> bytes:
    decls = " ".join("(local i64)" for _ in range(64))
    body = " ".join(f"(local.set {k + 1} (i64.mul (local.get {k}) (local.get {k})))"
                    for k in range(63))
    return with_abi("\n".join(f"(func (param i64) {decls} {body})" for _ in range(n)))


def empty_loops(n: int) -> bytes:
    """The densest code found: 3 bytes of wasm each, and every loop gets an epoch and a
    fuel check."""
    return with_abi("\n".join("(func " + "(loop) " * 500 + ")" for _ in range(n // 10)))


def main() -> None:
    sandbox = Sandbox(SandboxConfig())
    print(f"{'shape':16} {'module bytes':>13} {'artifact bytes':>15} {'ratio':>6}")
    worst = 0.0
    for name, make in (("arithmetic", arithmetic), ("calls", calls), ("memory", memory),
                       ("locals", locals_heavy), ("empty loops", empty_loops)):
        for n in (100, 1000, 4000):
            wasm = make(n)
            artifact = sandbox.compile(wasm).module.serialize()
            ratio = len(artifact) / len(wasm)
            worst = max(worst, ratio)
            print(f"{name + ' x' + str(n):16} {len(wasm):>13} {len(artifact):>15} "
                  f"{ratio:>6.2f}")
    print(f"largest ratio: {worst:.2f}")
    sandbox.close()


if __name__ == "__main__":
    main()
