#!/usr/bin/env bash
# Link-time stand-in for cuDNN, for CUDA builds on a machine without cuDNN. The worker's `cuda`
# feature links libcudnn through cudarc; a GPU machine has the real cuDNN 9 (for example in
# PyTorch's `nvidia/cudnn/lib`, which deploy/cuda/run-with-wheel-libs.sh puts on the library
# path). Like the driver stand-in of deploy/cuda/toolkit-from-wheels.sh (which runs this
# script): one empty function per cuDNN symbol that cudarc declares, with the real library's
# soname. docs/cuda.md explains both.
# Usage: source deploy/cuda/env.sh && bash bench/make_cudnn_stub.sh
# (CUDARC_SRC may name cudarc's source folder; by default the version in Cargo.lock.)
set -euo pipefail
: "${CUDA_HOME:?source deploy/cuda/env.sh first}"
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SRC=${CUDARC_SRC:-$(bash "$REPO/deploy/cuda/cudarc-source.sh")}
mkdir -p "$CUDA_HOME/lib/stubs"
C=$(mktemp --suffix=.c)
grep -ohE "pub unsafe fn (cudnn[A-Za-z0-9_]+)\(" "$SRC"/src/cudnn/sys/*.rs \
  | sed -E 's/pub unsafe fn (.*)\(/\1/' | sort -u | awk '{print "void " $1 "(void) {}"}' > "$C"
gcc -shared -fPIC -o "$CUDA_HOME/lib/stubs/libcudnn.so" -Wl,-soname,libcudnn.so.9 "$C"
rm -f "$C"
echo "cuDNN stand-in: $CUDA_HOME/lib/stubs/libcudnn.so ($(nm -D "$CUDA_HOME/lib/stubs/libcudnn.so" | grep -c ' T cudnn') symbols)"
