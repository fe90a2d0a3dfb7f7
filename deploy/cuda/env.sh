# Source this before `cargo build --features cuda` with the toolkit that
# deploy/cuda/toolkit-from-wheels.sh made (docs/cuda.md).
# Usage: source deploy/cuda/env.sh [DIR]   (the DIR given to toolkit-from-wheels.sh; default $HOME/.cache/cuda13)
# shellcheck shell=bash
_deepmad_cuda_dir=${1:-$HOME/.cache/cuda13}
export CUDA_HOME=$_deepmad_cuda_dir/site/nvidia/cu13  # cudarc links from here (lib, lib/stubs)
export CUDA_PATH=$CUDA_HOME
export PATH=$CUDA_HOME/bin:$PATH                     # cudarc reads the CUDA version from `nvcc --version`
export NVCC=$CUDA_HOME/bin/nvcc                      # candle's kernel build runs this nvcc
# candle compiles its kernels for one compute capability, and without a GPU there is no
# nvidia-smi to ask. 90 is the H100 / H200; set your own before sourcing to override.
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
unset _deepmad_cuda_dir
