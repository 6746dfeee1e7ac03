#!/usr/bin/env bash
# Build the Rust sample plugins into plugins/rust/*.wasm. The built files are committed, so the
# tests need no Rust toolchain.
#
#   plugins/rust/build.sh                 # Debian's rustc-web/cargo-web (/usr/bin) when present
#   CARGO=~/.cargo/bin/cargo RUSTC=~/.cargo/bin/rustc plugins/rust/build.sh   # another toolchain
#
#   textkit.wasm          core module (ABI kind 1), target wasm32-unknown-unknown
#   upper_component.wasm  component (WASI preview 2), target wasm32-wasip2, world
#                         plugin-with-files of wit/wasm-core.wit ($WASM_CORE_WIT overrides);
#                         it also imports wasi:cli/stdin, wasi:io/streams and wasi:filesystem
#                         0.2.x itself (process-file), whose WIT comes from the vendored `wasi`
#                         crate ($WASI_WIT overrides)
#
# Which toolchain: $CARGO and $RUSTC, defaulting to Debian's /usr/bin/cargo and /usr/bin/rustc
# if they exist (the rustup proxies in ~/.cargo/bin usually come first on PATH), else whatever
# `cargo`/`rustc` are on PATH. Each target needs a standard library, either prebuilt (`rustup
# target add wasm32-unknown-unknown wasm32-wasip2`) or as source to build it: Debian's
# rust-web-src (or rustup's rust-src component) under
# $(rustc --print sysroot)/lib/rustlib/src/rust/library, with its crates vendored in
# library/vendor. Then std is built with `-Zbuild-std` (RUSTC_BOOTSTRAP=1 lets a stable compiler
# take that flag), offline: crates.io is not needed.
#
# Linker: rustc's default for wasm32-unknown-unknown is rust-lld. Debian's /usr/bin/rust-lld
# points at lld-22, which rust-web-llvm does not install here, so when rust-lld is missing the
# script links with wasm-ld (Debian `lld`, 14.0.6 works). Override with RUST_WASM_LINKER.
#
# The component from Debian's sources needs two things rust-web-src does not have:
#  * wit-bindgen's libwit_bindgen_cabi.a (a prebuilt blob Debian prunes from the vendored
#    crate): rebuilt here from its few lines of C with clang, in a copy of the vendor directory;
#  * wasi-libc for wasip2: Debian's wasi-libc (preview 1, /usr/lib/wasm32-wasi, $WASI_LIBC) is
#    linked instead; wasm-component-ld adapts its preview-1 imports to preview 2.
#
# Exit status 0 and a message on stderr for each plugin that cannot be built here (nothing
# rebuilt for it); --require makes that an error (exit 1).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REQUIRE=0
if [[ "${1:-}" == "--require" ]]; then REQUIRE=1; fi

skip() {
    echo "plugins/rust/build.sh: $1; not rebuilt" >&2
    if [[ "$REQUIRE" == 1 ]]; then exit 1; fi
}

if [[ -z "${CARGO:-}" ]]; then
    if [[ -x /usr/bin/cargo ]]; then CARGO=/usr/bin/cargo; else CARGO=cargo; fi
fi
if [[ -z "${RUSTC:-}" ]]; then
    if [[ -x /usr/bin/rustc ]]; then RUSTC=/usr/bin/rustc; else RUSTC=rustc; fi
fi
export RUSTC
if ! command -v "$CARGO" >/dev/null 2>&1 || ! command -v "$RUSTC" >/dev/null 2>&1; then
    skip "no cargo ($CARGO) or no rustc ($RUSTC): Rust plugins"
    exit 0
fi

SYSROOT="$("$RUSTC" --print sysroot)"
HOST="$("$RUSTC" -vV | sed -n 's/^host: //p')"
LIBRARY="$SYSROOT/lib/rustlib/src/rust/library"
# One target directory for every plugin: std is built once per target and reused.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HERE/target}"
echo "plugins/rust/build.sh: $("$RUSTC" --version)"

