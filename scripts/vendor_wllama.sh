#!/usr/bin/env bash
# Refresh the browser runtime of the exported web page: llama.cpp compiled to WebAssembly (wllama).
#
#     scripts/vendor_wllama.sh [VERSION]
#
# Installs @wllama/wllama (and @wllama/wllama-compat, the same llama.cpp built for browsers without
# JSPI or 64-bit WebAssembly memory, i.e. Safari) at one pinned version with npm into a temporary
# directory, then copies only what the page loads into gemma_mlx/webpage/vendor/wllama/:
#
#     wllama.js          the ES module (it carries its worker code inside)
#     wllama.wasm        llama.cpp, JSPI + memory64; single- or multi-threaded at run time
#     compat/wllama.js   the compat build's Emscripten loader
#     compat/wllama.wasm the compat build (Asyncify, 32-bit memory)
#     LICENCE            wllama's MIT licence (llama.cpp's is MIT too)
#     VERSION            the pinned version and the llama.cpp build it was made from
#
# Since wllama 3 one .wasm file serves both the single- and the multi-threaded case (it picks at
# run time from SharedArrayBuffer support), so there is no separate multi-thread file to copy.
# Nothing is fetched by the page at run time: no CDN, the page works offline.
set -euo pipefail

VERSION="${1:-3.13.0}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="$ROOT/gemma_mlx/webpage/vendor/wllama"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

cd "$WORK"
npm init -y >/dev/null
# --ignore-scripts: we copy files, we never run the packages' install hooks
npm install --no-audit --no-fund --ignore-scripts --save-exact \
    "@wllama/wllama@$VERSION" "@wllama/wllama-compat@$VERSION" >/dev/null
PKG="$WORK/node_modules/@wllama/wllama"
COMPAT="$WORK/node_modules/@wllama/wllama-compat"

installed="$(node -p "require('$PKG/package.json').version")"
if [ "$installed" != "$VERSION" ]; then
    echo "npm installed @wllama/wllama $installed, not $VERSION" >&2
    exit 1
fi
# The ES module refuses a .wasm from another llama.cpp build; record which one this is.
libllama="$(grep -o 'LIBLLAMA_VERSION = "[^"]*"' "$PKG/esm/index.js" | cut -d'"' -f2)"

rm -rf "$DEST"
mkdir -p "$DEST/compat"
cp "$PKG/esm/index.js" "$DEST/wllama.js"
cp "$PKG/esm/wasm/wllama.wasm" "$DEST/wllama.wasm"
cp "$COMPAT/wasm/wllama.js" "$DEST/compat/wllama.js"
cp "$COMPAT/wasm/wllama.wasm" "$DEST/compat/wllama.wasm"
cp "$PKG/LICENCE" "$DEST/LICENCE"
cat > "$DEST/VERSION" <<EOF
@wllama/wllama $VERSION
@wllama/wllama-compat $VERSION
llama.cpp $libllama
from npm by scripts/vendor_wllama.sh
EOF

# The page needs every file above; a missing one would only show up in a browser.
for f in wllama.js wllama.wasm compat/wllama.js compat/wllama.wasm LICENCE VERSION; do
    test -s "$DEST/$f" || { echo "missing $DEST/$f" >&2; exit 1; }
done
echo "vendored @wllama/wllama $VERSION (llama.cpp $libllama) into ${DEST#"$ROOT"/}: $(du -sh "$DEST" | cut -f1)"
