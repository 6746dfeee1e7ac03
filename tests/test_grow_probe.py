"""The grow probe (sandbox_worker/grow_probe.py) on its own: the rewritten module is valid,
behaves as the original (memory.grow still returns what it did), and its exported global
holds the pages of the last grow the limit refused."""

from __future__ import annotations

import wasmtime

from tests.conftest import HOSTILE, PLUGINS
from wasmcore.sandbox_worker.grow_probe import PROBE_EXPORT, instrument

# No global, export or start section of its own, a grow inside a block and a loop, SIMD and
# bulk-memory instructions around it: the decoder must keep its place through all of them.
MIXED = """
(module
  (memory 1)
  (func $f (param $n i32) (result i32)
    (local $v v128)
    (local.set $v (v128.const i32x4 1 2 3 4))
    (memory.fill (i32.const 0) (i32.const 7) (i32.const 16))
    (block $out (result i32)
      (loop $again
        (br_if $again (i32.eqz (i32.const 1)))
        (br $out (memory.grow (local.get $n))))
      (i32.const 0)))
  (func (export "grow") (param i32) (result i32) (call $f (local.get 0)))
  (func (export "size") (result i32) (memory.size))
)
"""


def _instance(wasm: bytes, limit_bytes: int) -> tuple[wasmtime.Store, wasmtime.Instance]:
    engine = wasmtime.Engine()
    store = wasmtime.Store(engine)
    store.set_limits(memory_size=limit_bytes)
    return store, wasmtime.Instance(store, wasmtime.Module(engine, wasm), [])


def test_probe_records_the_refused_grow_only() -> None:
    original = wasmtime.wat2wasm(MIXED)
    probed = instrument(original)
    assert probed is not None
    store, instance = _instance(probed, 4 * 65536)
    exports = instance.exports(store)
    probe = exports[PROBE_EXPORT]
    assert isinstance(probe, wasmtime.Global)
    assert exports["grow"](store, 2) == 1  # grown from 1 page: as without the probe
    assert probe.value(store) == 0
    assert exports["grow"](store, 5) == -1  # 3 + 5 > 4 pages: refused
    assert probe.value(store) == 5
    assert exports["size"](store) == 3
    # the original does the same, without the global
    store, instance = _instance(original, 4 * 65536)
    assert instance.exports(store)["grow"](store, 2) == 1
    assert PROBE_EXPORT not in [e.name for e in wasmtime.Module(store.engine, original).exports]


def test_every_plugin_here_is_probed_validly() -> None:
    engine = wasmtime.Engine()
    probed = 0
    for path in sorted(PLUGINS.glob("*.wasm")) + sorted(HOSTILE.glob("*.wasm")):
        wasm = path.read_bytes()
        out = instrument(wasm)
        if out is None:
            continue
        wasmtime.Module.validate(engine, out)
        probed += 1
    assert probed >= 10


def test_modules_without_a_grow_are_left_alone() -> None:
    wasm = wasmtime.wat2wasm('(module (memory 1) (func (export "f") (result i32) '
                             "(memory.size)))")
    assert instrument(wasm) is None
    assert instrument(b"not wasm") is None
