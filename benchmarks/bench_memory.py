"""Activation memory of the training step vs ctx_len, with and without --grad_cp (issue 10, item 5).

    .venv/bin/python benchmarks/bench_memory.py                        # 0.1B, fp32, ctx 512 1024 2048
    .venv/bin/python benchmarks/bench_memory.py --ctx 256 512 --n_layer 4 --precision bf16

Each (ctx_len, grad_cp) runs `bench`'s TrainStep (the step of `train`) in its own process with glibc
told to return freed blocks above 64 KiB to the OS (MALLOC_MMAP_THRESHOLD_), so RSS follows the live
tensors: one warm-up step, then the peak RSS (VmHWM, reset before it) of one more step above the RSS
before it ("step peak"; "peak RSS" is that peak itself). Bytes per token are the slope of a least-squares
line over the ctx_lens; "grad_cp_keeps" compares the slopes. The grad_cp 0 / 1 runs of each ctx_len
start in alternating order.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys, torch
from rwkv_disha.bench import Config, TrainStep, _peak_rss_bytes, _reset_peak_rss, rss_bytes
kw = json.loads(sys.argv[1])
cfg = Config(**kw)
step = TrainStep(cfg, torch.device("cpu"), cfg.precision)
batch = step.batch(cfg.micro_bsz)
step.step(batch)  # warm-up: optimizer state, allocator
before = rss_bytes()
_reset_peak_rss()
step.step(batch)
peak = _peak_rss_bytes()
res = {"step_peak_bytes": peak - before, "peak_rss_bytes": peak, "rss_before_step": before}
print("RESULT " + json.dumps(res))
"""


# glibc returns blocks above this size to the OS on free (the default threshold adapts upwards and keeps
# freed activations in the heap), so the process's RSS follows the live tensors
ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}


def fit_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ctx", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--n_layer", type=int, default=12)
    ap.add_argument("--n_embd", type=int, default=768)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--adapter", default="bone")
    args = ap.parse_args()
    rows = []
    for i, ctx in enumerate(args.ctx):
        for cp in (0, 1) if i % 2 == 0 else (1, 0):
            kw = dict(n_layer=args.n_layer, n_embd=args.n_embd, ctx_len=ctx, grad_cp=bool(cp), device="cpu",
                      precision=args.precision, adapter=args.adapter)  # fmt: skip
            proc = subprocess.run(
                [sys.executable, "-c", CHILD, json.dumps(kw)], capture_output=True, text=True, env=ENV
            )
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"ctx {ctx} grad_cp {cp} failed")
            res = {"ctx_len": ctx, "grad_cp": cp, **json.loads(line[7:])}
            print(json.dumps(res), file=sys.stderr, flush=True)
            rows.append(res)
    out = {"model": f"L{args.n_layer} C{args.n_embd} V65536", "precision": args.precision, "rows": rows}
    for cp in (0, 1):
        sel = sorted((r for r in rows if r["grad_cp"] == cp), key=lambda r: r["ctx_len"])
        xs = [r["ctx_len"] for r in sel]
        if len(xs) > 1:
            out[f"step_bytes_per_token_grad_cp{cp}"] = round(
                fit_slope(xs, [r["step_peak_bytes"] for r in sel])
            )
            out[f"rss_bytes_per_token_grad_cp{cp}"] = round(fit_slope(xs, [r["peak_rss_bytes"] for r in sel]))
    if "step_bytes_per_token_grad_cp1" in out:
        out["grad_cp_keeps"] = round(
            out["step_bytes_per_token_grad_cp1"] / out["step_bytes_per_token_grad_cp0"], 3
        )
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
