"""The import-section reader (pure, no wasmtime) and the check built on it: what a module
imports is known from its first bytes, before any compile."""

from __future__ import annotations

import mmap
from pathlib import Path

import pytest
import wasmtime

from bench.wasm_gen import big_module, uleb
from wasmcore.protocol.errors import InvalidModule
from wasmcore.sandbox_worker.imports_scan import (
    MAX_IMPORTS,
    MAX_SECTIONS_SCANNED,
    Import,
    MalformedImports,
    NotCoreModule,
    read_imports,
)
from wasmcore.sandbox_worker.module import WASI_FUNCTIONS, WASI_MODULE, precheck_imports
from wasmcore.sandbox_worker.runtime import Sandbox

PREAMBLE = b"\0asm\x01\0\0\0"


def _section(section_id: int, body: bytes) -> bytes:
    return bytes([section_id]) + uleb(len(body)) + body


def _name(text: str) -> bytes:
    return uleb(len(text.encode())) + text.encode()


def _wat(text: str) -> bytes:
    return bytes(wasmtime.wat2wasm(text))


def test_every_kind_of_import_is_read_in_order():
    wasm = _wat("""(module
      (type $t (func (param i32)))
      (import "host" "log" (func (param i32 i32)))
      (import "env" "table" (table 1 10 funcref))
      (import "env" "memory" (memory 1 2))
      (import "env" "mem64" (memory i64 1))
      (import "env" "shared" (memory 1 4 shared))
      (import "env" "g" (global (mut i32)))
      (import "env" "ref" (global externref))
      (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
      (import "env" "tag" (tag (param i32))))""")
    assert read_imports(wasm) == [
        Import("host", "log", "func"), Import("env", "table", "table"),
        Import("env", "memory", "memory"), Import("env", "mem64", "memory"),
        Import("env", "shared", "memory"), Import("env", "g", "global"),
        Import("env", "ref", "global"), Import(WASI_MODULE, "fd_write", "func"),
        Import("env", "tag", "tag"),
    ]


def test_a_module_without_imports_and_custom_sections_first():
    assert read_imports(PREAMBLE) == []
    assert read_imports(_wat('(module (func (export "run")))')) == []
    custom = _section(0, _name("producers") + b"x" * 100)
    imports = _section(2, uleb(1) + _name("env") + _name("f") + b"\x00\x00")
    types = _section(1, uleb(1) + b"\x60\x00\x00")
    assert read_imports(PREAMBLE + custom + types + custom + imports) == [
        Import("env", "f", "func")]


def test_only_the_header_is_read():
    module = big_module(2_000_000, imports=[("env", "a"), ("host", "log")])
    # Everything after the import section is garbage, or gone: the answer is the same.
    head = module[:64]
    assert read_imports(head) == [Import("env", "a", "func"), Import("host", "log", "func")]


def test_reads_an_mmap_without_keeping_it_open(tmp_path: Path):
    path = tmp_path / "m.wasm"
    path.write_bytes(big_module(100_000, imports=[("env", "a")]))
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as m:
        assert read_imports(m) == [Import("env", "a", "func")]
        with pytest.raises(InvalidModule):
            precheck_imports(m)
    # (closing the mmap above would raise BufferError if a view were still exported)


@pytest.mark.parametrize(
    ("data", "error", "says"),
    [
        (b"", NotCoreModule, "not a WebAssembly module"),
        (b"(module)", NotCoreModule, "not a WebAssembly module"),
        (b"\0asm\x0d\0\x01\0", NotCoreModule, "component"),
        (b"\0asm\x02\0\0\0", NotCoreModule, "version"),
        (PREAMBLE + b"\x02\x80\x80\x80\x80\x80\x01", MalformedImports, "longer than 5 bytes"),
        (PREAMBLE + b"\x02\x10\x01", MalformedImports, "runs past the end"),
        (PREAMBLE + b"\x02", MalformedImports, "runs past the end"),
        (PREAMBLE + _section(2, uleb(2) + _name("env") + _name("f") + b"\x00\x00"),
         MalformedImports, "import 1 of 2 cannot be read"),
        (PREAMBLE + _section(2, uleb(1) + uleb(100) + b"env"), MalformedImports,
         "import 0 of 1 cannot be read"),
        (PREAMBLE + _section(2, uleb(MAX_IMPORTS + 1)), MalformedImports, "at most"),
        (PREAMBLE + b"\x01\xff\xff\xff\x0f", MalformedImports, "runs past the end"),
    ],
)
def test_what_cannot_be_read_is_refused_with_a_reason(data, error, says):
    with pytest.raises(error, match=says):
        read_imports(data)


def test_an_import_kind_of_a_newer_proposal_is_unsatisfiable():
    section = _section(2, uleb(2) + _name("env") + _name("x") + b"\x09\x01\x02\x03"
                       + _name("env") + _name("y") + b"\x00\x00")
    assert read_imports(PREAMBLE + section) == [Import("env", "x", "0x09")]


def test_too_many_custom_sections_leave_the_decision_to_the_compile():
    tiny = _section(0, _name(""))
    assert read_imports(PREAMBLE + tiny * (MAX_SECTIONS_SCANNED + 1)) is None


def test_the_check_names_every_missing_import_once_in_order():
    wasm = big_module(10_000, imports=[("wbg", "a"), ("host", "log"), ("wbg", "a"),
                                       ("go", "b"), (WASI_MODULE, "fd_write"),
                                       (WASI_MODULE, "no_such_call"), ("host", "output")])
    with pytest.raises(InvalidModule, match="refused before compiling") as refused:
        precheck_imports(wasm)
    assert refused.value.details["missing_imports"] == [
        "wbg.a", "go.b", f"{WASI_MODULE}.no_such_call"]
    # Provided functions, but as a memory or a global: missing too.
    wasm = _wat('(module (import "host" "log" (memory 1)) (import "host" "output" '
                "(global i32)))")
    with pytest.raises(InvalidModule) as refused:
        precheck_imports(wasm)
    assert refused.value.details["missing_imports"] == ["host.log", "host.output"]
    precheck_imports(big_module(10_000, imports=[("host", "log"), (WASI_MODULE, "fd_read")]))


def test_every_wasi_function_the_check_accepts_is_defined_by_the_linker():
    """The check's list of WASI preview 1 functions never refuses one the linker has: each
    is imported with a wrong signature, so linking fails for the type, not the name."""
    assert len(WASI_FUNCTIONS) == 46
    with Sandbox() as sandbox:
        for name in sorted(WASI_FUNCTIONS):
            wasm = _wat(f'(module (import "{WASI_MODULE}" "{name}" (func (param f64 f64 f64))) '
                        '(func (export "run")))')
            with pytest.raises(InvalidModule) as refused:
                sandbox.compile(wasm)
            assert "missing_imports" not in refused.value.details, name
            assert "unknown import" not in refused.value.message, name
