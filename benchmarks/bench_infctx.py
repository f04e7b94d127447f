"""Peak memory of `--train_type infctx` (issue 12): a 0.1B-shape step at ctx_len 8192 in chunks of 512
against the plain step at ctx_len 512. Not a test: a measurement recorded in docs/BENCHMARKS.md.

    .venv/bin/python benchmarks/bench_infctx.py                           # 0.1B, Bone r=64, fp32, CPU
    .venv/bin/python benchmarks/bench_infctx.py --adapter state --long 16384

Each case runs in its own process: build `bench`'s TrainStep (train's model build, loss, backward,
clipping, AdamW) on random weights, take one plain 512-token warm-up step (so Adam's state and the
allocator's pools exist in both cases), reset the kernel's RSS high-water mark (/proc/self/clear_refs),
then take the measured step and read VmHWM. "step peak" is that high-water mark minus the RSS just
before the measured step: the memory the step itself needs on top of the resident model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys, time, torch
from rwkv_disha.bench import Config, TrainStep, _peak_rss_bytes, _reset_peak_rss, rss_bytes
kw, train_type, chunk, ctx = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
step = TrainStep(Config(**kw), torch.device("cpu"), kw["precision"])
step.step(step.batch(1))                      # warm-up: plain step at --ctx_len 512
step.cfg.ctx_len = ctx                        # the measured sample length
step.tcfg.engine.train_type, step.tcfg.engine.chunk_ctx = train_type, chunk
batch = step.batch(1)
_reset_peak_rss()
before = rss_bytes()
t0 = time.perf_counter()
loss = float(step.step(batch))
print(json.dumps({"peak": _peak_rss_bytes(), "before": before, "s": time.perf_counter() - t0, "loss": loss}))
"""


def run_case(kw: dict, train_type: str, chunk: int, ctx: int) -> dict:
    argv = [sys.executable, "-c", CHILD, json.dumps(kw), train_type, str(chunk), str(ctx)]
    # glibc's dynamic mmap threshold keeps freed activation buffers in the heap, where RSS counts them
    # after every chunk (measured: +50 MiB per 512-token chunk for 2 blocks of C=768, none with a fixed
    # threshold); a fixed threshold returns each large freed buffer to the kernel, so RSS is what lives
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(argv, capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="0.1B")
    ap.add_argument("--n_layer", type=int, default=0, help="0: from --shape")
    ap.add_argument("--n_embd", type=int, default=0, help="0: from --shape")
    ap.add_argument("--adapter", default="bone", help="bone, bat, lora, state, full")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--long", type=int, default=8192, help="infctx ctx_len")
    args = ap.parse_args()
    kw = {
        "shape": args.shape,
        "n_layer": args.n_layer,
        "n_embd": args.n_embd,
        "adapter": args.adapter,
        "precision": args.precision,
        "op": "torch",
        "ctx_len": args.chunk,
        "micro_bsz": 1,
    }
    cases = [("none", args.chunk, args.chunk), ("infctx", args.chunk, args.long)]
    rows = []
    for train_type, chunk, ctx in cases:
        r = run_case(kw, train_type, chunk, ctx)
        rows.append(
            {
                "train_type": train_type,
                "ctx_len": ctx,
                "chunk_ctx": chunk if train_type == "infctx" else None,
                "peak_rss_mib": round(r["peak"] / 2**20),
                "step_peak_mib": round((r["peak"] - r["before"]) / 2**20),
                "step_s": round(r["s"], 1),
                "loss": round(r["loss"], 3),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    ratio = rows[1]["peak_rss_mib"] / rows[0]["peak_rss_mib"]
    print(
        f"\n{args.shape} {args.adapter} {args.precision}: peak RSS infctx ctx {args.long}"
        f" / plain ctx {args.chunk} = {ratio:.2f}x (target <= 1.5x)"
    )
    print("| train_type | ctx_len | chunk_ctx | peak RSS MiB | step peak MiB | step s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['train_type']} | {r['ctx_len']} | {r['chunk_ctx'] or '-'} | {r['peak_rss_mib']} "
            f"| {r['step_peak_mib']} | {r['step_s']} |"
        )


if __name__ == "__main__":
    main()