# Sets ARGS for `cargo rustc` of target $1 with the crates of vendor directory $2, or fails.
cargo_args() {
    local target="$1" vendor="$2"
    ARGS=(rustc --release --offline --target "$target")
    if [[ -d "$SYSROOT/lib/rustlib/$target/lib" ]]; then
        echo "  $target: prebuilt std"
        PREBUILT=1
    elif [[ -f "$LIBRARY/std/Cargo.toml" && -d "$vendor" ]]; then
        echo "  $target: std built from $LIBRARY (-Zbuild-std)"
        PREBUILT=0
        export RUSTC_BOOTSTRAP=1
        ARGS+=(-Zbuild-std=std,panic_abort
               --config "source.crates-io.replace-with='rust-library-vendor'"
               --config "source.rust-library-vendor.directory='$vendor'")
    else
        return 1
    fi
}

install_wasm() {  # $1 target, $2 crate name
    cp "$CARGO_TARGET_DIR/$1/release/$2.wasm" "$HERE/$2.wasm"
    chmod 644 "$HERE/$2.wasm"   # the linker marks its output executable
    echo "cargo $2 -> plugins/rust/$2.wasm"
}

# --- textkit: core module, wasm32-unknown-unknown ------------------------------------------
build_textkit() {
    local target=wasm32-unknown-unknown linker=""
    cargo_args "$target" "$LIBRARY/vendor" \
        || { skip "no std for $target and no library source under $LIBRARY: textkit"; return; }
    if [[ -n "${RUST_WASM_LINKER:-}" ]]; then
        linker="$RUST_WASM_LINKER"
    elif [[ -x "$SYSROOT/lib/rustlib/$HOST/bin/rust-lld" ]] \
            || rust-lld -flavor wasm --version >/dev/null 2>&1; then
        linker=""   # rustc finds its own rust-lld
    elif command -v wasm-ld >/dev/null 2>&1; then
        linker=wasm-ld
    else
        skip "no rust-lld and no wasm-ld (apt-get install -y lld): textkit"; return
    fi
    if [[ -n "$linker" ]]; then ARGS+=(--config "target.$target.linker='$linker'"); fi
    echo "  linker ${linker:-rust-lld}"
    (cd "$HERE/textkit" && "$CARGO" "${ARGS[@]}")
    install_wasm "$target" textkit
}

# --- upper_component: component, wasm32-wasip2 ---------------------------------------------
build_upper_component() {
    local target=wasm32-wasip2 wit="${WASM_CORE_WIT:-$HERE/../../wit/wasm-core.wit}"
    local vendor="$CARGO_TARGET_DIR/wasip2-vendor" wasi_libc="${WASI_LIBC:-/usr/lib/wasm32-wasi}"
    [[ -f "$wit" ]] || { skip "no WIT world at $wit (set WASM_CORE_WIT): upper_component"; return; }
    if [[ ! -d "$SYSROOT/lib/rustlib/$target/lib" && -d "$LIBRARY/vendor" ]]; then
        prepare_wasip2_vendor "$vendor" || return 0
    fi
    cargo_args "$target" "$vendor" \
        || { skip "no std for $target and no library source under $LIBRARY: upper_component"; return; }
    local rustc_flags=()
    if [[ "$PREBUILT" == 0 ]]; then
        [[ -f "$wasi_libc/libc.a" ]] \
            || { skip "no wasi-libc at $wasi_libc (apt-get install -y wasi-libc): upper_component"; return; }
        rustc_flags+=(-C link-self-contained=no -L "native=$wasi_libc")
    fi
    # wasm-component-ld takes one world: a generated WIT file whose own package names it.
    local world="$CARGO_TARGET_DIR/upper-component-world.wit"
    one_world_wit "$wit" plugin-with-files > "$world"
    rustc_flags+=(-C "link-arg=--component-type=$world")
    # process-file calls WASI 0.2 directly (one native call to read stdin, one to write the
    # output file, where Rust's std goes through the preview 1 adapter in 4 KiB pieces): a
    # world importing those interfaces, with the WIT packages they need beside it.
    local fs_world="$CARGO_TARGET_DIR/upper-component-fs"
    local wasi_wit="${WASI_WIT:-}"
    if [[ -z "$wasi_wit" ]]; then
        wasi_wit="$(compgen -G "$LIBRARY/vendor/wasi-0.14.*/wit" | head -n 1 || true)"
    fi
    [[ -d "$wasi_wit/deps/filesystem" ]] \
        || { skip "no wasi:filesystem WIT (the vendored wasi crate's wit/; set WASI_WIT): upper_component"; return; }
    rm -rf "$fs_world" && mkdir -p "$fs_world/deps"
    cp -r "$wasi_wit/deps/." "$fs_world/deps/"
    local v  # the WASI version of those packages, e.g. 0.2.4 (the host takes any 0.2.x)
    v="$(sed -n 's/^package wasi:filesystem@\([^;]*\);.*/\1/p' "$wasi_wit/deps/filesystem/types.wit")"
    printf 'package wasm-core:rust-sample-fs;\n\nworld files {\n%s\n}\n' \
        "$(printf '    import wasi:%s@'"$v"';\n' cli/stdin io/streams filesystem/types filesystem/preopens)" \
        > "$fs_world/world.wit"
    rustc_flags+=(-C "link-arg=--component-type=$fs_world")
    (cd "$HERE/upper_component" && "$CARGO" "${ARGS[@]}" -- "${rustc_flags[@]}")
    install_wasm "$target" upper_component
}

