#!/usr/bin/env bash
# Build the Rust sample plugins (core ABI, wasm32-unknown-unknown) into plugins/rust/*.wasm.
# The built files are committed, so the tests need no Rust toolchain.
#
#   plugins/rust/build.sh                 # Debian's rustc-web/cargo-web (/usr/bin) when present
#   CARGO=~/.cargo/bin/cargo RUSTC=~/.cargo/bin/rustc plugins/rust/build.sh   # another toolchain
#
# Which toolchain: $CARGO and $RUSTC, defaulting to Debian's /usr/bin/cargo and /usr/bin/rustc
# if they exist (the rustup proxies in ~/.cargo/bin usually come first on PATH), else whatever
# `cargo`/`rustc` are on PATH. The toolchain needs a standard library for wasm32-unknown-unknown,
# either prebuilt (`rustup target add wasm32-unknown-unknown`) or as source to build it:
# Debian's rust-web-src (or rustup's rust-src component) under
# $(rustc --print sysroot)/lib/rustlib/src/rust/library, with its crates vendored in
# library/vendor. Then std is built with `-Zbuild-std` (RUSTC_BOOTSTRAP=1 lets a stable compiler
# take that flag), offline: crates.io is not needed.
#
# Linker: rustc's default for wasm is rust-lld. Debian's /usr/bin/rust-lld points at lld-22,
# which rust-web-llvm does not install here, so when rust-lld is missing the script links with
# wasm-ld (Debian `lld`, 14.0.6 works). Override with RUST_WASM_LINKER=/path/to/wasm-ld.
#
# Exit status 0 and a message on stderr when no usable toolchain is found (nothing rebuilt);
# --require makes that an error (exit 1).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TARGET=wasm32-unknown-unknown
PLUGINS=(textkit)
REQUIRE=0
if [[ "${1:-}" == "--require" ]]; then REQUIRE=1; fi

skip() {
    echo "plugins/rust/build.sh: $1; Rust plugins not rebuilt" >&2
    exit "$REQUIRE"
}

if [[ -z "${CARGO:-}" ]]; then
    if [[ -x /usr/bin/cargo ]]; then CARGO=/usr/bin/cargo; else CARGO=cargo; fi
fi
if [[ -z "${RUSTC:-}" ]]; then
    if [[ -x /usr/bin/rustc ]]; then RUSTC=/usr/bin/rustc; else RUSTC=rustc; fi
fi
export RUSTC
command -v "$CARGO" >/dev/null 2>&1 || skip "no cargo ($CARGO)"
command -v "$RUSTC" >/dev/null 2>&1 || skip "no rustc ($RUSTC)"

SYSROOT="$("$RUSTC" --print sysroot)"
HOST="$("$RUSTC" -vV | sed -n 's/^host: //p')"
LIBRARY="$SYSROOT/lib/rustlib/src/rust/library"
ARGS=(build --release --offline --target "$TARGET")
if [[ -d "$SYSROOT/lib/rustlib/$TARGET/lib" ]]; then
    MODE="prebuilt std for $TARGET"
elif [[ -f "$LIBRARY/std/Cargo.toml" && -d "$LIBRARY/vendor" ]]; then
    MODE="std built from $LIBRARY (-Zbuild-std)"
    export RUSTC_BOOTSTRAP=1
    ARGS+=(-Zbuild-std=std,panic_abort
           --config "source.crates-io.replace-with='rust-library-vendor'"
           --config "source.rust-library-vendor.directory='$LIBRARY/vendor'")
else
    skip "$RUSTC has no std for $TARGET and no library source with vendored crates under $LIBRARY"
fi

if [[ -n "${RUST_WASM_LINKER:-}" ]]; then
    LINKER="$RUST_WASM_LINKER"
elif [[ -x "$SYSROOT/lib/rustlib/$HOST/bin/rust-lld" ]] || rust-lld -flavor wasm --version >/dev/null 2>&1; then
    LINKER=""   # rustc finds its own rust-lld
elif command -v wasm-ld >/dev/null 2>&1; then
    LINKER=wasm-ld
else
    skip "no rust-lld and no wasm-ld (apt-get install -y lld)"
fi
if [[ -n "$LINKER" ]]; then
    ARGS+=(--config "target.$TARGET.linker='$LINKER'")
fi

# One target directory for every plugin: std is built once and reused by later builds.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HERE/target}"
echo "plugins/rust/build.sh: $("$RUSTC" --version), $MODE, linker ${LINKER:-rust-lld}"
for name in "${PLUGINS[@]}"; do
    (cd "$HERE/$name" && "$CARGO" "${ARGS[@]}")
    cp "$CARGO_TARGET_DIR/$TARGET/release/$name.wasm" "$HERE/$name.wasm"
    chmod 644 "$HERE/$name.wasm"   # the linker marks its output executable
    echo "cargo $name -> plugins/rust/$name.wasm"
done
