"""The shape of an RWKV model, always read from a checkpoint's keys and tensor shapes.

See docs/MODEL.md ("Checkpoint layout") for where each field comes from.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelConfig:
    """Shape of an RWKV model; :func:`rwkv_disha.model.load.infer_config` reads it from a checkpoint."""

    version: str  # "x070" (RWKV-7); "x060", "x052" once their files join rwkv_disha.model.registry
    n_layer: int
    n_embd: int  # C
    vocab_size: int  # V
    head_size: int = 64  # N; H = C / N heads
    dim_ffn: int = 0  # F, the FFN hidden width (4C in RWKV-7)
    d_decay: int = 0  # Dw: w1 (C, Dw)
    d_aaa: int = 0  # Da: a1 (C, Da)
    d_mv: int = 0  # Dv: v1 (C, Dv)
    d_gate: int = 0  # Dg: g1 (C, Dg)

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size

    def summary(self) -> str:
        return (
            f"{self.version} L{self.n_layer} C{self.n_embd} V{self.vocab_size} head_size {self.head_size} "
            f"ffn {self.dim_ffn} lowrank w{self.d_decay}/a{self.d_aaa}/v{self.d_mv}/g{self.d_gate}"
        )
