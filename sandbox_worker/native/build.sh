#!/usr/bin/env sh
# Build the native fast path (fastcall.c) for this machine. The result is committed for linux
# x86_64 so that installs without a C compiler get it; sandbox_worker/fastcall.py falls back to
# the ctypes path when it is missing, does not load or fails its layout check.
# Nothing from wasmtime is linked: its functions are passed in as addresses at load time.
set -eu
cd "$(dirname "$0")"
CC="${CC:-$(command -v clang || command -v cc)}"
out="fastcall-$(uname -s | tr 'A-Z' 'a-z')-$(uname -m).so"
sha=$(sha256sum fastcall.c | cut -c1-64)
"$CC" -O2 -fPIC -shared -pthread -Wall -Wextra -Wno-unused-parameter -Werror \
    -fno-strict-aliasing -DFC_SOURCE_SHA256="\"$sha\"" -o "$out.tmp" fastcall.c
mv "$out.tmp" "$out"
echo "built sandbox_worker/native/$out"
