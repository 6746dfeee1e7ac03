#!/usr/bin/env bash
# Rebuild every .wasm under plugins/ (the built files are committed, so tests
# need no toolchain; run this after editing a .wat or .c file).
#
#   ./plugins/build.sh              # WAT + C plugins, then the Rust plugins if Rust is present
#   ./plugins/build.sh --wat-only   # skip the C and Rust plugins (no clang needed)
#
# Needs: a Python with wasmtime-py ($PYTHON, default: python3 on PATH) and,
# for the C plugins, clang + wasm-ld + wasi-libc ($CLANG, default: clang):
#   apt-get install -y clang lld wasi-libc libclang-rt-14-dev-wasm32
# The Rust plugins are built by rust/build.sh (see there for the toolchain it picks); without a
# usable Rust toolchain it says so and they are left as committed.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"

PYTHON="${PYTHON:-python3}"
CLANG="${CLANG:-clang}"
WAT_ONLY=0
if [[ "${1:-}" == "--wat-only" ]]; then WAT_ONLY=1; fi

if ! "$PYTHON" -c 'import wasmtime' 2>/dev/null; then
    echo "build.sh: '$PYTHON' cannot import wasmtime; set PYTHON=/path/to/venv/bin/python" >&2
    exit 1
fi

# --- WAT plugins: every *.wat here and in hostile/ -> .wasm beside it -------
"$PYTHON" -c '
import pathlib, sys, wasmtime
for src in sorted(pathlib.Path(".").glob("*.wat")) + sorted(pathlib.Path("hostile").glob("*.wat")):
    out = src.with_suffix(".wasm")
    out.write_bytes(wasmtime.wat2wasm(src.read_text()))
    print(f"wat2wasm {src} -> {out}")
# not a valid module on purpose: valid header, then a bogus section id
pathlib.Path("hostile/invalid.wasm").write_bytes(b"\x00asm\x01\x00\x00\x00\xff\xff")
print("wrote hostile/invalid.wasm")
'

if [[ "$WAT_ONLY" == 1 ]]; then
    echo "build.sh: --wat-only, C and Rust plugins not rebuilt"
    exit 0
fi

if ! command -v "$CLANG" >/dev/null 2>&1; then
    echo "build.sh: $CLANG not found (apt-get install -y clang lld wasi-libc libclang-rt-14-dev-wasm32)," \
         "or run with --wat-only" >&2
    exit 1
fi

# C plugins get a 1 MiB shadow stack (in linear memory) instead of wasm-ld's 64 KiB:
# a C program that overflows the default one silently corrupts its static data and fails
# far away (docs/plugin-abi.md, "The C shadow stack").
STACK="-Wl,-z,stack-size=1048576"

# --- C plugin, ABI kind 1: bare core module, no libc, no WASI imports -------
"$CLANG" --target=wasm32-unknown-unknown -O2 -nostdlib -mbulk-memory "$STACK" \
    -Wl,--no-entry -Wl,--export=alloc -Wl,--export=process -Wl,--strip-all \
    -o wordfreq.wasm c/wordfreq.c
echo "clang c/wordfreq.c -> wordfreq.wasm"

# --- C plugin, ABI kind 1 with host methods: the key-value visit counter ----
"$CLANG" --target=wasm32-unknown-unknown -O2 -nostdlib -mbulk-memory \
    -Wl,--no-entry -Wl,--export=alloc -Wl,--export=process -Wl,--strip-all \
    -o visit_counter.wasm c/visit_counter.c
echo "clang c/visit_counter.c -> visit_counter.wasm"

# --- C plugin, ABI kind 3: WASI preview 1 command (wasi-libc) ---------------
"$CLANG" --target=wasm32-wasi -O2 "$STACK" -Wl,--strip-all \
    -o wasi_upper.wasm c/wasi_upper.c
echo "clang c/wasi_upper.c -> wasi_upper.wasm"

# --- C plugin, ABI kind 3: WASI command with arguments and files ------------
"$CLANG" --target=wasm32-wasi -O2 "$STACK" -Wl,--strip-all \
    -o wasi_files.wasm c/wasi_files.c
echo "clang c/wasi_files.c -> wasi_files.wasm"

chmod 644 wordfreq.wasm wasi_upper.wasm wasi_files.wasm visit_counter.wasm   # wasm-ld marks its output executable

# --- C plugin whose malloc fails under the memory limit (wasi-libc, reactor) --
# A core module (alloc + process) built against wasi-libc: malloc grows memory, and when the
# limit refuses a grow it returns NULL and the plugin calls __builtin_trap(). The service
# reports MEMORY_LIMIT (tests/test_memory_limit.py).
"$CLANG" --target=wasm32-wasi -O2 -mexec-model=reactor -Wl,--strip-all \
    -o malloc_fail.wasm c/malloc_fail.c
chmod 644 malloc_fail.wasm
echo "clang c/malloc_fail.c -> malloc_fail.wasm"

# --- Rust plugins, ABI kind 1 (skipped with a message when no Rust toolchain is usable) ---
rust/build.sh
