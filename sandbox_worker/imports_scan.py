"""Read a WebAssembly binary's import section without compiling or validating the rest.

What a module imports is declared in its first sections (the import section comes before any
code), so whether the service can link a module is known from its first bytes: a 30 MB
module is judged in microseconds instead of after a compile of many seconds. Nothing past
the import section is read, so this works on an mmap of the blob and touches only its first
pages. Pure Python over bytes: no wasmtime, no I/O.

The rest of the module is still validated by the compile; a module that passes here may be
refused there (for example, an import of the right name with the wrong signature).
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass

# bytes, or an mmap of a blob: indexing gives ints, slicing gives bytes.
Buffer = bytes | mmap.mmap

WASM_MAGIC = b"\0asm"
CORE_VERSION = b"\x01\0\0\0"
_COMPONENT_LAYER = b"\x01\0"  # bytes 6-7 of a component's preamble (version 0x0d, layer 1)
_IMPORT_SECTION = 2
_KINDS = {0: "func", 1: "table", 2: "memory", 3: "global", 4: "tag"}
# More custom sections than this before the import section: stop looking and let the
# compile decide (legal, but a Python loop over millions of tiny sections would not be quick).
MAX_SECTIONS_SCANNED = 10_000
# wasmparser accepts up to 1,000,000 imports; no module this service can link has more than
# a few hundred, so past this many the module is refused without reading them all.
MAX_IMPORTS = 100_000


class NotCoreModule(ValueError):
    """Not a WebAssembly core module binary (the message says what it looks like)."""


class MalformedImports(ValueError):
    """The preamble or the import section cannot be read (the message says where)."""


@dataclass(frozen=True, slots=True)
class Import:
    module: str
    name: str
    kind: str  # "func", "table", "memory", "global", "tag"

    def __str__(self) -> str:
        return f"{self.module}.{self.name}"


def read_imports(data: Buffer) -> list[Import] | None:
    """The module's imports in order; [] when it has none; None when the scan gave up (too
    many sections before the imports: the compile decides). Raises NotCoreModule or
    MalformedImports. `data` may be an mmap: only the pages read are touched, and no buffer
    export is left behind to stop it from closing."""
    view = data
    if len(view) < 8 or bytes(view[:4]) != WASM_MAGIC:
        raise NotCoreModule("not a WebAssembly module: a binary starts with \\0asm, and text "
                            "must be WAT")
    version = bytes(view[4:8])
    if version != CORE_VERSION:
        if version[2:] == _COMPONENT_LAYER:
            raise NotCoreModule("a WebAssembly component, not a core module: the service "
                                "runs core modules (wasm32, preview 1)")
        raise NotCoreModule(f"unsupported WebAssembly binary version {version.hex()} "
                            "(expected 01000000, a core module)")
    pos = 8
    for _ in range(MAX_SECTIONS_SCANNED):
        if pos >= len(view):
            return []
        section_id = view[pos]
        size, start = _u32(view, pos + 1, "a section size")
        end = start + size
        if section_id == _IMPORT_SECTION:
            if end > len(view):
                raise MalformedImports(
                    f"malformed module: the import section ({size} bytes at offset {start}) "
                    f"runs past the end of the module ({len(view)} bytes)")
            return _imports(bytes(view[start:end]), start)
        if section_id not in (0, 1):  # sections are ordered: no import section follows
            return []
        if end > len(view):
            raise MalformedImports(f"malformed module: section {section_id} at offset {pos} "
                                   "runs past the end of the module")
        pos = end
    return None


def _imports(section: bytes, base: int) -> list[Import]:
    count, pos = _u32(section, 0, "the import count")
    if count > MAX_IMPORTS:
        raise MalformedImports(f"module declares {count} imports; the service accepts at most "
                               f"{MAX_IMPORTS}")
    found: list[Import] = []
    try:
        for _ in range(count):
            module, pos = _name(section, pos)
            name, pos = _name(section, pos)
            kind = section[pos]
            if kind not in _KINDS:
                # A kind of a newer proposal: the host provides only functions, so it is
                # unsatisfied either way, and what follows cannot be read without its size.
                found.append(Import(module, name, f"0x{kind:02x}"))
                break
            pos = _skip_desc(section, pos + 1, kind)
            found.append(Import(module, name, _KINDS[kind]))
    except (IndexError, MalformedImports):  # past the section's end, or an over-long number
        raise MalformedImports(f"malformed module: import {len(found)} of {count} cannot be "
                               f"read from the import section at offset {base}") from None
    return found


def _skip_desc(data: bytes, pos: int, kind: int) -> int:
    if kind == 0:  # func: type index
        return _u32(data, pos, "a type index")[1]
    if kind == 1:  # table: reference type, limits
        return _limits(data, _reftype(data, pos))
    if kind == 2:  # memory: limits
        return _limits(data, pos)
    if kind == 3:  # global: value type, mutability
        return _valtype(data, pos) + 1
    return _u32(data, pos + 1, "a type index")[1]  # tag: attribute, type index


def _reftype(data: bytes, pos: int) -> int:
    if data[pos] in (0x63, 0x64):  # (ref null? heaptype): a signed 33-bit heap type follows
        return _leb(data, pos + 1, 5, "a heap type")[1]
    return pos + 1


def _valtype(data: bytes, pos: int) -> int:
    return _reftype(data, pos)  # numeric and vector types are one byte too


def _limits(data: bytes, pos: int) -> int:
    flags = data[pos]
    width = 10 if flags & 0x04 else 5  # memory64: 64-bit bounds
    pos = _leb(data, pos + 1, width, "a minimum")[1]
    if flags & 0x01:
        pos = _leb(data, pos, width, "a maximum")[1]
    if flags & 0x08:  # custom page size (log2)
        pos = _u32(data, pos, "a page size")[1]
    return pos


def _name(data: bytes, pos: int) -> tuple[str, int]:
    length, pos = _u32(data, pos, "a name length")
    end = pos + length
    if end > len(data):
        raise IndexError
    return data[pos:end].decode("utf-8", errors="replace"), end


def _u32(data: Buffer, pos: int, what: str) -> tuple[int, int]:
    return _leb(data, pos, 5, what)


def _leb(data: Buffer, pos: int, max_bytes: int, what: str) -> tuple[int, int]:
    """Unsigned LEB128 (a signed one is skipped the same way); (value, next position)."""
    value = shift = 0
    for offset in range(max_bytes):
        try:
            byte = data[pos + offset]
        except IndexError:
            raise MalformedImports(f"malformed module: {what} at offset {pos} runs past the "
                                   "end") from None
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos + offset + 1
        shift += 7
    raise MalformedImports(f"malformed module: {what} at offset {pos} is longer than "
                           f"{max_bytes} bytes")
