"""The language-model skeleton every RWKV version shares: emb -> blocks -> ln_out -> head.

A version (``rwkv7.py``, ``rwkv6.py``, ``rwkv5.py``) subclasses :class:`RWKVLM` and says how to build
block ``i`` (:meth:`RWKVLM.make_block`). Every block is called as ``block(x, carry, state) -> (x, carry,
state)``: ``carry`` is what one block hands the next besides x, RWKV-7's ``v_first`` (B, T, C) (block 0's
value, which later blocks mix towards), and None for RWKV-6 / 5.2, whose blocks pass it through.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from rwkv_disha.model.config import ModelConfig

Tensor = torch.Tensor


class LayerState(NamedTuple):
    """Recurrent state of one block: last ln1 output (B, C), WKV state (B, H, N, N) fp32, last ln2 output."""

    att_x: Tensor
    wkv: Tensor
    ffn_x: Tensor


class RWKVLM(nn.Module):
    """The whole language model. ``op`` picks the WKV kernel (see :mod:`rwkv_disha.kernels`).

    ``model(idx)`` returns logits (B, T, V); ``model(idx, state=s, return_state=True)`` also carries the
    recurrent state, one :class:`LayerState` per block, so a sequence can be fed in pieces."""

    def __init__(self, cfg: ModelConfig, op: str = "auto"):
        super().__init__()
        self.config = cfg
        self.grad_cp = False  # block-level activation checkpointing while training
        # this order is the state dict's key order, and the order nn.Linear's random init draws the RNG in
        self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(self.make_block(cfg, i, op) for i in range(cfg.n_layer))
        self.ln_out = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    def make_block(self, cfg: ModelConfig, layer_id: int, op: str) -> nn.Module:
        """Block ``layer_id``: ``block(x (B, T, C), carry, LayerState | None) -> (x, carry, LayerState)``."""
        raise NotImplementedError

    def set_op(self, op: str) -> None:
        for block in self.blocks:
            block.att.op = op

    def forward(
        self, idx: Tensor, state: list[LayerState] | None = None, return_state: bool = False
    ) -> Tensor | tuple[Tensor, list[LayerState]]:
        """idx (B, T) -> logits (B, T, V) [, new state]."""
        x, new_state = self.hidden(idx, state)
        logits = self.head(x)
        return (logits, new_state) if return_state else logits

    def hidden(self, idx: Tensor, state: list[LayerState] | None = None) -> tuple[Tensor, list[LayerState]]:
        """idx (B, T) -> (ln_out(x) (B, T, C), the head's input; new state). The training loss applies
        the head itself, a chunk at a time (rwkv_disha.train.loss)."""
        x = self.emb(idx)
        carry = None
        new_state: list[LayerState] = []
        for i, block in enumerate(self.blocks):
            layer_state = None if state is None else state[i]
            if self.grad_cp and self.training and torch.is_grad_enabled():
                x, carry, s = checkpoint(block, x, carry, layer_state, use_reentrant=False)
            else:
                x, carry, s = block(x, carry, layer_state)
            new_state.append(s)
        return self.ln_out(x), new_state
