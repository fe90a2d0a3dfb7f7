#!/usr/bin/env bash
# Builds the two profiling helpers for GPU machines that have no Nsight, into DIR (default .gpu):
# - driver_calls.so (LD_PRELOAD): the CUDA driver calls the process makes directly, with
#   their counts and host time (bench/driver_calls.c);
# - kernel_times.so (CUDA_INJECTION64_PATH) and the libcupti.so.13 it loads from its own folder:
#   GPU time per kernel, memset and memcopy (bench/kernel_times.c).
# Needs gcc, pip, and the CUDA 13 toolkit of deploy/cuda/toolkit-from-wheels.sh (for cuda.h;
# docs/cuda.md), or CUDA_HOME set to another CUDA 13 toolkit.
# bench/gpu_check.sh uses them when they are in .gpu.
set -euo pipefail
DIR=${1:-.gpu}
CUDA=${CUDA_HOME:-$HOME/.cache/cuda13/site/nvidia/cu13}
CUPTI=$HOME/.cache/cupti13
mkdir -p "$DIR" "$CUPTI"
if [ ! -f "$CUPTI/nvidia/cu13/lib/libcupti.so.13" ]; then
  python3 -m pip download -q --no-deps nvidia-cuda-cupti==13.0.85 -d "$CUPTI/wheels"
  python3 -m pip install -q --no-deps --no-index --target "$CUPTI" "$CUPTI"/wheels/*.whl
fi
C=$CUPTI/nvidia/cu13
gcc -O2 -Wall -shared -fPIC -o "$DIR/driver_calls.so" bench/driver_calls.c -ldl
# '$ORIGIN' is for the dynamic linker: the folder of kernel_times.so itself.
# shellcheck disable=SC2016
gcc -O2 -Wall -shared -fPIC -I"$C/include" -I"$CUDA/include" -o "$DIR/kernel_times.so" \
  bench/kernel_times.c -L"$C/lib" -l:libcupti.so.13 -Wl,-rpath,'$ORIGIN'
cp "$C/lib/libcupti.so.13" "$DIR/"
echo "built $DIR/driver_calls.so, $DIR/kernel_times.so (+ libcupti.so.13)"
