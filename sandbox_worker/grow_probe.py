"""The grow probe: makes a refused `memory.grow` visible to the host, at compile time.

Why: a memory grow refused by the store's memory limit only returns -1 to the plugin, and
real allocators then trap (`__builtin_trap()` after a failed malloc, Rust's alloc-error
handler): the host sees a bare `unreachable` trap. wasmtime's C API has no resource-limiter
callback (`wasmtime_store_limiter` takes numbers only) and no trap-on-grow-failure option, so
the host cannot tell that the limit caused it, nor what was asked for.

What it does: every `memory.grow` of memory 0 in the module's code becomes a call to one
appended function, which grows the memory and, when the grow returns -1, stores the number of
pages asked for in one appended mutable i32 global, exported as `PROBE_EXPORT`. After a failed
execution the host reads that global: non-zero, and the memory's size plus that many pages is
over the limit, means a grow was refused by the limit (MEMORY_LIMIT, with the sizes).
Nothing is renumbered: the function and the global are appended after all existing ones.

The decoder knows the instructions of the MVP, sign extension, saturating truncation, bulk
memory, reference types, typed function references, tail calls, exceptions, SIMD (relaxed too)
and threads. A module using anything else (the GC proposal, memory64 memory 0) is left as it
was (`instrument` returns None), and its executions fall back to the size-only check.
Function bodies without the bytes of `memory.grow 0` are copied without decoding, so a large
module costs little.
"""

from __future__ import annotations

PROBE_EXPORT = "__wasmcore_grow_refused"

_MAGIC = b"\0asm\x01\0\0\0"
_TYPE, _IMPORT, _FUNCTION, _TABLE, _MEMORY, _GLOBAL, _EXPORT = 1, 2, 3, 4, 5, 6, 7
_CODE = 10
_TAG = 13
# Where a section goes relative to the others (the binary format's order; custom sections
# may sit anywhere).
_ORDER = {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 13: 6, 6: 7, 7: 8, 8: 9, 9: 10, 12: 11, 10: 12, 11: 13}
_GROW0 = b"\x40\x00"


class _Unsupported(Exception):
    """An instruction or construct this decoder does not know: leave the module alone."""


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data = data
        self.pos = pos

    def byte(self) -> int:
        value = self.data[self.pos]
        self.pos += 1
        return value

    def uleb(self) -> int:
        result = shift = 0
        while True:
            value = self.data[self.pos]
            self.pos += 1
            result |= (value & 0x7F) << shift
            if value < 0x80:
                return result
            shift += 7

    def skip_leb(self) -> None:
        data = self.data
        while data[self.pos] & 0x80:
            self.pos += 1
        self.pos += 1

    def name(self) -> None:
        length = self.uleb()
        self.pos += length


def uleb(value: int) -> bytes:
    """`value` as an unsigned LEB128 (the wasm binary format's integers)."""
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _valtype(r: _Reader) -> None:
    if r.byte() in (0x63, 0x64):  # (ref null? heaptype)
        r.skip_leb()


def _blocktype(r: _Reader) -> None:
    first = r.data[r.pos]
    if first in (0x63, 0x64):
        r.pos += 1
        r.skip_leb()
    else:
        r.skip_leb()  # 0x40, a one-byte value type, or a type index (s33)


def _memarg(r: _Reader) -> None:
    align = r.uleb()
    if align & 0x40:  # multi-memory: a memory index follows
        r.skip_leb()
    r.skip_leb()  # offset


def _limits(r: _Reader) -> int:
    flags = r.byte()
    r.skip_leb()
    if flags & 1:
        r.skip_leb()
    if flags & 8:  # custom page size
        r.skip_leb()
    return flags


# Opcodes followed by one LEB immediate.
_ONE_LEB = frozenset([0x07, 0x08, 0x09, 0x0C, 0x0D, 0x10, 0x12, 0x14, 0x15, 0x18, 0x20, 0x21,
                      0x22, 0x23, 0x24, 0x25, 0x26, 0x3F, 0x40, 0x41, 0x42, 0xD0, 0xD2, 0xD5,
                      0xD6])
