"""Compiled-module handle and the static checks done once per module at compile time.

Everything the hot path needs (export indices, entry kinds, the InstancePre) is computed here
so an execution never inspects types or looks exports up by name.
"""

from __future__ import annotations

import enum
import re
from collections import OrderedDict
from typing import Literal

import wasmtime

from wasmcore.protocol.errors import InvalidModule
from wasmcore.protocol.limits import WASM_PAGE

from . import _raw
from .component import is_component
from .extism import ENV_MODULE as EXTISM_ENV_MODULE
from .extism import IMPORT_NAMES as EXTISM_IMPORTS
from .extism import USER_MODULE as EXTISM_USER_MODULE
from .grow_probe import PROBE_EXPORT
from .host import HOST_IMPORTS
from .import_hints import binary_hint, toolchain_hint
from .imports_scan import Buffer, MalformedImports, NotCoreModule, read_imports

WASI_MODULE = "wasi_snapshot_preview1"
DEFAULT_ENTRY = "process"
_UNKNOWN_IMPORT = re.compile(r"unknown import: `([^`]+)::([^`]+)`")
# Every function of WASI preview 1 (the linker's `define_wasi`): what a module may import
# from WASI_MODULE. tests/test_imports_scan.py checks the linker defines each of them.
WASI_FUNCTIONS = frozenset({
    "args_get", "args_sizes_get", "environ_get", "environ_sizes_get", "clock_res_get",
    "clock_time_get", "fd_advise", "fd_allocate", "fd_close", "fd_datasync", "fd_fdstat_get",
    "fd_fdstat_set_flags", "fd_fdstat_set_rights", "fd_filestat_get", "fd_filestat_set_size",
    "fd_filestat_set_times", "fd_pread", "fd_prestat_get", "fd_prestat_dir_name", "fd_pwrite",
    "fd_read", "fd_readdir", "fd_renumber", "fd_seek", "fd_sync", "fd_tell", "fd_write",
    "path_create_directory", "path_filestat_get", "path_filestat_set_times", "path_link",
    "path_open", "path_readlink", "path_remove_directory", "path_rename", "path_symlink",
    "path_unlink_file", "poll_oneoff", "proc_exit", "proc_raise", "sched_yield", "random_get",
    "sock_accept", "sock_recv", "sock_send", "sock_shutdown",
})
_AVAILABLE = ("available: host.log, host.output, host.call, host.call_result, "
              "wasi_snapshot_preview1.*")
# A refusal names this many missing imports in its message and its details (and counts
# them all), each cut to _MAX_NAME_CHARS: real toolchains import hundreds.
_NAMED_IN_MESSAGE = 5
_MAX_LISTED = 20
_MAX_NAME_CHARS = 200


class EntryKind(enum.IntEnum):
    ABI = 0  # (input_ptr, input_len, env_ptr, env_len) -> status
    VOID = 1  # () -> ()
    STATUS = 2  # () -> status


class CompiledModule:
    """Opaque handle to a validated, linked module, shared by all its executions.

    Public attributes: `sha256` (hex of the bytes given to compile), `kind`
    ("core"|"wasi"|"extism"),
    `exports` (callable entry names), `size` (bytes of the module as given).
    """

    __slots__ = (
        "sha256",
        "kind",
        "exports",
        "index_names",
        "size",
        "module",
        "module_addr",
        "pre",
        "pre_addr",
        "entries",
        "memory_index",
        "alloc_index",
        "initialize_index",
        "min_memory_bytes",
        "needs_wasi",
        "opens_files",
        "verified",
        "probe_index",
        "native_pre",
        "native_pre_addr",
        "native_plans",
        "native_owner",
    )

    def __init__(
        self, sha256: str, size: int, module: wasmtime.Module,
        pre: wasmtime.InstancePre | None,
    ) -> None:
        self.sha256 = sha256
        self.size = size
        self.module = module
        self.module_addr = _raw.addr(module)
        # The InstancePre must outlive every store instantiated from it: keep it here.
        # None for Extism plugins: their kernel imports are linked per store (extism.py).
        self.pre = pre
        self.pre_addr = _raw.addr(pre) if pre is not None else 0
        self.kind: Literal["core", "wasi", "extism"] = "extism" if pre is None else "core"
        self.exports: list[str] = []
        self.index_names: dict[int, str] = {}  # export index -> name, for indices in use
        # entry name -> (kind, export index for wasmtime_instance_export_nth)
        self.entries: dict[str, tuple[EntryKind, int]] = {}
        self.memory_index: int | None = None
        self.alloc_index: int | None = None
        self.initialize_index: int | None = None
        self.min_memory_bytes = 0
        self.needs_wasi = False
        # Imports WASI's path_open, the one way to open a file: it gets /tmp and mapped dirs.
        self.opens_files = False
        # Export indices are checked against names on the first execution (see runtime).
        self.verified = False
        # The grow probe's global (grow_probe.py), when the module was instrumented.
        self.probe_index: int | None = None
        # The native fast path (fastcall.py): an InstancePre linked to its C host functions,
        # and the C plan of each entry used so far (by export index). None: not eligible.
        self.native_pre: wasmtime.InstancePre | None = None
        self.native_pre_addr = 0
        self.native_plans: dict[int, tuple[object, int]] | None = None
        self.native_owner: object = None  # the NativeRunner (of one Sandbox) it is linked to

    def __repr__(self) -> str:
        return (
            f"CompiledModule(sha256={self.sha256[:12]}…, kind={self.kind!r}, "
            f"exports={self.exports!r}, size={self.size})"
        )


