#!/usr/bin/env bash
# Assemble an ONNX Runtime release layout (ONNXRUNTIME_ROOT with include/ and lib/) from registry packages, once, in
# the cache outside the repository, and print its path. No registry ships ORT's C/C++ release archive, so:
#   lib/      libonnxruntime.so.<ver> from the pip `onnxruntime` wheel, with the symlinks its soname needs
#   include/  ORT's C/C++ API headers from the npm package com.github.asus4.onnxruntime (ORT_API_VERSION 29; the C
#             API is backward compatible, so they work against the newer library)
#   lib/libortextensions.so  onnxruntime-extensions' custom-op library (the tokenizer graphs' ops) from its pip wheel.
#             That file is a CPython 3.11 extension module: its ops never call Python, but it refers to libpython's
#             symbols, so it is given a DT_NEEDED on libpython3.11.so.1.0 (patchelf) to load into any process.
# Every download is pinned and checked against its sha256. Usage: provision_onnxruntime.sh PYTHON
set -euo pipefail

ORT_VERSION=1.32.0
WHEEL=onnxruntime-${ORT_VERSION}-cp311-cp311-manylinux_2_28_x86_64.whl
WHEEL_SHA256=5a34fc4dfeb5a7b4a74c95dcba1e773d722abda720b474edf1b0c419dc6d163d
ORTX_VERSION=0.15.2
ORTX_WHEEL=onnxruntime_extensions-${ORTX_VERSION}-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl
ORTX_WHEEL_SHA256=47f19c732a24f400a8c6a845ebdf1a9b83fa3e779e9dcf1bdfe864e72c77e15a
ORTX_MEMBER=onnxruntime_extensions/_extensions_pydll.cpython-311-x86_64-linux-gnu.so
HEADERS_PACKAGE=com.github.asus4.onnxruntime
HEADERS_VERSION=0.4.9
HEADERS_TGZ=${HEADERS_PACKAGE}-${HEADERS_VERSION}.tgz
HEADERS_SHA256=e59788788818fdde1b2e522e766a21ba0f7d8391de55737abf81e32cc801785d
HEADERS_DIR='package/Plugins/iOS~/onnxruntime.xcframework/ios-arm64/onnxruntime.framework/Headers'

PYTHON=${1:?usage: provision_onnxruntime.sh PYTHON}
CACHE=${LLAMA4_EXPORT_CACHE:-$HOME/.cache/llama4-export}
ROOT=$CACHE/onnxruntime-$ORT_VERSION-extensions-$ORTX_VERSION
DOWNLOADS=$CACHE/downloads

if [ -f "$ROOT/.complete" ]; then
    echo "$ROOT"
    exit 0
fi
mkdir -p "$DOWNLOADS"

verified() {  # FILE SHA256: true when FILE exists with that digest
    [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]
}

wheel() {  # REQUIREMENT FILE SHA256: the pinned cp311 manylinux wheel, downloaded once and verified
    if ! verified "$DOWNLOADS/$2" "$3"; then
        "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
            --python-version 3.11 --platform manylinux_2_28_x86_64 -d "$DOWNLOADS" "$1" >&2
        verified "$DOWNLOADS/$2" "$3" || {
            echo "$DOWNLOADS/$2: missing or sha256 differs from $3; delete it and retry" >&2; exit 1; }
    fi
}
wheel "onnxruntime==$ORT_VERSION" "$WHEEL" "$WHEEL_SHA256"
wheel "onnxruntime-extensions==$ORTX_VERSION" "$ORTX_WHEEL" "$ORTX_WHEEL_SHA256"
if ! verified "$DOWNLOADS/$HEADERS_TGZ" "$HEADERS_SHA256"; then
    echo "downloading $HEADERS_PACKAGE@$HEADERS_VERSION (150 MB, once) for ONNX Runtime's C/C++ headers" >&2
    (cd "$DOWNLOADS" && npm pack --silent "$HEADERS_PACKAGE@$HEADERS_VERSION" >/dev/null)
    verified "$DOWNLOADS/$HEADERS_TGZ" "$HEADERS_SHA256" || {
        echo "$DOWNLOADS/$HEADERS_TGZ: missing or sha256 differs from $HEADERS_SHA256; delete it and retry" >&2; exit 1; }
fi

# Build in a temp directory beside the result and rename it into place: nothing half-made looks complete.
TMP=$(mktemp -d "$CACHE/.onnxruntime-$ORT_VERSION.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$TMP/include" "$TMP/lib"
tar --no-same-owner -xzf "$DOWNLOADS/$HEADERS_TGZ" -C "$TMP" "$HEADERS_DIR"
mv "$TMP/$HEADERS_DIR"/*.h "$TMP/include/"
rm -rf "$TMP/package"
extract() {  # WHEEL MEMBER TARGET
    "$PYTHON" - "$@" <<'PY'
import shutil, sys, zipfile
wheel, member, target = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(target, "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
}
extract "$DOWNLOADS/$WHEEL" "onnxruntime/capi/libonnxruntime.so.$ORT_VERSION" "$TMP/lib/libonnxruntime.so.$ORT_VERSION"
extract "$DOWNLOADS/$ORTX_WHEEL" "$ORTX_MEMBER" "$TMP/lib/libortextensions.so"
patchelf --add-needed libpython3.11.so.1.0 "$TMP/lib/libortextensions.so"
# The library's soname is libonnxruntime.so.1: the loader looks for that name, the linker for libonnxruntime.so.
ln -s "libonnxruntime.so.$ORT_VERSION" "$TMP/lib/libonnxruntime.so.1"
ln -s libonnxruntime.so.1 "$TMP/lib/libonnxruntime.so"
chmod 755 "$TMP"
touch "$TMP/.complete"
rm -rf "$ROOT"
mv "$TMP" "$ROOT"
trap - EXIT
echo "$ROOT"
