"""LoRA: the low-rank baseline every DiSHA comparison needs (RWKV-PEFT ``--peft lora`` names).

    frozen  W       (out, in)
    trains  lora_A  (r, in)    Kaiming-uniform at start
            lora_B  (out, r)   zero at start: the layer equals the base
    ΔW = (alpha / r) * lora_B @ lora_A
    forward:  y = x @ W^T + (alpha / r) * (dropout(x) @ lora_A^T) @ lora_B^T

At rank r LoRA trains r * (in + out) parameters; Bone / Bat at rank r train r * out / r * in, so on square
layers LoRA r matches DiSHA 2r.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from rwkv_disha.adapters.base import AdapterLinear

Tensor = torch.Tensor


def lora_delta(lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
    """ΔW (out, in) = scale * lora_B (out, r) @ lora_A (r, in)."""
    return (lora_B @ lora_A) * scale


class LoRALinear(AdapterLinear):
    """Frozen ``weight`` (out, in) + ``lora_A`` (r, in), ``lora_B`` (out, r), scale alpha / r."""

    adapter_names = ("lora_A", "lora_B")

    def __init__(self, weight: Tensor, r: int, alpha: float, dropout: float = 0.0):
        super().__init__(weight)
        if r <= 0:
            raise ValueError(f"LoRA needs r > 0, got r={r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.r, self.alpha = r, float(alpha)
        self.scale = self.alpha / r
        self.lora_A = self._param_like(r, self.in_features)  # (r, in)
        self.lora_B = self._param_like(self.out_features, r)  # (out, r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_adapter()

    def reset_adapter(self) -> None:
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            self.lora_B.zero_()

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_forward(x)  # (..., out)
        h = F.linear(self.dropout(x), self.lora_A.to(y.dtype))  # (..., r)
        # y + scale * h @ lora_B^T as one GEMM with accumulation
        out = torch.addmm(
            y.reshape(-1, self.out_features),
            h.reshape(-1, self.r),
            self.lora_B.to(y.dtype).t(),
            alpha=self.scale,
        )
        return out.view(y.shape)

    def delta_weight(self) -> Tensor:
        return lora_delta(self.lora_A.detach().float(), self.lora_B.detach().float(), self.scale)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha:g}"
