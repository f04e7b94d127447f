"""WKV-6 kernel benchmark (issue 11): the chunked torch kernel vs the per-step loop, forward + backward.

.venv/bin/python benchmarks/bench_wkv6.py                    # B=1 T=512 H=12 N=64 fp32, CPU
.venv/bin/python benchmarks/bench_wkv6.py --strong 0.1       # 10% of channels with decays near 0
.venv/bin/python benchmarks/bench_wkv6.py --device cuda --ops fla,torch,loop

Inputs are random with RWKV-6's usual decay range: log-decay = -exp(d), d uniform in [-6, 1] (per-step
decays from 0.998 down to 0.07); ``--strong F`` gives a fraction F of the channels d in [2, 4] (per-step
decays of 6e-4 .. 1e-24, as trained models have in a few channels), which the chunked kernel routes
through its exact two-level form. Prints a Markdown table; the first op is compared with the others.
"""

from __future__ import annotations

import argparse
import time

import torch

from rwkv_disha.kernels import get_wkv6


def inputs(
    B: int, T: int, H: int, N: int, device: str, strong: float = 0.0, seed: int = 0
) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g) for _ in range(3))
    d = torch.rand(B, T, H, N, generator=g) * 7 - 6
    fast = torch.rand(H, N, generator=g) < strong
    log_w = -torch.exp(torch.where(fast, 2 + 2 * torch.rand(B, T, H, N, generator=g), d))
    u = torch.randn(H, N, generator=g)
    return [t.to(device).requires_grad_() for t in (r, log_w, k, v, u)]


def time_op(op: str, xs: list[torch.Tensor], repeat: int) -> float:
    """Best forward + backward time in ms, after one warm-up."""
    fn = get_wkv6(op)
    best = float("inf")
    for i in range(repeat + 1):
        for x in xs:
            x.grad = None
        if xs[0].is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        y, s = fn(*xs)
        (y.square().mean() + s.square().mean()).backward()
        if xs[0].is_cuda:
            torch.cuda.synchronize()
        if i:  # the first run warms up
            best = min(best, (time.perf_counter() - start) * 1e3)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--T", type=int, default=512)
    p.add_argument("--H", type=int, default=12)
    p.add_argument("--N", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--ops", default="torch,loop", help="comma-separated kernels; the first is compared")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--strong", type=float, default=0.0, help="fraction of channels with decays near 0")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    xs = inputs(a.B, a.T, a.H, a.N, a.device, a.strong)
    ops = a.ops.split(",")
    times = {op: time_op(op, xs, a.repeat) for op in ops}
    print(f"WKV-6 fwd+bwd, B={a.B} T={a.T} H={a.H} N={a.N} fp32, strong {a.strong}, {a.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, best of {a.repeat}")  # fmt: skip
    print(f"\n| op | fwd+bwd ms | op / {ops[0]} |\n|---|---:|---:|")
    for op, ms in times.items():
        print(f"| `{op}` | {ms:.1f} | {ms / times[ops[0]]:.1f}x |")


if __name__ == "__main__":
    main()
