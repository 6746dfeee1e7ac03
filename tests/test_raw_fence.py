"""The fence around wasmtime-py's private internals: only sandbox_worker/_raw.py may use them.

wasmtime is pinned to a version range because the fast path relies on wasmtime-py's private
`_ffi` module (the libwasmtime handle, C struct layouts) and private methods (`_consume`,
`_from_ptr`). Keeping every such use in one module keeps a wasmtime upgrade a one-file review
(docs/operations.md, "Upgrading wasmtime").
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("sandbox_worker", "supervisor", "client", "protocol")
ALLOWED = ROOT / "sandbox_worker" / "_raw.py"
# `_ffi` (the library handle, struct layouts), private methods, any `wasmtime._module`, and
# `from wasmtime import _private` spelled without the dot.
FORBIDDEN = re.compile(
    r"_ffi|_consume\(|_from_ptr\(|wasmtime\._|from\s+wasmtime(\.\w+)*\s+import\s+[^#]*\b_[a-z]"
)


def test_wasmtime_internals_only_in_raw_module():
    scanned = 0
    offenders: list[str] = []
    for package in PACKAGES:
        folder = ROOT / package
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*.py")):
            scanned += 1
            if path == ALLOWED:
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if FORBIDDEN.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert scanned, "no sources found: the test is looking in the wrong place"
    assert not offenders, "wasmtime internals outside sandbox_worker/_raw.py:\n" + "\n".join(
        offenders
    )
