"""Bone: DiSHA's block-affine adapter with one shared (r, out) matrix (RWKV-PEFT ``"mode":"bone"``).

    frozen  W      (out, in)
    trains  disha  (r, out)         zero at start: the layer equals the base
    ΔW[o, i] = disha[i mod r, o]    (each r-wide block of input columns gets the same ΔW block)

    forward:  y = x @ W^T + (sum over g of x[g*r:(g+1)*r]) @ disha      (x zero-padded if in % r != 0)

The forward folds the input into r columns before the small matmul, so it costs about r/in of the base
layer and never builds the (out, in) ΔW. ``delta_weight()`` builds ΔW for merging only; the tests check the
forward and its gradients against x @ (W + delta_weight())^T (docs/ADAPTERS.md, "Bone").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rwkv_disha.adapters.base import DISHA_FLAG, DISHA_KEYS, FoldedInputLinear
from rwkv_disha.adapters.quant import compute_dtype, dense_weight

Tensor = torch.Tensor


def bone_fold_input(x: Tensor, r: int) -> Tensor:
    """x (..., in) -> (..., r): the sum of x's r-wide column blocks, zero-padding the last one."""
    pad = -x.shape[-1] % r
    if pad:
        x = F.pad(x, (0, pad))
    return x.unflatten(-1, (-1, r)).sum(-2)


def bone_delta(disha: Tensor, in_features: int) -> Tensor:
    """ΔW (out, in) with ΔW[o, i] = disha[i mod r, o], from disha (r, out)."""
    r = disha.shape[0]
    n_blocks = -(-in_features // r)
    return disha.t().repeat(1, n_blocks)[:, :in_features]


def _add_tiled_(grad_x: Tensor, h: Tensor, r: int) -> None:
    """grad_x (N, in) += h (N, r) repeated along ``in`` (the transpose of folding), in place."""
    n, in_features = grad_x.shape
    full = in_features - in_features % r
    if full:
        grad_x[:, :full].unflatten(1, (full // r, r)).add_(h.unsqueeze(1))
    if full < in_features:
        grad_x[:, full:].add_(h[:, : in_features - full])


class _BoneLinearFn(torch.autograd.Function):
    """y = x @ W^T + fold(x) @ disha with a frozen W (dense or quantized), as one autograd node.

    Saves only fold(x) (N, r). The base product accumulates into the adapter term in place, and backward
    writes the input gradient once (g @ W, then += tile(g @ disha^T) in place): on CPU, where each large
    temporary is a fresh allocation, this keeps Bone's cost close to its FLOPs.
    """

    @staticmethod
    def forward(ctx, x: Tensor, disha: Tensor, weight, r: int) -> Tensor:
        dtype = compute_dtype(x)
        xc = x.to(dtype)
        folded = bone_fold_input(xc, r).reshape(-1, r)  # (N, r)
        d = disha.to(dtype)  # (r, out)
        w = dense_weight(weight, dtype)  # (out, in)
        x2d = xc.reshape(-1, w.shape[1])  # (N, in)
        # the second product accumulates into the first's output in place (seen by FLOP counters). fp32:
        # the thin Bone product first, so that the wide (N, out) y is read by the compute-bound base product
        # rather than the thin one (0.86 ms less of 16.7 for a 3072 x 768 layer at N 512); bf16 BLAS does
        # better the other way round (0.18 ms); benchmarks/profile_bone_layer.py
        first, second = ((folded, d), (x2d, w.t())) if dtype == torch.float32 else ((x2d, w.t()), (folded, d))
        y2d = first[0] @ first[1]  # (N, out)
        torch.addmm(y2d, *second, out=y2d)
        y = y2d.view(*x.shape[:-1], w.shape[0])
        ctx.save_for_backward(folded, d)
        ctx.weight, ctx.r, ctx.dtype = weight, r, dtype
        ctx.x_dtype, ctx.disha_dtype, ctx.in_features = x.dtype, disha.dtype, x.shape[-1]
        return y

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        folded, d = ctx.saved_tensors
        g = grad_out.to(ctx.dtype).reshape(-1, grad_out.shape[-1])  # (N, out)
        grad_x = grad_disha = h = None
        # the three products run back to back, before the tiled add: on CPU each switch from an ATen
        # parallel op to a BLAS call costs ~0.15-0.3 ms of thread hand-over (measured), once per layer here
        if ctx.needs_input_grad[0]:
            grad_x = g @ dense_weight(ctx.weight, ctx.dtype)  # (N, in)
            h = g @ d.t()  # (N, r)
        if ctx.needs_input_grad[1]:
            # (g^T @ fold(x))^T, not fold(x)^T @ g: the same (r, out) values, but the product that writes the
            # tall (out, r) result runs 1.3-1.7x faster on CPU BLAS (benchmarks/profile_bone_layer.py)
            grad_disha = (g.t() @ folded).t().to(ctx.disha_dtype)  # (r, out)
        if grad_x is not None:
            _add_tiled_(grad_x, h, ctx.r)
            grad_x = grad_x.view(*grad_out.shape[:-1], ctx.in_features).to(ctx.x_dtype)
        return grad_x, grad_disha, None, None


class BoneLinear(FoldedInputLinear):
    """Frozen ``weight`` (out, in) + Bone ``disha`` (r, out); r <= in, any in / out."""

    kind, title, peft = "bone", "Bone", "disha"
    adapter_names = ("disha",)
    tensor_layout = "Bone tensors are (r, out)"
    cli_flag, cli_keys = DISHA_FLAG, {**DISHA_KEYS, "mode": ("mode", str, "bone")}
    cli_example = '{"mode":"bone","load":"","r":64}'

    def __init__(self, weight: Tensor, r: int):
        super().__init__(weight, r)
        self.disha = self._param_like(r, self.out_features)  # (r, out)

    def forward(self, x: Tensor) -> Tensor:
        return _BoneLinearFn.apply(x, self.disha, self.weight, self.r)

    def train_flops_per_token(self, tokens_per_step: int) -> float:
        return super().train_flops_per_token(tokens_per_step) + self.in_features  # + the fold of x

    def delta_weight(self) -> Tensor:
        return bone_delta(self.disha.detach().float(), self.in_features)