_NO_IMMEDIATE = frozenset([0x00, 0x01, 0x05, 0x0A, 0x0B, 0x0F, 0x19, 0x1A, 0x1B, 0xD1, 0xD3,
                           0xD4, *range(0x45, 0xC5)])
_FC_NONE = frozenset(range(0, 8))
_FC_ONE = frozenset([9, 11, 13, 15, 16, 17])
_FC_TWO = frozenset([8, 10, 12, 14])


def _rewrite_body(body: bytes, call: bytes) -> bytes:
    """`body` (locals and code of one function) with each `memory.grow 0` replaced by `call`."""
    r = _Reader(body)
    for _ in range(r.uleb()):  # local declarations
        r.skip_leb()
        _valtype(r)
    out = bytearray(body[: r.pos])
    copied = r.pos
    end = len(body)
    data = body
    while r.pos < end:
        start = r.pos
        op = data[r.pos]
        r.pos += 1
        if op in _NO_IMMEDIATE:
            continue
        if op in _ONE_LEB:
            if op == 0x40:
                memory = r.uleb()
                if memory == 0:
                    out += data[copied:start]
                    out += call
                    copied = r.pos
            else:
                r.skip_leb()
        elif op in (0x02, 0x03, 0x04, 0x06):
            _blocktype(r)
        elif 0x28 <= op <= 0x3E:
            _memarg(r)
        elif op == 0x43:
            r.pos += 4
        elif op == 0x44:
            r.pos += 8
        elif op == 0x0E:  # br_table
            for _ in range(r.uleb() + 1):
                r.skip_leb()
        elif op in (0x11, 0x13):
            r.skip_leb()
            r.skip_leb()
        elif op == 0x1C:  # select t*
            for _ in range(r.uleb()):
                _valtype(r)
        elif op == 0x1F:  # try_table
            _blocktype(r)
            for _ in range(r.uleb()):
                kind = r.byte()
                if kind in (0, 1):
                    r.skip_leb()
                r.skip_leb()
        elif op == 0xFC:
            sub = r.uleb()
            if sub in _FC_NONE:
                pass
            elif sub in _FC_ONE:
                r.skip_leb()
            elif sub in _FC_TWO:
                r.skip_leb()
                r.skip_leb()
            else:
                raise _Unsupported(f"0xfc {sub}")
        elif op == 0xFD:
            sub = r.uleb()
            if sub <= 11 or sub in (92, 93):
                _memarg(r)
            elif sub in (12, 13):
                r.pos += 16
            elif 21 <= sub <= 34:
                r.pos += 1
            elif 84 <= sub <= 91:
                _memarg(r)
                r.pos += 1
        elif op == 0xFE:
            sub = r.uleb()
            if sub == 3:  # atomic.fence
                r.pos += 1
            else:
                _memarg(r)
        else:
            raise _Unsupported(f"opcode {op:#x}")
    if r.pos != end:
        raise _Unsupported("body overrun")
    out += data[copied:]
    return bytes(out)


def _sections(wasm: bytes) -> list[tuple[int, bytes]]:
    r = _Reader(wasm, len(_MAGIC))
    sections = []
    while r.pos < len(wasm):
        section_id = r.byte()
        size = r.uleb()
        sections.append((section_id, wasm[r.pos: r.pos + size]))
        r.pos += size
    if r.pos != len(wasm):
        raise _Unsupported("truncated section")
    return sections


def _vector(count: int, items: bytes) -> bytes:
    return uleb(count) + items


def _count_and_rest(content: bytes) -> tuple[int, bytes]:
    r = _Reader(content)
    count = r.uleb()
    return count, content[r.pos:]


def instrument(wasm: bytes) -> bytes | None:
    """`wasm` with the grow probe, or None when it has no `memory.grow` of memory 0 or uses
    something this decoder does not know (then it runs as it is)."""
    if not wasm.startswith(_MAGIC) or _GROW0 not in wasm:
        return None
    try:
        return _instrument(wasm)
    except (_Unsupported, IndexError):
        return None


