#!/usr/bin/env bash
# One device run: carried wheels -> GPU tests -> GPU benchmarks. Output under $OUT (device tool).
# Usage on the device machine:  bash scripts/gpu_check.sh [tests|bench|all]   (with .whl carried)
# tests ~ up to 7 min (first fla compile is slow), bench ~ 6 min: one call each fits the 10-min limit.
set -u
PART=${1:-all}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  > "$OUT/pip.log" 2>&1 || { tail -5 "$OUT/pip.log"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD/src
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, lightning, fla, bitsandbytes; print('torch', torch.__version__, 'lightning', lightning.__version__, 'fla ok, bnb', bitsandbytes.__version__)"
python3 -c "import deepspeed; print('deepspeed', deepspeed.__version__)" 2>&1 | tail -1
if [ "$PART" != bench ]; then
# -v prints each test's name as it starts: the first fla tests spend minutes in Triton compile/autotune
timeout 400 python3 -m pytest tests/gpu tests/adapters/test_cuda.py -v -x -p no:cacheprovider -o addopts="" \
  --durations=10 2>&1 | tee "$OUT/gpu_tests.log" | grep -v "RuntimeWarning\|If you want\|return fn" | tail -40
fi
[ "$PART" = tests ] && exit 0
timeout 60 python3 -m rwkv_disha.cli bench --device cuda --ops fla,torch,loop --T 512 --repeat 5 2>&1 | tee "$OUT/bench_kernel.json"
timeout 60 python3 -m rwkv_disha.cli bench --device cuda --ops fla,torch --T 4096 --B 4 --repeat 5 2>&1 | tee -a "$OUT/bench_kernel.json"
timeout 90 python3 benchmarks/profile_step.py --device cuda --dtype bf16 --op fla 2>&1 | tee "$OUT/profile_step.txt" | head -40
timeout 150 python3 benchmarks/bench_train.py --accelerator gpu --precisions bf16 fp32 --steps 30 2>&1 | tee "$OUT/bench_train_gpu.json" | tail -30
