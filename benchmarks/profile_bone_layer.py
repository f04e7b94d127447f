"""Where one Bone layer's time goes against the frozen layer (issue 10: why Bone / frozen > FLOP ratio).

    .venv/bin/python benchmarks/profile_bone_layer.py            # 768x768, 3072x768, 768x3072; N=512, r=64
    .venv/bin/python benchmarks/profile_bone_layer.py bf16       # the same in bf16 (frozen W and x in bf16)

For each shape: forward and forward + backward of the frozen nn.Linear and of BoneLinear (median of 40
calls, interleaved), then the backward's pieces on their own (g @ W, g @ disha^T, the tiled add,
fold(x)^T @ g) and the alternative of building W + ΔW for the input gradient.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from rwkv_disha.adapters.bone import BoneLinear, _add_tiled_, bone_fold_input
from rwkv_disha.model.init import DTYPES


def median_ms(fn, n: int = 40) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    torch.manual_seed(0)
    dtype = DTYPES[sys.argv[1] if len(sys.argv) > 1 else "fp32"]
    for out_f, in_f in ((768, 768), (3072, 768), (768, 3072)):
        profile_shape(out_f, in_f, N=512, r=64, dtype=dtype)


def profile_shape(out_f: int, in_f: int, N: int, r: int, dtype: torch.dtype = torch.float32) -> None:
    """Print the timings of one (out_f, in_f) layer on N tokens at Bone rank r; the frozen weight, x
    and the gradient in ``dtype``, disha in fp32 as `train` keeps it (cast per call, as autocast does)."""
    W = (torch.randn(out_f, in_f) / in_f**0.5).to(dtype)
    x = torch.randn(1, N, in_f, dtype=dtype, requires_grad=True)
    g = torch.randn(1, N, out_f, dtype=dtype)
    lin = torch.nn.Linear(in_f, out_f, bias=False, dtype=dtype)
    lin.weight.data, lin.weight.requires_grad = W.clone(), False
    bone = BoneLinear(W.clone(), r)
    with torch.no_grad():
        bone.disha.normal_()
    d, g2 = bone.disha.detach().to(dtype), g.view(N, out_f)
    folded = bone_fold_input(x.detach(), r).reshape(N, r)
    gx = g2 @ W
    h = g2 @ d.t()

    def w_eff():
        w = W.clone()
        w.view(out_f, in_f // r, r).add_(d.t().unsqueeze(1))
        return g2 @ w

    t = {
        "frozen fwd": median_ms(lambda: lin(x)),
        "bone fwd": median_ms(lambda: bone(x)),
        "frozen fwd+bwd": median_ms(lambda: lin(x).backward(g)),
        "bone fwd+bwd": median_ms(lambda: bone(x).backward(g)),
        "bwd g@W": median_ms(lambda: g2 @ W),
        "bwd g@disha^T": median_ms(lambda: g2 @ d.t()),
        "bwd tiled add": median_ms(lambda: _add_tiled_(gx, h, r)),
        "bwd fold(x)^T@g": median_ms(lambda: folded.t() @ g2),
        "alt g@(W+dW) incl. build": median_ms(w_eff),
    }
    flop_ratio = 1 + 1.5 * r / in_f  # fwd + input grad: 4 N out in; Bone adds 6 N r out
    print(f"{out_f}x{in_f}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in t.items()))
    print(f"   fwd+bwd ratio {t['bone fwd+bwd'] / t['frozen fwd+bwd']:.3f} (FLOP ratio {flop_ratio:.3f})")


if __name__ == "__main__":
    main()
