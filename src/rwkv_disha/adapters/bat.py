"""Bat: DiSHA's block-affine adapter that also transforms the base weight (RWKV-PEFT ``"mode":"bat"``).

    frozen  W      (out, in), cut into r x r blocks W[a, b]   (a over out/r, b over in/r)
    trains  disha  (in/r, r, r), one r x r matrix per INPUT block b     zero at start
    W'[a, b] = W[a, b] + W[a, b] @ disha[b] + disha[b]          ΔW = W' - W
    forward:  y = x @ W'^T

This is RWKV-PEFT's file layout (Hugging Face peft's MiSS "bat" indexes by output block: not compatible).
ΔW depends on W, so the forward builds W' (a batched product costing r / T of the layer's matmul) and the
backward needs the full (out, in) weight gradient of W' (as much as full fine-tuning), before reducing it to
the (in/r, r, r) gradient of disha. Needs in % r == 0 and out % r == 0 (docs/ADAPTERS.md, "Bat").
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from rwkv_disha.adapters.base import DISHA_FLAG, DISHA_KEYS, WholeBlocksLinear, common_block_side
from rwkv_disha.adapters.quant import dense_weight

Tensor = torch.Tensor


def bat_merged_weight(weight: Tensor, disha: Tensor) -> Tensor:
    """W' (out, in): W'[a, b] = W[a, b] @ (I + disha[b]) + disha[b], from W (out, in), disha (in/r, r, r).

    Computed as one batched product over the input blocks b, reading W through a strided view (no copy):
    W viewed (out, in/r, r) -> (in/r, out, r) @ (I + disha) (in/r, r, r), then + disha[b] on every output
    block, then back to (out, in).
    """
    n_in_blocks, r, _ = disha.shape
    out_f = weight.shape[0]
    eye = torch.eye(r, dtype=disha.dtype, device=disha.device)
    merged = torch.bmm(weight.view(out_f, n_in_blocks, r).transpose(0, 1), disha + eye)  # (b, out, r)
    merged = merged.view(n_in_blocks, out_f // r, r, r) + disha.unsqueeze(1)  # (b, a, r, r)
    return merged.view(n_in_blocks, out_f, r).transpose(0, 1).reshape(out_f, n_in_blocks * r)


class BatLinear(WholeBlocksLinear):
    """Frozen ``weight`` (out, in) + Bat ``disha`` (in/r, r, r); r divides both in and out."""

    kind, title, peft = "bat", "Bat", "disha"
    adapter_names = ("disha",)
    tensor_layout = "Bat tensors are (in/r, r, r)"
    cli_flag, cli_keys = DISHA_FLAG, {**DISHA_KEYS, "mode": ("mode", str, "bat")}
    cli_example = '{"mode":"bat","load":"","r":64}'

    def __init__(self, weight: Tensor, r: int):
        super().__init__(weight, r)
        self.disha = self._param_like(self.in_features // r, r, r)  # (in/r, r, r)

    @classmethod
    def shape_fix(cls, r: int, shapes: Mapping[str, tuple[int, int]]) -> str:
        # DiSHA has a mode without the block rule, so name it, and the nearest r that would fit
        g = common_block_side(shapes)
        best = max(d for d in range(1, max(1, min(g, r)) + 1) if g % d == 0)
        return f'choose r dividing {g}, e.g. r={best}, or use "mode":"bone"'

    def forward(self, x: Tensor) -> Tensor:
        w = dense_weight(self.weight)  # dense (dequantized) base, no grad
        if torch.is_autocast_enabled(x.device.type):
            w = w.to(torch.get_autocast_dtype(x.device.type))
        elif w.dtype != x.dtype:
            w = w.to(x.dtype)
        return F.linear(x, bat_merged_weight(w, self.disha.to(w.dtype)))

    @torch.no_grad()
    def merged_weight(self) -> Tensor:
        """W' (out, in) in fp32, from the same function as the forward."""
        return bat_merged_weight(dense_weight(self.weight, torch.float32), self.disha.detach().float())

    def train_flops_per_token(self, tokens_per_step: int) -> float:
        # W' = W + W_b @ disha_b + disha_b is built every step (2 r in out, as much again backward, shared by
        # the step's tokens), and W' needs its full (out, in) gradient
        size = self.in_features * self.out_features
        return 2.0 * size + 4.0 * self.r * size / tokens_per_step

    def delta_weight(self) -> Tensor:
        """ΔW = W' - W (fp32)."""
        return self.merged_weight() - dense_weight(self.weight, torch.float32)
