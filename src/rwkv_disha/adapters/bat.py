"""Bat: DiSHA's block-affine adapter that also transforms the base weight (RWKV-PEFT ``"mode":"bat"``).

    frozen  W      (out, in), cut into r x r blocks W[a, b]   (a over out/r, b over in/r)
    trains  disha  (in/r, r, r), one r x r matrix per INPUT block b     zero at start
    W'[a, b] = W[a, b] + W[a, b] @ disha[b] + disha[b]          ΔW = W' - W
    forward:  y = x @ W'^T

This is RWKV-PEFT's file layout (Hugging Face peft's MiSS "bat" indexes by output block: not compatible).
ΔW depends on W, so the forward builds W' (a batched product costing r / T of the layer's matmul) and the
backward needs the full (out, in) weight gradient of W' (as much as full fine-tuning), before reducing it to
the (in/r, r, r) gradient of disha. Needs in % r == 0 and out % r == 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rwkv_disha.adapters.base import AdapterLinear

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


class BatLinear(AdapterLinear):
    """Frozen ``weight`` (out, in) + Bat ``disha`` (in/r, r, r); r divides both in and out."""

    adapter_names = ("disha",)

    def __init__(self, weight: Tensor, r: int):
        super().__init__(weight)
        if r <= 0 or self.in_features % r or self.out_features % r:
            raise ValueError(
                f"Bat needs r > 0 dividing in_features ({self.in_features}) and out_features "
                f"({self.out_features}), got r={r}"
            )
        self.r = r
        self.disha = self._param_like(self.in_features // r, r, r)  # (in/r, r, r)

    def reset_adapter(self) -> None:
        with torch.no_grad():
            self.disha.zero_()

    def forward(self, x: Tensor) -> Tensor:
        w = self.base_weight()  # dense (dequantized) base, no grad
        if torch.is_autocast_enabled(x.device.type):
            w = w.to(torch.get_autocast_dtype(x.device.type))
        elif w.dtype != x.dtype:
            w = w.to(x.dtype)
        return F.linear(x, bat_merged_weight(w, self.disha.to(w.dtype)))

    @torch.no_grad()
    def merge(self) -> Tensor:
        return bat_merged_weight(self.base_weight(torch.float32), self.disha.detach().float())

    def delta_weight(self) -> Tensor:
        """ΔW = W' - W (fp32); ``merge()`` returns W' itself, from the same formula as the forward."""
        return self.merge() - self.base_weight(torch.float32)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}"
