#!/usr/bin/env bash
# Builds a CUDA 13.0 toolkit folder from NVIDIA's PyPI wheels, so that `--features cuda`
# compiles and links on a machine with no GPU and no CUDA install. docs/cuda.md explains it.
#
# Usage: deploy/cuda/toolkit-from-wheels.sh [DIR]   (default: $HOME/.cache/cuda13)
# Then:  source deploy/cuda/env.sh [DIR]
#        CARGO_TARGET_DIR=target-cuda cargo build --release --features cuda -p deepmad
# Needs: python3 with pip, gcc, network access to PyPI (about 650 MB of wheels, 1.2 GB
# installed), and cudarc's source in the cargo registry (run `cargo fetch` in the repository
# first).
#
# Besides the toolkit it makes two link-time stand-ins in DIR/site/nvidia/cu13/lib/stubs:
# libcuda.so (the driver library, here) and libcudnn.so (cuDNN, bench/make_cudnn_stub.sh).
# They only satisfy the linker; the binary runs against the real libraries of a GPU machine.
set -euo pipefail
DIR=${1:-$HOME/.cache/cuda13}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
mkdir -p "$DIR/wheels"
# 13.0 matches the driver of the GPU machines this was made for (580). A newer nvcc emits PTX
# that an older driver rejects: pick the toolkit for the oldest driver you will run on.
python3 -m pip download -q --no-deps --only-binary=:all: \
  --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_28_x86_64 --python-version 3.11 -d "$DIR/wheels" \
  nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-runtime==13.0.96 \
  nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 nvidia-curand==10.4.0.35 nvidia-cublas==13.0.2.14
python3 -m pip install -q --no-deps --no-index --no-compile --upgrade --target "$DIR/site" "$DIR"/wheels/*.whl
C=$DIR/site/nvidia/cu13
# The wheels ship only versioned sonames; the linker looks for the unversioned names.
ln -sfn lib "$C/lib64"
( cd "$C/lib" && ln -sf libcudart.so.13 libcudart.so && ln -sf libcublas.so.13 libcublas.so \
  && ln -sf libcublasLt.so.13 libcublasLt.so && ln -sf libcurand.so.10 libcurand.so && ln -sf libnvrtc.so.13 libnvrtc.so )

# cudarc's source: the version Cargo.lock names, else the newest in the registry.
SRC=$(bash "$REPO/deploy/cuda/cudarc-source.sh")

# Link-time stand-in for the driver library (the real libcuda.so.1 comes with the GPU
# machine's driver): one empty function per driver symbol that cudarc references, with the
# driver's soname, so the binary asks for libcuda.so.1 at run time.
mkdir -p "$C/lib/stubs"
grep -ohE "pub unsafe fn (cu[A-Za-z0-9_]+)\(" "$SRC"/src/driver/sys/*.rs | sed -E 's/pub unsafe fn (.*)\(/\1/' | sort -u \
  | awk '{print "void " $1 "(void) {}"}' > "$DIR/libcuda_stub.c"
gcc -shared -fPIC -o "$C/lib/stubs/libcuda.so" -Wl,-soname,libcuda.so.1 "$DIR/libcuda_stub.c"
echo "driver stand-in: $C/lib/stubs/libcuda.so"

# The same for cuDNN, which the worker links for its convolutions and BatchNorm.
CUDA_HOME=$C CUDARC_SRC=$SRC bash "$REPO/bench/make_cudnn_stub.sh"

"$C/bin/nvcc" --version | tail -1
echo "CUDA toolkit ready in $C; next: source deploy/cuda/env.sh${1:+ $1}"
