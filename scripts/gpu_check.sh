#!/usr/bin/env bash
# Device runs, each sized for 8 minutes: carried wheels -> Triton warm-up -> the parts asked for. Everything
# measured lands in $OUT (the device tool brings it back).
#
#   bash scripts/gpu_check.sh              all parts in order (tests, targets, extras), as time allows
#   bash scripts/gpu_check.sh targets      issue 10's GPU targets first (0.1B tokens/s with fla and --op
#                                          cuda, 1.5B MFU sweep, VRAM), then extras
#   bash scripts/gpu_check.sh tests        tests/gpu + the CUDA adapter tests (fla, --op cuda, DeepSpeed, ...)
# With a cold Triton cache (the first run ever) one call does not fit everything: run `targets`, keep the
# cache, then `tests`.
#
# Here, before the call:  bash scripts/gpu_wheels.sh            (once: .whl/, ~50 MB, git-ignored)
#                         mkdir -p .triton && tar xzf <files_at>/triton_cache.tgz -C .triton   (if kept)
# Device tool:            run(command="bash scripts/gpu_check.sh targets", carry=[".whl", ".triton"], timeout_s=540)
# Afterwards, keep <files_at>/triton_cache.tgz: the next run unpacks it into .triton/ and skips the
# Triton compile + autotune (and the --op cuda build) that ate the whole test budget of an earlier run.
set -u
WHAT=${1:-all}
case "$WHAT" in all|targets|tests) ;; *) echo "usage: gpu_check.sh [all|targets|tests]"; exit 2 ;; esac
OUT=${OUT:-$(mktemp -d /tmp/gpu_check.XXXX)}; mkdir -p "$OUT"  # bench --json refuses existing files
BUDGET=${BUDGET:-470}  # seconds; each later part is skipped when it would not fit
export PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=$PWD/.triton  # ignored by git, carried in and packed out again
# --op cuda's build (torch cpp_extension) goes into the same carried folder, so a rerun skips it
export TORCH_EXTENSIONS_DIR=$PWD/.triton/torch_extensions
mkdir -p "$TRITON_CACHE_DIR" "$TORCH_EXTENSIONS_DIR"
left() { echo $((BUDGET - SECONDS)); }
part() { echo "== [$SECONDS s] $*" | tee -a "$OUT/parts.log"; }

