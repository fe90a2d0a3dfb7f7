#!/usr/bin/env bash
# On a GPU machine: runs a binary built with `--features cuda`, with the CUDA 13 libraries that
# machine has on the library path: its CUDA toolkit, and the nvidia wheels of its Python
# (PyTorch's: cuBLAS, NVRTC, cuDNN 9, ...). The driver library comes with the driver.
# Usage: deploy/cuda/run-with-wheel-libs.sh BINARY [ARGS...]   (docs/cuda.md)
# Exits 127, listing them, when a library the binary needs is still not found.
set -uo pipefail
dirs=()
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/nvidia/lib64; do
  [ -d "$d" ] && dirs+=("$d")
done
for s in $(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null); do
  for d in "$s"/nvidia/cu13/lib "$s"/nvidia/cudnn/lib; do [ -d "$d" ] && dirs+=("$d"); done
done
LD_LIBRARY_PATH="$(IFS=:; echo "${dirs[*]}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LD_LIBRARY_PATH
if ldd "$1" | grep -q "not found"; then ldd "$1" | grep "not found"; exit 127; fi
exec "$@"
