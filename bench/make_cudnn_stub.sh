#!/usr/bin/env bash
# Link-time stand-in for cuDNN, for CUDA builds on a machine without cuDNN (the development
# machines). The worker's `cuda` feature links libcudnn through cudarc; the GPU machines have the
# real cuDNN 9 in PyTorch's `nvidia/cudnn/lib`, which `run_on_gpu.sh` puts on the library path.
# Like the driver stand-in made by ../shared/gpu/make_cuda_env.sh: one empty function per cuDNN
# symbol that cudarc declares, with the real library's soname.
# Usage (after make_cuda_env.sh and `source env_cuda.sh`): bash bench/make_cudnn_stub.sh
set -euo pipefail
: "${CUDA_HOME:?source ../shared/gpu/env_cuda.sh first}"
SRC=$(ls -d "$HOME"/.cargo/registry/src/*/cudarc-* 2>/dev/null | sort -V | tail -1)
[ -n "$SRC" ] || { echo "cudarc source not found: run 'cargo fetch' first" >&2; exit 1; }
mkdir -p "$CUDA_HOME/lib/stubs"
C=$(mktemp --suffix=.c)
grep -ohE "pub unsafe fn (cudnn[A-Za-z0-9_]+)\(" "$SRC"/src/cudnn/sys/*.rs \
  | sed -E 's/pub unsafe fn (.*)\(/\1/' | sort -u | awk '{print "void " $1 "(void) {}"}' > "$C"
gcc -shared -fPIC -o "$CUDA_HOME/lib/stubs/libcudnn.so" -Wl,-soname,libcudnn.so.9 "$C"
rm -f "$C"
echo "cuDNN stand-in: $CUDA_HOME/lib/stubs/libcudnn.so ($(nm -D "$CUDA_HOME/lib/stubs/libcudnn.so" | grep -c ' T cudnn') symbols)"