part install
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  > "$OUT/pip.log" 2>&1 || { tail -5 "$OUT/pip.log"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD/src PATH=/tmp/site/bin:$PATH  # bin: the ninja --op cuda's build runs
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, lightning, fla; print('torch', torch.__version__, 'lightning', lightning.__version__, 'fla ok')" 2>&1 | tail -1
B="python3 -m rwkv_disha.cli bench --device cuda"

part "warm-up: fla fwd + bwd in fp32 and bf16 (Triton compile / autotune, cached in .triton)"
timeout 150 python3 - <<'EOF' 2>&1 | tail -3
import time, torch
from rwkv_disha.kernels.fla import wkv7_fla
t0 = time.time()
for dt in (torch.float32, torch.bfloat16):
    for T in (17, 256, 512):
        r, w, k, v, a, b = (torch.randn(2, T, 4, 64, device="cuda", dtype=dt, requires_grad=True) for _ in range(6))
        y, s = wkv7_fla(r, -0.5 * torch.rand_like(w), k, v, a, b)
        y.float().sum().backward()
torch.cuda.synchronize(); print(f"fla warm-up {time.time() - t0:.0f} s")
EOF

build_cuda() {
  part "build --op cuda (wkv7.cu via cpp_extension; cached in .triton/torch_extensions)"
  timeout 180 python3 -c "
import time; t0 = time.time()
from rwkv_disha.kernels.cuda import extension; extension()
print(f'--op cuda kernel built/loaded in {time.time() - t0:.0f} s')" 2>&1 | tail -3 | tee "$OUT/cuda_build.log"
}

run_tests() {
  part "tests: tests/gpu + CUDA adapters"
  timeout $(( $(left) > 300 ? 300 : $(left) )) python3 -m pytest tests/gpu tests/adapters/test_cuda.py -q \
    -p no:cacheprovider -o addopts="" --durations=8 2>&1 | tee "$OUT/gpu_tests.log" \
    | grep -v "Warning\|If you want\|return fn" | tail -25
}

bench_01b() {  # $1: a name, then extra flags; target 1: 0.1B, ctx 512, micro_bsz 16, grad_cp 1, bf16 >= 43k tokens/s
  local name=$1; shift
  [ "$(left)" -gt 40 ] && timeout 60 $B --shape 0.1B --ctx_len 512 --micro_bsz 16 --grad_cp 1 --precision bf16 \
    --steps 8 --warmup 3 "$@" --json "$OUT/step_0.1B_bsz16_cp1_$name.json" > /dev/null 2>> "$OUT/step_0.1B.err"
}

run_targets() {
  part "bench 0.1B bf16 ctx512 bsz16 grad_cp1: bone r64 and frozen (fla)"
  bench_01b bone --adapter bone --r 64
  bench_01b frozen --adapter none
  # target 2: 1.5B at ctx 1024 at its best micro_bsz >= 30 % MFU
  part "bench 1.5B bf16 ctx1024 sweep micro_bsz"
  [ "$(left)" -gt 70 ] && timeout 100 $B --shape 1.5B --ctx_len 1024 --precision bf16 --adapter bone --r 64 \
    --sweep micro_bsz --sweep_max 16 --steps 3 --warmup 2 --json "$OUT/sweep_1.5B.json" > /dev/null 2> "$OUT/sweep_1.5B.err"
  # target 3: VRAM at ctx 1024, micro_bsz 1, bf16, Bone r64 <= 0.8x the tutorial (0.4B 3.1, 1.5B 5.6, 3B 8.8 GB),
  # at the tutorial's settings: its script trains with --grad_cp 1
  for S in 0.4B 1.5B 3B; do
    part "bench VRAM $S ctx1024 bsz1 grad_cp1"
    [ "$(left)" -gt 35 ] && timeout 60 $B --shape $S --ctx_len 1024 --micro_bsz 1 --precision bf16 --adapter bone \
      --r 64 --grad_cp 1 --steps 3 --warmup 2 --json "$OUT/vram_$S.json" > /dev/null 2> "$OUT/vram_$S.err"
  done
}

run_extras() {
  part "bench 0.1B with --op cuda"
  bench_01b bone_opcuda --adapter bone --r 64 --op cuda
  part "profile one 0.1B bf16 step on the GPU: kernels per step, time outside kernels (is it launch-bound?)"
  [ "$(left)" -gt 60 ] && timeout 50 python3 benchmarks/profile_step.py --device cuda --dtype bf16 --op fla --steps 3 \
    --rows 15 > "$OUT/profile_step_cuda.txt" 2>&1; head -3 "$OUT/profile_step_cuda.txt"
  part "bench kernel fla vs cuda vs torch"
  [ "$(left)" -gt 30 ] && timeout 40 $B --what kernel --ops fla,cuda,torch --T 4096 --B 4 --repeat 5 \
    --json "$OUT/kernel.json" > /dev/null
  [ "$(left)" -gt 30 ] && timeout 40 $B --what kernel --ops fla,cuda,torch --T 4096 --B 4 --repeat 5 \
    --kernel_dtype bf16 --json "$OUT/kernel_bf16.json" > /dev/null
  part "bench 0.1B --compile 1 (inductor + Triton), with --cuda_graphs 1, and the compile-equals-eager test"
  [ "$(left)" -gt 100 ] && bench_01b compile --adapter bone --r 64 --compile 1
  [ "$(left)" -gt 100 ] && bench_01b cudagraphs --adapter bone --r 64 --compile 1 --cuda_graphs 1
  # --op cuda is a custom op that the compiled block takes in: one graph (and one CUDA graph) per block
  [ "$(left)" -gt 100 ] && bench_01b cudagraphs_opcuda --adapter bone --r 64 --op cuda --compile 1 --cuda_graphs 1
  [ "$(left)" -gt 40 ] && RWKV_DISHA_TEST_INDUCTOR=1 timeout $(( $(left) - 20 )) python3 -m pytest -q \
    -p no:cacheprovider -o addopts="" tests/bench/test_speed_paths.py -k compiled 2>&1 | tail -3 \
    | tee "$OUT/compile_test.log"
}

case "$WHAT" in
  tests) build_cuda; run_tests ;;
  targets) run_targets; build_cuda; run_extras ;;
  all) build_cuda; run_tests; run_targets; run_extras ;;
esac

part "pack Triton cache"
tar czf "$OUT/triton_cache.tgz" -C "$TRITON_CACHE_DIR" . 2>/dev/null
python3 - "$OUT" <<'EOF'
import glob, json, os, sys
for f in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
    r = json.load(open(f))
    best = r.get("best", r)
    keys = ("micro_bsz", "tokens_per_s", "mfu", "peak_mem_bytes", "matmul_peak_flops")
    print(os.path.basename(f), {k: best.get(k) for k in keys if k in best} or r.get("speedup_of_fla"))
EOF
part done
