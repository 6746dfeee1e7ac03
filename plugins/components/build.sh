#!/usr/bin/env bash
# Rebuild the sample plugin components (the built .wasm files are committed, so the tests
# need neither toolchain). The world they implement is wit/wasm-core.wit.
#
#   ./plugins/components/build.sh           # both
#   ./plugins/components/build.sh python    # upper_py.wasm only
#   ./plugins/components/build.sh js        # upper_js.wasm only
#   ./plugins/components/build.sh wat       # echo.wasm only ($PYTHON must import wasmtime)
#
# Python: componentize-py from PyPI ($COMPONENTIZE_PY, default: componentize-py on PATH):
#   python3 -m venv /tmp/cpy && /tmp/cpy/bin/pip install componentize-py==0.25.1
#   COMPONENTIZE_PY=/tmp/cpy/bin/componentize-py ./plugins/components/build.sh python
# JavaScript: @bytecodealliance/componentize-js from npm, installed here by `npm ci` into
# plugins/components/js/node_modules (not committed). Needs node and npm.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
wit="$here/../../wit"
what="${1:-all}"

if [[ "$what" == all || "$what" == python ]]; then
    "${COMPONENTIZE_PY:-componentize-py}" -d "$wit" -w plugin-with-files componentize \
        -p "$here/python" app -o "$here/upper_py.wasm"
    echo "built $here/upper_py.wasm"
fi

if [[ "$what" == all || "$what" == wat ]]; then
    "${PYTHON:-python3}" -c 'import sys, wasmtime
open(sys.argv[2], "wb").write(wasmtime.wat2wasm(open(sys.argv[1]).read()))' \
        "$here/wat/echo.wat" "$here/echo.wasm"
    echo "built $here/echo.wasm"
fi

if [[ "$what" == all || "$what" == js ]]; then
    (cd "$here/js" && npm ci --no-audit --no-fund --silent \
        && npx componentize-js app.js --wit "$wit" --world-name plugin \
            --disable http fetch-event -o "$here/upper_js.wasm")
    echo "built $here/upper_js.wasm"
fi
