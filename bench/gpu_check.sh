#!/usr/bin/env bash
# The GPU session's check, in one run (about 4 minutes on an H200 plus the machine's start).
# Build and pack first, on a machine without a GPU (docs/cuda.md):
#   bash deploy/cuda/toolkit-from-wheels.sh  # once: toolkit + driver and cuDNN link stand-ins
#   source deploy/cuda/env.sh
#   CARGO_TARGET_DIR=target-cuda cargo build --release --features cuda -p deepmad
#   mkdir -p .gpu && strip -o .gpu/deepmad target-cuda/release/deepmad && gzip -9f .gpu/deepmad
#   bash bench/make_profilers.sh             # optional: driver-call and per-kernel profiles
# then run `bash bench/gpu_check.sh` from the repository root on the GPU machine, with `.gpu`
# next to it (the binary runs through deploy/cuda/run-with-wheel-libs.sh, which finds the
# machine's CUDA 13 and cuDNN libraries). Only a few files may come back from a remote run, so
# everything is also packed into $OUT/gpu-check.tgz:
# - env.txt: the GPU, driver, PyTorch and cuDNN;
# - check*.txt: deepmad's kernels against candle's stock ops on the GPU (forward, gradients),
#   including the fused conv + BatchNorm op, with cuDNN depthwise convolutions (the default)
#   and with deepmad's own (DEEPMAD_DEPTHWISE=deepmad);
# - bench.md: candle and PyTorch on the same machine, batch 128 and 512, each timed loop
#   waiting for the device once at its end (both frameworks); variants: the fused conv +
#   BatchNorm op (DEEPMAD_CUDA_CONV_BN=fused), deepmad's own depthwise kernels, cuDNN's
#   heuristic algorithms instead of timed ones (DEEPMAD_CUDNN_ALGO=heuristic; PyTorch's default,
#   whose timed twin is --cudnn-benchmark), and both frameworks waiting after every step;
# - train*.txt: the quickstart sweep with 3 epochs on CUDA, end to end, without and with the
#   fused op;
# - kt-*.txt (with the profilers): GPU time per kernel of the bottleneck design at batch 512,
#   runs of 10 and 30 timed steps (their difference is 40 steps: the bench times every step
#   twice), without and with the fused op; dc-*.txt: the driver calls of ResNet-20 at batch 128.
# $R, $D, $B, $T and $TD are lists of words, split on purpose where they are used.
# shellcheck disable=SC2086
set -uo pipefail
OUT=${OUT:-/tmp/deepmad-gpu-check}; W=$(mktemp -d); mkdir -p "$OUT"
(cd .gpu && gunzip -kf deepmad.gz && chmod +x deepmad) || exit 1
R="bash deploy/cuda/run-with-wheel-libs.sh .gpu/deepmad"
D="bench/designs/resnet20.json bench/designs/bottleneck.json bench/designs/mbconv-se.json"
B="--device cuda --batch 128,512 --steps 20 --warmup 5 --json"
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c 'import torch; print("torch", torch.__version__, "cudnn", torch.backends.cudnn.version())'
  echo "cpu: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
} > "$W/env.txt" 2>&1; cat "$W/env.txt"
# Rows of a variant: its name in the `kernels` field, so that compare.py gives it a column.
rename() { sed "s/\"kernels\":\"deepmad\"/\"kernels\":\"$1\"/"; }
echo "== kernel check"
timeout 90 $R bench --check --device cuda > "$W/check.txt" 2>&1; tail -8 "$W/check.txt"
DEEPMAD_DEPTHWISE=deepmad timeout 90 $R bench --check --device cuda > "$W/check-own-depthwise.txt" 2>&1
tail -1 "$W/check-own-depthwise.txt"
echo "== candle"
timeout 100 $R bench $D $B > "$W/candle.jsonl" 2>&1
DEEPMAD_CUDA_CONV_BN=fused timeout 100 $R bench $D $B 2>&1 | rename deepmad-fused > "$W/candle-fused.jsonl"
timeout 100 $R bench $D $B --sync-each-step > "$W/candle-sync.jsonl" 2>&1
DEEPMAD_CUDA_CONV_BN=fused timeout 100 $R bench $D $B --sync-each-step 2>&1 \
  | rename deepmad-fused > "$W/candle-fused-sync.jsonl"
DEEPMAD_CUDNN_ALGO=heuristic timeout 100 $R bench $D $B 2>&1 | rename deepmad-heuristic > "$W/candle-heuristic.jsonl"
DEEPMAD_DEPTHWISE=deepmad timeout 60 $R bench bench/designs/mbconv-se.json $B 2>&1 \
  | rename deepmad-own-depthwise > "$W/candle-own-depthwise.jsonl"
echo "== training"
sed 's/^epochs = 1/epochs = 3/' examples/quickstart.toml > "$W/quick3.toml"
for variant in separate fused; do
  ( time DEEPMAD_CUDA_CONV_BN=$variant timeout 90 $R run "$W/quick3.toml" --device cuda \
      --database "sqlite://$W/gpu-$variant.db" --work-dir "$W/work-$variant" ) > "$W/train-$variant.txt" 2>&1
  tail -8 "$W/train-$variant.txt"
done
rm -rf "$W"/work-* "$W"/*.db*
echo "== pytorch"
T="--device cuda --batch 128 --batch 512 --steps 20 --warmup 5 --json"
TD=$(for d in $D; do echo --design $d; done)
PYTHONUNBUFFERED=1 timeout 120 python3 bench/torch_bench.py $TD $T --mode all 2>&1 \
  | grep -v -i numpy > "$W/pytorch.jsonl"
PYTHONUNBUFFERED=1 timeout 80 python3 bench/torch_bench.py $TD $T --mode fp32 --cudnn-benchmark 2>&1 \
  | grep -v -i numpy | sed -E "s/\"mode\": ?\"fp32\"/\"mode\": \"fp32-benchmark\"/" > "$W/pytorch-benchmark.jsonl"
PYTHONUNBUFFERED=1 timeout 80 python3 bench/torch_bench.py $TD $T --mode fp32 --sync-each-step 2>&1 \
  | grep -v -i numpy > "$W/pytorch-sync.jsonl"
python3 bench/compare.py --from "$W"/*.jsonl > "$W/bench.md" 2>&1; cat "$W/bench.md"
if [ -f .gpu/kernel_times.so ] && [ -f .gpu/driver_calls.so ]; then
  echo "== profiles"
  for variant in separate fused; do
    for n in 10 30; do
      DEEPMAD_CUDA_CONV_BN=$variant CUDA_INJECTION64_PATH=$PWD/.gpu/kernel_times.so \
        KERNEL_TIMES_OUT="$W/kt-bottleneck-$variant-$n.txt" timeout 40 $R bench \
        bench/designs/bottleneck.json --device cuda --batch 512 --steps $n --warmup 5 > /dev/null 2>&1
      DEEPMAD_CUDA_CONV_BN=$variant LD_PRELOAD=$PWD/.gpu/driver_calls.so timeout 40 $R bench \
        bench/designs/resnet20.json --device cuda --batch 128 --steps $n --warmup 5 --sync-each-step \
        > "$W/dc-resnet20-$variant-$n.txt" 2>&1
    done
  done
fi
cp "$W/bench.md" "$W/check.txt" "$OUT/"
tar czf "$OUT/gpu-check.tgz" -C "$W" .