def _sig(func_type: wasmtime.FuncType) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return tuple(str(t) for t in func_type.params), tuple(str(t) for t in func_type.results)


_ENTRY_SIGNATURES = {
    (("i32", "i32", "i32", "i32"), ("i32",)): EntryKind.ABI,
    ((), ()): EntryKind.VOID,
    ((), ("i32",)): EntryKind.STATUS,
}


def precheck_imports(wasm: Buffer) -> None:
    """Refuse, before any compile, a binary that is not a core module or imports what the
    service does not provide. Reads only the module's first sections (imports_scan.py), so
    it costs microseconds whatever the module's size. Signatures are left to the linker.
    A component's imports are checked by its compile (component.py)."""
    if is_component(wasm[:8]):
        return
    try:
        imports = read_imports(wasm)
    except NotCoreModule as exc:
        hint = binary_hint(wasm)
        if hint is None:
            raise InvalidModule(str(exc), {"reason": str(exc)}) from None
        raise InvalidModule(f"{exc}. {hint.advice}",
                            {"reason": str(exc), "toolchain": hint.toolchain}) from None
    except MalformedImports as exc:
        raise InvalidModule(f"invalid WebAssembly module: {exc}", {"reason": str(exc)}) from None
    if not imports:
        return  # none, or the scan gave up: the compile and link decide
    missing: dict[tuple[str, str], None] = {}  # in order, once each
    for imp in imports:
        provided = imp.kind == "func" and (
            (imp.module, imp.name) in HOST_IMPORTS
            or (imp.module == WASI_MODULE and imp.name in WASI_FUNCTIONS)
            # Extism plugins: signatures and user functions are checked at link (extism.py)
            or (imp.module, imp.name) in EXTISM_IMPORTS or imp.module == EXTISM_USER_MODULE)
        if not provided:
            missing[(imp.module, imp.name)] = None
    if missing:
        raise _unprovided(list(missing), "refused before compiling it")


def _unprovided(missing: list[tuple[str, str]], when: str) -> InvalidModule:
    """The refusal of a module importing what the service does not provide: the first few
    names and how many in all (real toolchains' lists run to hundreds), and what the
    toolchain that built it, if recognised, should build instead."""
    names = [_shortened(f"{module}.{name}") for module, name in missing]
    shown = ", ".join(names[:_NAMED_IN_MESSAGE])
    more = len(names) - _NAMED_IN_MESSAGE
    message = (f"module imports what the host does not provide: {shown}"
               f"{f' and {more} more, {len(names)} in all' if more > 0 else ''} "
               f"({_AVAILABLE}); {when}")
    details: dict[str, object] = {"missing_imports": names[:_MAX_LISTED],
                                  "missing_count": len(names)}
    hint = toolchain_hint(missing)
    if hint is not None:
        message += f". {hint.advice}"
        details["toolchain"] = hint.toolchain
    return InvalidModule(message, details)


def _shortened(name: str) -> str:
    return name if len(name) <= _MAX_NAME_CHARS else name[:_MAX_NAME_CHARS - 1] + "…"


def opens_files(module: wasmtime.Module) -> bool:
    return any(imp.module == WASI_MODULE and imp.name == "path_open" for imp in module.imports)


def check_imports(module: wasmtime.Module) -> bool:
    """Refuse imports the host does not provide; returns whether WASI is imported."""
    missing: dict[tuple[str, str], None] = {}
    needs_wasi = False
    for imp in module.imports:
        key = (imp.module, imp.name or "")
        if key in HOST_IMPORTS and isinstance(imp.type, wasmtime.FuncType):
            continue
        if imp.module == WASI_MODULE and isinstance(imp.type, wasmtime.FuncType):
            needs_wasi = True  # exact names are checked by the linker (instantiate_pre)
            continue
        if is_extism_import(imp.module):
            continue  # checked by ExtismHost.prepare
        missing[key] = None
    if missing:
        raise _unprovided(list(missing), "refused")
    return needs_wasi


