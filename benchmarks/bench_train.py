"""`rwkv-disha train` throughput and memory (issue 5): the 0.1B shape (L12, C768, V65536, random init),
ctx 512, micro_bsz 1, Bone r=64, fp32 and bf16; model FLOPs utilisation against this machine's
matmul peak measured in the same run.

    .venv/bin/python benchmarks/bench_train.py                    # CPU, fp32 + bf16
    .venv/bin/python benchmarks/bench_train.py --accelerator gpu --precisions bf16 --steps 30

Each configuration trains in its own process (so its peak RSS is its own); the first 3 steps are
warm-up and not timed. Training FLOPs per token: the frozen base needs forward + input-gradient
(2 x forward matmul FLOPs), the adapter adds its own forward + both gradients.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, resource, sys, time
import lightning as L, torch
from rwkv_disha.cli import parse_config
from rwkv_disha.train.run import setup as fit

class Timer(L.Callback):
    def __init__(self): self.t = []
    def on_train_batch_end(self, *a):
        if torch.cuda.is_available(): torch.cuda.synchronize()
        self.t.append(time.perf_counter())

timer = Timer()
_, cfg = parse_config("train", sys.argv[1:])
fit(cfg, extra_callbacks=[timer])
d = [b - a for a, b in zip(timer.t[2:], timer.t[3:])]
d.sort()
gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0
print("RESULT " + json.dumps({"step_s_median": d[len(d) // 2], "step_s_mean": sum(d) / len(d),
      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "gpu_peak_mb": gpu_peak}))
"""


def flops_per_token(n_layer: int, C: int, V: int, r: int, ffn: int) -> dict:
    """Matmul FLOPs per token: forward, and training (frozen base + Bone adapter on 6 layers/block)."""
    from rwkv_disha.model.init import lowrank_widths

    dw, da, dv, dg = lowrank_widths(C)
    per_block = 4 * C * C + 2 * C * ffn + 2 * C * (dw + da + dv + dg)  # weights touched per token
    wkv = 6 * C * 64  # state update + readout per token (head size 64)
    fwd = 2 * (n_layer * per_block + C * V) + n_layer * wkv
    adapter_in_out = [(C, C)] * 4 + [(C, ffn), (ffn, C)]
    bone_fwd = n_layer * sum(
        2 * r * out + i for i, out in adapter_in_out
    )  # fold the input + (r x out) matmul
    train = 2 * fwd + 3 * bone_fwd
    return {"forward": fwd, "train": train, "bone_share_of_train": 3 * bone_fwd / train}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n_layer", type=int, default=12)
    ap.add_argument("--n_embd", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--ctx_len", type=int, default=512)
    ap.add_argument("--r", type=int, default=64)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--accelerator", default="cpu")
    ap.add_argument("--op", default="auto")
    ap.add_argument("--grad_cp", type=int, default=0)
    args = ap.parse_args()

    import torch

    from rwkv_disha.bench import matmul_peak_flops
    from rwkv_disha.model.init import init_state_dict
    from rwkv_disha.model.load import save_state_dict

    device = "cuda" if args.accelerator == "gpu" else "cpu"
    tmp = tempfile.mkdtemp(prefix="bench_train_")
    base = os.path.join(tmp, "base.pth")
    save_state_dict(init_state_dict(args.n_layer, args.n_embd, args.vocab, style="pretrain"), base)
    fl = flops_per_token(args.n_layer, args.n_embd, args.vocab, args.r, 4 * args.n_embd)
    n = 8192 if device == "cuda" else 2048
    # only the dtypes the asked precisions run their matmuls in: a bf16 peak on a CPU without bf16
    # instructions takes minutes and is not needed for --precisions fp32
    kinds = {"bf16" if p in ("bf16", "fp16") else "fp32" for p in args.precisions}
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    peaks = {k: matmul_peak_flops(dtypes[k], n=n, device=device) for k in sorted(kinds)}
    results = {
        "shape": f"L{args.n_layer} C{args.n_embd} V{args.vocab} ctx{args.ctx_len} bsz1 Bone r{args.r}",
        "device": torch.cuda.get_device_name()
        if device == "cuda"
        else f"cpu, {torch.get_num_threads()} threads",
        "matmul_peak_gflops": {k: round(v / 1e9, 1) for k, v in peaks.items()},
        "train_gflop_per_token": round(fl["train"] / 1e9, 4),
        "bone_share_of_train_flops": round(fl["bone_share_of_train"], 4),
        "runs": {},
    }
    for prec in args.precisions:
        proj = os.path.join(tmp, f"out-{prec}")
        argv = [
            "--load_model", base, "--proj_dir", proj, "--data_type", "dummy", "--ctx_len", str(args.ctx_len),
            "--micro_bsz", "1", "--epoch_steps", str(args.steps), "--epoch_count", "1", "--precision", prec,
            "--accelerator", args.accelerator, "--op", args.op, "--grad_cp", str(args.grad_cp),
            "--disha_config", json.dumps({"mode": "bone", "load": "", "r": args.r}), "--progress_bar", "0",
            "--lr_init", "1e-4", "--lr_final", "1e-4",
        ]  # fmt: skip
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"{prec} run failed")
        res = json.loads(line[len("RESULT ") :])
        tok_s = args.ctx_len / res["step_s_median"]
        peak = peaks["bf16" if prec in ("bf16", "fp16") else "fp32"]
        results["runs"][prec] = {
            "tokens_per_s": round(tok_s, 1),
            "step_s_median": round(res["step_s_median"], 3),
            "peak_rss_mb": round(res["peak_rss_mb"]),
            "gpu_peak_mb": round(res["gpu_peak_mb"]),
            "mfu": round(fl["train"] * tok_s / peak, 4),
            "wall_s": round(time.time() - t0, 1),
        }
        print(json.dumps({prec: results["runs"][prec]}), file=sys.stderr, flush=True)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