# A copy of library/vendor with wit-bindgen's libwit_bindgen_cabi.a, which Debian prunes.
prepare_wasip2_vendor() {
    local vendor="$1" clang="${CLANG:-clang}" ar="${LLVM_AR:-llvm-ar}"
    if compgen -G "$vendor/wit-bindgen-*/src/rt/libwit_bindgen_cabi.a" >/dev/null; then return 0; fi
    command -v "$clang" >/dev/null 2>&1 && command -v "$ar" >/dev/null 2>&1 \
        || { skip "no $clang or $ar to rebuild wit-bindgen's cabi_realloc: upper_component"; return 1; }
    rm -rf "$vendor" && mkdir -p "$vendor" && cp -r "$LIBRARY/vendor/." "$vendor/"
    local crate version
    for crate in "$vendor"/wit-bindgen-*/; do
        version="$(basename "$crate")"; version="${version#wit-bindgen-}"; version="${version//./_}"
        # What wit-bindgen's ci/rebuild-libwit-bindgen-cabi.sh compiles: an exported, weak
        # cabi_realloc that forwards to the versioned one in wit-bindgen's Rust code.
        cat > "$CARGO_TARGET_DIR/wit_bindgen_cabi.c" <<EOF
#include <stddef.h>
extern void *cabi_realloc_wit_bindgen_$version(void *, size_t, size_t, size_t);
__attribute__((__weak__, __export_name__("cabi_realloc")))
void *cabi_realloc(void *ptr, size_t old_size, size_t align, size_t new_size) {
    return cabi_realloc_wit_bindgen_$version(ptr, old_size, align, new_size);
}
EOF
        "$clang" --target=wasm32-wasi -O2 -c "$CARGO_TARGET_DIR/wit_bindgen_cabi.c" \
            -o "$CARGO_TARGET_DIR/wit_bindgen_cabi.o"
        "$ar" rcs "$crate/src/rt/libwit_bindgen_cabi.a" "$CARGO_TARGET_DIR/wit_bindgen_cabi.o"
    done
}

# Prints WIT file $1 (one package) nested in a package with one world that includes world $2.
one_world_wit() {
    local package
    package="$(sed -n 's/^package \([^;]*\);.*/\1/p' "$1" | head -n 1)"
    printf '// Generated by plugins/rust/build.sh from %s.\npackage wasm-core:rust-sample;\n\n' "$1"
    local world="${package%@*}/$2"
    if [[ "$package" == *@* ]]; then world+="@${package#*@}"; fi
    printf 'world rust-sample {\n    include %s;\n}\n\n' "$world"
    sed "s/^package [^;]*;/package $package {/" "$1"
    printf '}\n'
}

build_textkit
build_upper_component
