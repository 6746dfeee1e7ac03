#!/usr/bin/env bash
# Rebuild the Extism test plugins under plugins/extism/ (the built .wasm files are committed,
# so tests need no toolchain).
#
#   ./plugins/extism/build.sh           # C plugins + AssemblyScript plugin
#   ./plugins/extism/build.sh --c-only  # skip AssemblyScript (no npm needed)
#
# Needs: clang + wasm-ld + wasi-libc ($CLANG, default: clang) for the C plugins, built with
# our own header c/wasmcore-extism.h; npm (registry access on first run) for the
# AssemblyScript plugin, built with @extism/as-pdk and assemblyscript from as/package.json.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
CLANG="${CLANG:-clang}"

# --- C, no libc, no WASI: the kernel imports only -------------------------------------------
for name in greet host_call; do
    "$CLANG" --target=wasm32-unknown-unknown -O2 -nostdlib -Wl,--no-entry -Wl,--strip-all \
        -o "c/$name.wasm" "c/$name.c"
    echo "clang c/$name.c -> c/$name.wasm"
done

# --- C with wasi-libc: a WASI reactor (exports _initialize) --------------------------------
"$CLANG" --target=wasm32-wasi -mexec-model=reactor -O2 -Wl,--strip-all \
    -o c/wasi_words.wasm c/wasi_words.c
echo "clang c/wasi_words.c -> c/wasi_words.wasm"
chmod 644 c/*.wasm  # wasm-ld marks its output executable

if [[ "${1:-}" == "--c-only" ]]; then
    echo "build.sh: --c-only, AssemblyScript plugin not rebuilt"
    exit 0
fi

# --- AssemblyScript with @extism/as-pdk ------------------------------------------------------
(
    cd as
    if [[ ! -d node_modules ]]; then npm ci --no-audit --no-fund; fi
    npm run --silent build
)
echo "asc as/assembly/index.ts -> as_greet.wasm"