def is_extism_import(module_name: str) -> bool:
    return module_name in (EXTISM_ENV_MODULE, EXTISM_USER_MODULE)


def link(linker: wasmtime.Linker, module: wasmtime.Module) -> wasmtime.InstancePre:
    try:
        return linker.instantiate_pre(module)
    except wasmtime.WasmtimeError as exc:
        message = str(exc)
        details: dict[str, object] = {}
        found = _UNKNOWN_IMPORT.search(message)
        if found:
            details["missing_imports"] = [f"{found.group(1)}.{found.group(2)}"]
        raise InvalidModule(f"module cannot be linked: {message}", details) from None


def analyze(compiled: CompiledModule) -> None:
    """Classify the module and record the export indices the hot path uses."""
    entries: dict[str, tuple[EntryKind, int]] = {}
    start_index: int | None = None
    exports = compiled.module.exports  # costly for big modules (types per export): once
    for index, export in enumerate(exports):
        ty = export.type
        name = export.name
        if isinstance(ty, wasmtime.MemoryType):
            if name == "memory":
                compiled.memory_index = index
                compiled.min_memory_bytes = ty.limits.min * WASM_PAGE
            continue
        if name == PROBE_EXPORT and isinstance(ty, wasmtime.GlobalType):
            compiled.probe_index = index
            continue
        if not isinstance(ty, wasmtime.FuncType):
            continue
        sig = _sig(ty)
        if name == "_start" and sig == ((), ()):
            start_index = index
        elif name == "_initialize" and sig == ((), ()):
            # WASI reactor convention: must run once before any other export.
            compiled.initialize_index = index
        elif name == "alloc":
            if sig == (("i32",), ("i32",)):
                compiled.alloc_index = index
        elif sig in _ENTRY_SIGNATURES:
            entries[name] = (_ENTRY_SIGNATURES[sig], index)

    used = [compiled.memory_index, compiled.alloc_index, compiled.initialize_index, start_index,
            compiled.probe_index, *(i for _, i in entries.values())]
    compiled.index_names = {i: exports[i].name for i in used if i is not None}
    if compiled.kind == "extism":
        # Every exported no-argument function is an entry (Extism's `() -> i32` status, or
        # `() -> ()`); the plugin's input, output and env go through the kernel.
        entries = {n: e for n, e in entries.items() if e[0] is not EntryKind.ABI}
        if start_index is not None:
            entries["_start"] = (EntryKind.VOID, start_index)
        if not entries:
            raise InvalidModule("Extism plugin exports no entry: expected functions "
                                "`() -> i32` (0 = success)")
        compiled.entries = entries
        compiled.exports = list(entries)
        return
    if start_index is not None:
        # A command; `_start` is its default entry. Its other entries (`process`...) may be
        # named too and follow the core ABI: wasm-ld wraps a command's exports so that each
        # runs the C constructors first.
        compiled.kind = "wasi"
        compiled.entries = {"_start": (EntryKind.VOID, start_index), **entries}
        compiled.exports = list(compiled.entries)
        return

    has_noarg = any(kind != EntryKind.ABI for kind, _ in entries.values())
    if not entries:
        raise InvalidModule(
            "module exports no entry function: expected `process(i32 i32 i32 i32) -> i32`, "
            "no-argument functions, or a WASI `_start`"
        )
    if (compiled.memory_index is None or compiled.alloc_index is None) and not has_noarg:
        raise InvalidModule(
            "core module must export `memory` and `alloc(i32) -> i32` "
            "(or only no-argument entries)",
            {"exports": sorted(entries)},
        )
    compiled.kind = "core"
    compiled.entries = entries
    compiled.exports = list(entries)


class ModuleCache:
    """LRU of compiled modules by content hash (compiling costs milliseconds; a hit, ~0)."""

    def __init__(self, capacity: int) -> None:
        self._capacity = max(1, capacity)
        self._items: OrderedDict[str, CompiledModule] = OrderedDict()

    def get(self, sha256: str) -> CompiledModule | None:
        item = self._items.get(sha256)
        if item is not None:
            self._items.move_to_end(sha256)
        return item

    def put(self, item: CompiledModule) -> None:
        self._items[item.sha256] = item
        self._items.move_to_end(item.sha256)
        while len(self._items) > self._capacity:
            self._items.popitem(last=False)

    def discard(self, sha256: str) -> None:
        self._items.pop(sha256, None)

    def clear(self) -> None:
        self._items.clear()