def _instrument(wasm: bytes) -> bytes | None:
    sections = _sections(wasm)
    by_id = {sid: content for sid, content in sections if sid != 0}
    if _CODE not in by_id or _TYPE not in by_id:
        return None
    imported_funcs = imported_globals = 0
    memory0_flags: int | None = None
    if _IMPORT in by_id:
        r = _Reader(by_id[_IMPORT])
        for _ in range(r.uleb()):
            r.name()
            r.name()
            kind = r.byte()
            if kind == 0:
                imported_funcs += 1
                r.skip_leb()
            elif kind == 1:
                _valtype(r)
                _limits(r)
            elif kind == 2:
                flags = _limits(r)
                if memory0_flags is None:
                    memory0_flags = flags
            elif kind == 3:
                imported_globals += 1
                _valtype(r)
                r.byte()
            elif kind == 4:
                r.byte()
                r.skip_leb()
            else:
                raise _Unsupported(f"import kind {kind}")
    if memory0_flags is None and _MEMORY in by_id:
        r = _Reader(by_id[_MEMORY])
        if r.uleb():
            memory0_flags = _limits(r)
    if memory0_flags is None or memory0_flags & 4:  # no memory, or memory64
        return None

    type_count, type_rest = _count_and_rest(by_id[_TYPE])
    func_count, func_rest = _count_and_rest(by_id.get(_FUNCTION, b"\0"))
    global_count, global_rest = _count_and_rest(by_id.get(_GLOBAL, b"\0"))
    export_count, export_rest = _count_and_rest(by_id.get(_EXPORT, b"\0"))
    r = _Reader(type_rest)
    for _ in range(type_count):  # plain function types only: a rec group defines several
        if r.byte() != 0x60:
            raise _Unsupported("not a plain function type (GC proposal)")
        for _ in range(2):
            for _ in range(r.uleb()):
                _valtype(r)
    probe_func = imported_funcs + func_count
    probe_global = imported_globals + global_count
    call = b"\x10" + uleb(probe_func)

    r = _Reader(by_id[_CODE])
    bodies: list[bytes] = []
    changed = False
    for _ in range(r.uleb()):
        size = r.uleb()
        body = by_id[_CODE][r.pos: r.pos + size]
        r.pos += size
        if _GROW0 in body:
            new = _rewrite_body(body, call)
            changed = changed or new != body
            body = new
        bodies.append(uleb(len(body)) + body)
    if not changed:
        return None

    # (func (param i32) (result i32) (local i32)
    #   local.get 0  memory.grow 0  local.tee 1  i32.const -1  i32.eq
    #   if  local.get 0  global.set $probe  end  local.get 1)
    probe_body = (b"\x01\x01\x7f" + b"\x20\x00\x40\x00\x22\x01\x41\x7f\x46\x04\x40\x20\x00"
                  + b"\x24" + uleb(probe_global) + b"\x0b\x20\x01\x0b")
    bodies.append(uleb(len(probe_body)) + probe_body)
    name = PROBE_EXPORT.encode()
    replaced = {
        _TYPE: _vector(type_count + 1, type_rest + b"\x60\x01\x7f\x01\x7f"),
        _FUNCTION: _vector(func_count + 1, func_rest + uleb(type_count)),
        _GLOBAL: _vector(global_count + 1, global_rest + b"\x7f\x01\x41\x00\x0b"),
        _EXPORT: _vector(export_count + 1, export_rest + uleb(len(name)) + name + b"\x03"
                         + uleb(probe_global)),
        _CODE: _vector(len(bodies), b"".join(bodies)),
    }
    out = bytearray(_MAGIC)
    pending = dict(replaced)
    for sid, content in sections:
        if sid != 0:
            # Sections this module lacked go in before the first one that follows them.
            for missing in sorted((m for m in pending if m not in by_id),
                                  key=lambda m: _ORDER[m]):
                if _ORDER[missing] < _ORDER[sid]:
                    out += _section(missing, pending.pop(missing))
            if sid in pending:
                content = pending.pop(sid)
        out += _section(sid, content)
    for missing in sorted(pending, key=lambda m: _ORDER[m]):
        out += _section(missing, pending[missing])
    return bytes(out)


def _section(section_id: int, content: bytes) -> bytes:
    return bytes([section_id]) + uleb(len(content)) + content

