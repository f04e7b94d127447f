"""LoRA: the low-rank baseline every DiSHA comparison needs (RWKV-PEFT ``--peft lora`` names).

    frozen  W       (out, in)
    trains  lora_A  (r, in)    Kaiming-uniform at start
            lora_B  (out, r)   zero at start: the layer equals the base
    ΔW = (alpha / r) * lora_B @ lora_A
    forward:  y = x @ W^T + (alpha / r) * (dropout(x) @ lora_A^T) @ lora_B^T

At rank r LoRA trains r * (in + out) parameters; Bone / Bat at rank r train r * out / r * in, so on square
layers LoRA r matches DiSHA 2r (docs/ADAPTERS.md, "LoRA").
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from rwkv_disha.adapters.base import AdapterLinear
from rwkv_disha.errors import RWKVDishaError

if TYPE_CHECKING:
    from rwkv_disha.adapters.config import AdapterConfig

Tensor = torch.Tensor


def lora_delta(lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
    """ΔW (out, in) = scale * lora_B (out, r) @ lora_A (r, in)."""
    return (lora_B @ lora_A) * scale


class LoRALinear(AdapterLinear):
    """Frozen ``weight`` (out, in) + ``lora_A`` (r, in), ``lora_B`` (out, r), scale alpha / r."""

    kind, title, peft = "lora", "LoRA", "lora"
    adapter_names = ("lora_A", "lora_B")
    tensor_layout = "LoRA tensors are lora_A (r, in) and lora_B (out, r)"
    cli_flag = "--lora_config"
    cli_keys = {
        "lora_load": ("load", str, ""),
        "lora_r": ("r", int, 8),
        "lora_alpha": ("lora_alpha", float, 32.0),
        "lora_dropout": ("lora_dropout", float, 0.01),
    }
    cli_example = '{"lora_load":"","lora_r":8,"lora_alpha":32,"lora_dropout":0.01}'

    def __init__(self, weight: Tensor, r: int, alpha: float, dropout: float = 0.0):
        super().__init__(weight, r)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.alpha = float(alpha)
        self.scale = self.alpha / r
        self.lora_A = self._param_like(r, self.in_features)  # (r, in)
        self.lora_B = self._param_like(self.out_features, r)  # (out, r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_adapter()

    @classmethod
    def shape_problem(cls, r: int, out_f: int, in_f: int, name: str) -> str | None:
        if r > min(in_f, out_f):  # beyond the smaller side the product B @ A gains no rank
            return f"exceeds the smaller side {min(in_f, out_f)} of {name} ({out_f}x{in_f})"
        return super().shape_problem(r, out_f, in_f, name)

    @classmethod
    def shape_fix(cls, r: int, shapes: Mapping[str, tuple[int, int]]) -> str:
        return "choose a smaller lora_r"

    @classmethod
    def rank_from_tensors(cls, tensors: Mapping[str, Tensor]) -> int | None:
        a, b = tensors.get("lora_A"), tensors.get("lora_B")
        if a is None or b is None or a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            return None
        return int(a.shape[0])

    @classmethod
    def settings_without_sidecar(cls, lora_alpha: float | None, source: str) -> dict[str, Any]:
        if lora_alpha is None:
            raise RWKVDishaError(
                f"{source} is a LoRA checkpoint without its .json sidecar, so lora_alpha is unknown: pass "
                f"--lora_alpha (the value used in training, RWKV-PEFT's default is 32)"
            )
        return {"lora_alpha": float(lora_alpha), "lora_dropout": 0.0}

    @classmethod
    def check_config(cls, cfg: AdapterConfig) -> None:
        alpha, dropout = cfg.lora_alpha, cfg.lora_dropout
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
            raise RWKVDishaError(f"{cls.cli_flag} lora_alpha must be > 0, got {alpha!r}")
        if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
            raise RWKVDishaError(f"{cls.cli_flag} lora_dropout must be in [0, 1), got {dropout!r}")

    @classmethod
    def check_file_settings(cls, file_cfg: AdapterConfig, cfg: AdapterConfig, source: str) -> None:
        if file_cfg.lora_alpha != cfg.lora_alpha:  # the same tensors with another scale alpha / r
            raise RWKVDishaError(
                f"{source} was trained with lora_alpha {file_cfg.lora_alpha:g}, the config says "
                f"{cfg.lora_alpha:g}: set lora_alpha to {file_cfg.lora_alpha:g}"
            )

    @classmethod
    def describe(cls, cfg: AdapterConfig) -> str:
        return f"{cls.title} r={cfg.r} alpha={cfg.lora_alpha:g}"

    @classmethod
    def from_config(cls, weight: Tensor, cfg: AdapterConfig) -> LoRALinear:
        return cls(weight, cfg.r, cfg.lora_alpha, cfg.lora_dropout)

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
        return f"{super().extra_repr()}, alpha={self.alpha:g}"
