"""Big WebAssembly modules built directly in the binary format, fast even at tens of MB.

Used by the compile-lane benchmark and tests: a module that is cheap to generate but costs
seconds to compile, optionally with imports the service cannot provide (the shape of a
wasm-bindgen, Go js/wasm or emscripten module).
"""

from __future__ import annotations

from wasmcore.sandbox_worker.grow_probe import uleb

_I32 = 0x7F


def sleb(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        done = (value == 0 and not byte & 0x40) or (value == -1 and byte & 0x40)
        out.append(byte if done else byte | 0x80)
        if done:
            return bytes(out)


def _name(text: str) -> bytes:
    raw = text.encode()
    return uleb(len(raw)) + raw


def _vec(items: list[bytes]) -> bytes:
    return uleb(len(items)) + b"".join(items)


def _section(section_id: int, body: bytes) -> bytes:
    return bytes([section_id]) + uleb(len(body)) + body


def _filler_tail(seed: int, steps: int) -> bytes:
    """Adds and xors of the argument with constants, then the end of the function."""
    code = bytearray()
    for step in range(steps):
        code += b"\x41" + sleb((step * 7919 + seed) % 100_000)  # i32.const
        code += b"\x6a\x20\x00\x73"  # i32.add, local.get 0, i32.xor
    return bytes(code) + b"\x0b"


def _filler_body(index: int, tail: bytes) -> bytes:
    """(param i32) (result i32), different per function (its first constant)."""
    code = b"\x00\x20\x00\x41" + sleb(index) + b"\x6a" + tail  # no locals; x + index ...
    return uleb(len(code)) + code


def big_module(size_bytes: int, seed: int = 0, imports: list[tuple[str, str]] = (),
               steps: int = 40) -> bytes:
    """A valid core module of about `size_bytes`: a no-argument entry `run` and as many
    filler functions as fit. `imports` adds function imports () -> () (module, name)."""
    types = _vec([
        b"\x60" + _vec([]) + _vec([]),  # 0: () -> ()
        b"\x60" + _vec([bytes([_I32])]) + _vec([bytes([_I32])]),  # 1: (i32) -> i32
    ])
    tail = _filler_tail(seed, steps)
    bodies: list[bytes] = []
    total = 0
    while total < size_bytes or not bodies:
        bodies.append(_filler_body(len(bodies), tail))
        total += len(bodies[-1])
    count = len(bodies)
    functions = _vec([b"\x01"] * count + [b"\x00"])  # fillers, then `run`
    run_index = len(imports) + count
    sections = [_section(1, types)]
    if imports:
        sections.append(_section(2, _vec([_name(m) + _name(n) + b"\x00\x00"
                                          for m, n in imports])))
    sections += [
        _section(3, functions),
        _section(7, _vec([_name("run") + b"\x00" + uleb(run_index)])),
        _section(10, _vec([*bodies, b"\x02\x00\x0b"])),
    ]
    return b"\0asm\x01\0\0\0" + b"".join(sections)
