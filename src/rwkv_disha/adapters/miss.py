"""MiSS's "bat" and "mini" modes, in Hugging Face peft's layout (``--peft miss --peft_config``).

MiSS's default ("balance") mode is Bone itself (``bone.py``: ``miss_block`` (r, out) is Bone's ``disha``), so
it is not a kind of its own here. The other two:

    bat   frozen W (out, in), cut into r x r blocks W[a, b]   (a over out/r, b over in/r)
          trains miss_block (out/r, r, r), one r x r matrix per OUTPUT block a        zero at start
          W'[a, b] = W[a, b] + W[a, b] @ miss_block[a] + miss_block[a]        forward: y = x @ W'^T
          (RWKV-PEFT's Bat, ``bat.py``, indexes by the INPUT block b: the two files are not interchangeable)

    mini  trains miss_block (r, mini_r), zero at start; M = miss_block repeated along out -> (r, out)
          ΔW[o, i] = miss_block[i mod r, o mod mini_r]      forward: Bone's with M (never builds ΔW)

docs/ADAPTERS.md, "MiSS".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from rwkv_disha.adapters.base import FoldedInputLinear, WholeBlocksLinear, is_int_at_least
from rwkv_disha.adapters.bone import _BoneLinearFn, bone_delta
from rwkv_disha.adapters.quant import compute_dtype, dense_weight
from rwkv_disha.errors import RWKVDishaError

if TYPE_CHECKING:
    from rwkv_disha.adapters.config import AdapterConfig

Tensor = torch.Tensor

# the --peft_config keys of `--peft miss` (RWKV-PEFT hands them to peft's MissConfig); dialects.py reads them
MISS_FLAG = "--peft_config"
MISS_KEYS: dict[str, tuple[str, type, Any]] = {
    "r": ("r", int, 64),
    "mini_r": ("mini_r", int, 1),
}


def miss_bat_merged_weight(weight: Tensor, block: Tensor) -> Tensor:
    """W' (out, in): W'[a, b] = W[a, b] @ (I + block[a]) + block[a], from W (out, in), block (out/r, r, r).

    W viewed (out/r, r, in/r, r) -> blocks (a, b, r, r); one batched product per output block a.
    """
    n_out_blocks, r, _ = block.shape
    out_f, in_f = weight.shape
    blocks = weight.view(n_out_blocks, r, in_f // r, r).transpose(1, 2)  # (a, b, r, r)
    eye = torch.eye(r, dtype=block.dtype, device=block.device)
    merged = blocks @ (block + eye).unsqueeze(1) + block.unsqueeze(1)  # (a, b, r, r)
    return merged.transpose(1, 2).reshape(out_f, in_f)


def miss_mini_expand(block: Tensor, out_features: int) -> Tensor:
    """block (r, mini_r) -> M (r, out): block repeated out / mini_r times along out."""
    return block.repeat(1, out_features // block.shape[1])


class MissBatLinear(WholeBlocksLinear):
    """Frozen ``weight`` (out, in) + MiSS bat ``miss_block`` (out/r, r, r); r divides both in and out."""

    kind, title, peft = "miss_bat", "MiSS bat", "miss"
    adapter_names = ("miss_block",)
    tensor_layout = "MiSS bat tensors are (out/r, r, r)"
    cli_flag, cli_keys = MISS_FLAG, MISS_KEYS
    cli_example = '{"r":8,"init_weights":"bat"}'

    def __init__(self, weight: Tensor, r: int):
        super().__init__(weight, r)
        self.miss_block = self._param_like(self.out_features // r, r, r)  # (out/r, r, r)

    def forward(self, x: Tensor) -> Tensor:
        dtype = compute_dtype(x)
        w = miss_bat_merged_weight(dense_weight(self.weight, dtype), self.miss_block.to(dtype))
        return F.linear(x.to(dtype), w)

    @torch.no_grad()
    def merged_weight(self) -> Tensor:
        """W' (out, in) in fp32, from the same function as the forward."""
        return miss_bat_merged_weight(dense_weight(self.weight, torch.float32), self.miss_block.float())

    def delta_weight(self) -> Tensor:
        return self.merged_weight() - dense_weight(self.weight, torch.float32)


class MissMiniLinear(FoldedInputLinear):
    """Frozen ``weight`` (out, in) + MiSS mini ``miss_block`` (r, mini_r); r <= in, mini_r divides out."""

    kind, title, peft = "miss_mini", "MiSS mini", "miss"
    adapter_names = ("miss_block",)
    tensor_layout = "MiSS mini tensors are (r, mini_r)"
    cli_flag, cli_keys = MISS_FLAG, MISS_KEYS
    cli_example = '{"r":8,"init_weights":"mini","mini_r":8}'

    def __init__(self, weight: Tensor, r: int, mini_r: int):
        super().__init__(weight, r)
        if mini_r <= 0 or self.out_features % mini_r:  # M tiles whole copies of the block along out
            raise RWKVDishaError(
                f"MiSS mini_r={mini_r} must divide the output width {self.out_features}: choose mini_r "
                f"dividing {self.out_features} in {self.cli_flag}"
            )
        self.mini_r = mini_r
        self.miss_block = self._param_like(r, mini_r)  # (r, mini_r)

    @classmethod
    def check_config(cls, cfg: AdapterConfig) -> None:
        if not is_int_at_least(cfg.mini_r, 1):
            raise RWKVDishaError(f"{cls.cli_flag} mini_r must be a positive integer, got {cfg.mini_r!r}")

    @classmethod
    def check_file_settings(cls, file_cfg: AdapterConfig, cfg: AdapterConfig, source: str) -> None:
        if file_cfg.mini_r != cfg.mini_r:
            raise RWKVDishaError(
                f"{source} was trained with mini_r {file_cfg.mini_r}, the config says {cfg.mini_r}: "
                f"set mini_r to {file_cfg.mini_r}"
            )

    @classmethod
    def describe(cls, cfg: AdapterConfig) -> str:
        return f"{cls.title} r={cfg.r} mini_r={cfg.mini_r}"

    @classmethod
    def from_config(cls, weight: Tensor, cfg: AdapterConfig) -> MissMiniLinear:
        return cls(weight, cfg.r, cfg.mini_r)

    def forward(self, x: Tensor) -> Tensor:
        # Bone's fused node with M = the repeated block; autograd sums M's gradient back into the block
        return _BoneLinearFn.apply(
            x, miss_mini_expand(self.miss_block, self.out_features), self.weight, self.r
        )

    def delta_weight(self) -> Tensor:
        m = miss_mini_expand(self.miss_block.detach().float(), self.out_features)  # (r, out)
        return bone_delta(m, self.in_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mini_r={self.mini_r}"
