"""The shape of an RWKV model, always read from a checkpoint's keys and tensor shapes.

See docs/MODEL.md ("Checkpoint layout") for where each field comes from.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelConfig:
    """Shape of an RWKV model; :func:`rwkv_disha.model.load.infer_config` reads it from a checkpoint."""

    version: str  # "x070" (RWKV-7), "x060" (RWKV-6), "x052" (RWKV-5.2): rwkv_disha.model.registry
    n_layer: int
    n_embd: int  # C
    vocab_size: int  # V
    head_size: int = 64  # N; H = C / N heads
    dim_ffn: int = 0  # F, the FFN hidden width (4C in RWKV-7, 3.5C in RWKV-6 / 5.2)
    d_decay: int = 0  # Dw: RWKV-7 w1 (C, Dw); RWKV-6 time_decay_w1 (C, Dw)
    d_aaa: int = 0  # Da: a1 (C, Da)                              RWKV-7 only
    d_mv: int = 0  # Dv: v1 (C, Dv)                               RWKV-7 only
    d_gate: int = 0  # Dg: g1 (C, Dg)                             RWKV-7 only
    d_mix: int = 0  # Dm: time_maa_w1 (C, 5 Dm), time_maa_w2 (5, Dm, C)   RWKV-6 only

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size

    def summary(self) -> str:
        widths = {"w": self.d_decay, "a": self.d_aaa, "v": self.d_mv, "g": self.d_gate, "maa": self.d_mix}
        lowrank = "/".join(f"{name}{d}" for name, d in widths.items() if d)
        return (
            f"{self.version} L{self.n_layer} C{self.n_embd} V{self.vocab_size} head_size {self.head_size} "
            f"ffn {self.dim_ffn}" + (f" lowrank {lowrank}" if lowrank else "")
        )
