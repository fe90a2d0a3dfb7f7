#!/usr/bin/env bash
# The GPU session's check, in one run (about 2 minutes on an H200 plus the machine's start).
# Build and pack first, on the development machine (../shared/gpu/README.md):
#   CARGO_TARGET_DIR=target-cuda cargo build --release --features cuda
#   mkdir -p .gpu && strip -o .gpu/deepmad target-cuda/release/deepmad && gzip -9f .gpu/deepmad
#   cp ../shared/gpu/run_on_gpu.sh .gpu/
# then run `bash bench/gpu_check.sh` on the GPU machine with `.gpu` carried. It writes to $OUT:
# - check*.txt: deepmad's kernels against candle's stock ops on the GPU (forward, gradients),
#   once with cuDNN depthwise convolutions (the default) and once with deepmad's own
#   (DEEPMAD_DEPTHWISE=deepmad, not yet run on a GPU when this was written);
# - bench.md: candle (both depthwise paths) and PyTorch on the same machine, batch 128 and 512;
# - train.txt: the quickstart sweep with 3 epochs on CUDA, end to end.
set -uo pipefail
OUT=${OUT:-/tmp/deepmad-gpu-check}; mkdir -p "$OUT"
(cd .gpu && gunzip -kf deepmad.gz && chmod +x deepmad run_on_gpu.sh) || exit 1
R=".gpu/run_on_gpu.sh .gpu/deepmad"
D="bench/designs/resnet20.json bench/designs/bottleneck.json bench/designs/mbconv-se.json"
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c 'import torch; print("torch", torch.__version__, "cudnn", torch.backends.cudnn.version())'
} 2>&1 | tee "$OUT/env.txt"
echo "== kernel check"
timeout 90 $R bench --check --device cuda 2>&1 | tee "$OUT/check.txt"
DEEPMAD_DEPTHWISE=deepmad timeout 90 $R bench --check --device cuda 2>&1 | tee "$OUT/check-own-depthwise.txt"
echo "== candle"
timeout 150 $R bench $D --device cuda --batch 128,512 --steps 15 --warmup 5 --json 2>&1 | tee "$OUT/candle.jsonl"
DEEPMAD_DEPTHWISE=deepmad timeout 60 $R bench bench/designs/mbconv-se.json --device cuda \
  --batch 128,512 --steps 15 --warmup 5 --json 2>&1 \
  | sed 's/"kernels":"deepmad"/"kernels":"deepmad-own-depthwise"/' | tee "$OUT/candle-own-depthwise.jsonl"
echo "== pytorch"
PYTHONUNBUFFERED=1 timeout 150 python3 bench/torch_bench.py $(for d in $D; do echo --design $d; done) \
  --device cuda --batch 128 --batch 512 --steps 15 --warmup 5 --mode all --json 2>&1 \
  | grep -v -i numpy | tee "$OUT/pytorch.jsonl"
python3 bench/compare.py --from "$OUT"/*.jsonl 2>&1 | tee "$OUT/bench.md"
echo "== training"
sed 's/^epochs = 1/epochs = 3/' examples/quickstart.toml > /tmp/quick3.toml
( time timeout 120 $R run /tmp/quick3.toml --device cuda --database sqlite:///tmp/deepmad-gpu.db \
    --work-dir /tmp/deepmad-gpu-work ) 2>&1 | tail -12 | tee "$OUT/train.txt"
