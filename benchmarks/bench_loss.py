"""The LM head + cross-entropy alone: plain (full logits + masked_lm_loss) vs chunked (train/loss.py).

    .venv/bin/python benchmarks/bench_loss.py                  # T=512, C=768, V=65536, fp32, CPU

Forward + backward of the head matmul and the loss (head frozen, as under an adapter), interleaved rounds
(order alternating), paired median ratio; peak bytes each allocates above its inputs, from the profiler's
allocation records.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

from rwkv_disha.data.dataset import masked_lm_loss
from rwkv_disha.measure import interleaved_times, paired_median_ratio, step_peak_bytes
from rwkv_disha.train.loss import head_cross_entropy


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, default=512)
    ap.add_argument("--C", type=int, default=768)
    ap.add_argument("--V", type=int, default=65536)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument(
        "--rows", type=int, nargs="*", default=[], help="chunk sizes to try (default: the loss's own)"
    )
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, args.T, args.C, generator=g).requires_grad_()
    w = torch.randn(args.V, args.C, generator=g) / args.C**0.5
    labels = torch.randint(0, args.V, (1, args.T), generator=g)
    mask = torch.ones(1, args.T)

    def plain():
        x.grad = None
        masked_lm_loss(x @ w.t(), labels, mask).backward()

    def chunked(rows=None):
        x.grad = None
        head_cross_entropy(x, w, labels, mask, rows=rows).backward()

    fns = {"plain": plain, "chunked": chunked}
    fns.update({f"chunked rows={r}": (lambda r=r: chunked(r)) for r in args.rows})
    times = interleaved_times(fns, args.rounds, "cpu")
    out = {
        "shape": dict(T=args.T, C=args.C, V=args.V),
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "ms_median": {k: round(statistics.median(v) * 1e3, 1) for k, v in times.items()},
        "time_over_plain_paired_median": {k: round(paired_median_ratio(times, k, "plain"), 3) for k in times},
        "step_peak_mib": {k: round(step_peak_bytes(f) / 2**20, 1) for k, f in fns.items()},
    }
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
