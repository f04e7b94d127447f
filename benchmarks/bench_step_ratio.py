"""Adapter step-time ratios on train's real step (issue 10's CPU target: Bone / frozen <= FLOP ratio + 0.02).

    .venv/bin/python benchmarks/bench_step_ratio.py                       # 0.1B, ctx 512, fp32, none vs bone
    .venv/bin/python benchmarks/bench_step_ratio.py --adapters none bone bat lora --rounds 6
    .venv/bin/python benchmarks/bench_step_ratio.py --adapters bone --ops torch cpp     # WKV kernels

Every variant is `bench`'s TrainStep (model + adapters + chunked head/CE + backward + clip + AdamW) in one
process; steps run in interleaved rounds whose order rotates and reverses every round, and the ratio is
the median over rounds of (variant time / the first variant's time in the same round), so a shared
machine's drifting load cancels. FLOP ratios come from bench.flops_per_token. MFU per round is against
the matmul rate probed in that round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", nargs="+", default=["none", "bone"])
    ap.add_argument("--shape", default="0.1B")
    ap.add_argument("--ctx_len", type=int, default=512)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--r", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ops", nargs="+", default=["auto"], help="WKV kernels; each adapter runs with each")
    args = ap.parse_args()

    from rwkv_disha.bench import Config, MatmulProbe, TrainStep, flops_per_token, interleaved_times
    from rwkv_disha.hardware import cpu_precision
    from rwkv_disha.measure import paired_median_ratio

    precision, notice = cpu_precision(args.precision)
    if notice:
        print(notice, file=sys.stderr)
    dev = torch.device("cpu")
    steps, flops = {}, {}
    variants = [(a, op) for a in args.adapters for op in args.ops]
    names = [a if len(args.ops) == 1 else f"{a}:{op}" for a, op in variants]
    for name, (adapter, op) in zip(names, variants):
        shape = {"shape": args.shape, "ctx_len": args.ctx_len, "r": args.r}
        cfg = Config(**shape, precision=precision, adapter=adapter, device="cpu", op=op)
        ts = TrainStep(cfg, dev, precision)
        batch = ts.batch(1)
        steps[name] = lambda ts=ts, batch=batch: ts.step(batch)
        flops[name] = flops_per_token(ts.model, args.ctx_len)["total"]
    probe = MatmulProbe(torch.bfloat16 if precision == "bf16" else torch.float32, dev)
    rates: list[float] = []  # FLOP/s per call; the call's own wall time covers two products, not one
    steps["matmul probe"] = lambda: rates.append(probe.rate())
    times = interleaved_times(steps, args.rounds, dev)
    times.pop("matmul probe")
    rates = rates[1:]  # the first call was the untimed warm-up
    base = names[0]
    rows = {}
    for name in names:
        ratio = paired_median_ratio(times, name, base)
        mfu = statistics.median(flops[name] * args.ctx_len / t / rate for t, rate in zip(times[name], rates))
        rows[name] = {
            "step_s_median": round(statistics.median(times[name]), 3),
            "tokens_per_s": round(args.ctx_len / statistics.median(times[name]), 1),
            "time_ratio_paired_median": round(ratio, 3),
            "flop_ratio": round(flops[name] / flops[base], 3),
            "gflop_per_token": round(flops[name] / 1e9, 4),
            "mfu_paired_median": round(mfu, 3),
        }
    out = {
        "shape": args.shape,
        "ctx_len": args.ctx_len,
        "precision": precision,
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "matmul_peak_gflops_median": round(statistics.median(rates) / 1e9, 1),
        "variants": rows,
    }
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
