"""The language-model skeleton every RWKV version shares: emb -> blocks -> ln_out -> head.

A version (``rwkv7.py``, ``rwkv6.py``, ``rwkv5.py``) subclasses :class:`RWKVLM` and says how to build
block ``i`` (:meth:`RWKVLM.make_block`). Every block is called as ``block(x, carry, state) -> (x, carry,
state)``: ``carry`` is what one block hands the next besides x, RWKV-7's ``v_first`` (B, T, C) (block 0's
value, which later blocks mix towards), and None for RWKV-6 / 5.2, whose blocks pass it through.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from rwkv_disha.model.config import ModelConfig

Tensor = torch.Tensor


class KernelChoice:
    """The ``op`` of an attention module. Its WKV kernel (``self._wkv``) is looked up (checked, and a
    compiled one built) when ``op`` is set, not on every forward, where ``--compile 1`` would trace the
    registry. The kernel is left out of pickles and looked up again on load, where it is checked (and
    built) on the loading machine. ``lookup``: ``kernels.get_wkv7`` or ``get_wkv6``."""

    lookup: Callable[[str], Callable]

    @property
    def op(self) -> str:
        return self._op

    @op.setter
    def op(self, op: str) -> None:
        self._op, self._wkv = op, type(self).lookup(op)

    def __getstate__(self):
        state = dict(super().__getstate__())
        state.pop("_wkv", None)
        return state

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self._wkv = type(self).lookup(self._op)


class LayerState(NamedTuple):
    """Recurrent state of one block: last ln1 output (B, C), WKV state (B, H, N, N) fp32, last ln2 output."""

    att_x: Tensor
    wkv: Tensor
    ffn_x: Tensor


class Block(nn.Module):
    """One residual block: (ln0 in block 0) -> x + att(ln1(x)) -> x + ffn(ln2(x)), with the version's
    attention and feed-forward classes. ``carries``: the attention takes and returns the carry (RWKV-7's
    v_first: ``att(x, carry, last_x, wkv) -> (out, carry, wkv)``); otherwise ``att(x, last_x, wkv) ->
    (out, wkv)`` and the carry passes through."""

    def __init__(
        self, cfg: ModelConfig, layer_id: int, op: str, time_mix: type, channel_mix: type, carries: bool
    ):
        super().__init__()
        self.layer_id, self.carries = layer_id, carries
        # forward reads this bool, never layer_id: torch.compile treats int module attributes as constants,
        # so a layer_id test made one graph per block (and eager after the 8th); a bool makes two
        self.first = layer_id == 0
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(cfg.n_embd)
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.att = time_mix(cfg, layer_id, op)
        self.ffn = channel_mix(cfg)

    def forward(self, x: Tensor, carry: Tensor | None, state: LayerState | None = None):
        """x (B, T, C) -> (x (B, T, C), carry, LayerState)."""
        if self.first:
            x = self.ln0(x)
        xa = self.ln1(x)
        last_x, wkv = (None, None) if state is None else (state.att_x, state.wkv)
        if self.carries:
            att, carry, wkv = self.att(xa, carry, last_x, wkv)
        else:
            att, wkv = self.att(xa, last_x, wkv)
        x = x + att
        xf = self.ln2(x)
        x = x + self.ffn(xf, None if state is None else state.ffn_x)
        # copies, not views: a view of the last token would keep all T tokens of xa / xf alive (under
        # grad_cp, two (B, T, C) tensors per block until the forward pass ends)
        return x, carry, LayerState(xa[:, -1].clone(), wkv, xf[:, -1].clone())


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
