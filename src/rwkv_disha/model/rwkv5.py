"""RWKV-5.2 ("x052", Eagle) in plain PyTorch, with the official parameter names (docs/MODEL.md).

The block structure, state, GroupNorm and WKV kernel are RWKV-6's (``rwkv6.py``); what differs:
token shift is a fixed per-channel interpolation ``x * time_mix + previous * (1 - time_mix)``, and the
decay is per channel but constant in time (``time_decay`` (H, N)), so the WKV-6 kernel gets the same
log-decay ``-exp(time_decay)`` at every step. The feed-forward has the same sigmoid receptance.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from rwkv_disha.model import rwkv6
from rwkv_disha.model.config import ModelConfig
from rwkv_disha.model.rwkv7 import token_shift
from rwkv_disha.model.tensor_init import small

Tensor = torch.Tensor


def mix(x: Tensor, prev: Tensor, amount: Tensor) -> Tensor:
    """RWKV-5's token shift: ``amount`` of this token, the rest from the previous one."""
    return x * amount + prev * (1 - amount)


class TimeMix(rwkv6.WKVHeads):
    """RWKV-5.2 attention ("att"); the WKV, GroupNorm, gate and output are RWKV-6's."""

    def __init__(self, cfg: ModelConfig, layer_id: int, op: str = "auto"):
        super().__init__()
        C, H, N = cfg.n_embd, cfg.n_head, cfg.head_size
        self.n_head, self.head_size, self.op = H, N, op
        for name in ("time_mix_k", "time_mix_v", "time_mix_r", "time_mix_g"):
            setattr(self, name, nn.Parameter(torch.zeros(1, 1, C)))
        self.time_decay = nn.Parameter(torch.zeros(H, N))
        self.time_faaaa = nn.Parameter(torch.zeros(H, N))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.gate = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=rwkv6.LN_X_EPS)
        self.time_state = None

    def forward(
        self, x: Tensor, last_x: Tensor | None = None, wkv: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """x (B, T, C) -> (out (B, T, C), final WKV state (B, H, N, N))."""
        B, T, C = x.shape
        prev = token_shift(x, last_x)
        r = self.receptance(mix(x, prev, self.time_mix_r))
        k = self.key(mix(x, prev, self.time_mix_k))
        v = self.value(mix(x, prev, self.time_mix_v))
        g = F.silu(self.gate(mix(x, prev, self.time_mix_g)))
        log_w = (-torch.exp(self.time_decay.float())).reshape(1, 1, C).expand(B, T, C)  # same every step
        return self.mix_heads(r, log_w, k, v, g, wkv)


class ChannelMix(nn.Module):
    """RWKV-5.2 feed-forward ("ffn"): fixed token shift, squared ReLU, sigmoid receptance.

    Not shared with RWKV-6's: the official names differ (time_mix_* / time_maa_*) and so does the lerp's
    direction (time_mix weighs this token, RWKV-6's time_maa the previous one: time_maa = 1 - time_mix)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C = cfg.n_embd
        self.time_mix_k = nn.Parameter(torch.zeros(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.zeros(1, 1, C))
        self.key = nn.Linear(C, cfg.dim_ffn, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(cfg.dim_ffn, C, bias=False)

    def forward(self, x: Tensor, last_x: Tensor | None = None) -> Tensor:
        prev = token_shift(x, last_x)
        k = torch.relu(self.key(mix(x, prev, self.time_mix_k))) ** 2
        return torch.sigmoid(self.receptance(mix(x, prev, self.time_mix_r))) * self.value(k)


class RWKV5(rwkv6.RWKV6):
    """The whole RWKV-5.2 language model: RWKV-6's skeleton with RWKV-5.2's attention and feed-forward."""

    time_mix = TimeMix
    channel_mix = ChannelMix


# --- the checkpoint layout ------------------------------------------------------------------------------
def infer_config(sd: dict[str, Tensor]) -> ModelConfig:
    """The RWKV-5.2 shape read from emb, time_faaaa (head size) and ffn.key."""
    return ModelConfig(
        version="x052",
        n_layer=rwkv6.n_layers(sd),
        n_embd=rwkv6.dim_of(sd, "emb.weight", 1),
        vocab_size=rwkv6.dim_of(sd, "emb.weight", 0),
        head_size=rwkv6.dim_of(sd, "blocks.0.att.time_faaaa", 1),
        dim_ffn=rwkv6.dim_of(sd, "blocks.0.ffn.key.weight", 0),
    )


def tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every key of an RWKV-5.2 checkpoint of shape ``cfg``, with its tensor shape (the official layout)."""
    mixv, heads = (1, 1, cfg.n_embd), (cfg.n_head, cfg.head_size)
    att = {f"time_mix_{n}": mixv for n in ("k", "v", "r", "g")}
    att.update({"time_decay": heads, "time_faaaa": heads})
    return rwkv6.common_shapes(cfg, att, {"time_mix_k": mixv, "time_mix_r": mixv})


# --- rwkv-disha init -----------------------------------------------------------------------------------
def default_config(n_layer: int, n_embd: int, vocab_size: int, head_size: int) -> ModelConfig:
    """The RWKV-5.2 shape for these sizes: FFN 3.5C, no low-rank maps."""
    return ModelConfig("x052", n_layer, n_embd, vocab_size, head_size, rwkv6.ffn_width(n_embd))


def init_tensors(cfg: ModelConfig, random: bool, g: torch.Generator) -> dict[str, Tensor]:
    """A fresh fp32 RWKV-5.2 state dict: the x052 training code's time_* recipe, or every tensor random."""
    C, H, N = cfg.n_embd, cfg.n_head, cfg.head_size
    sd = rwkv6.norms_and_embeddings(cfg, random, g)
    for i in range(cfg.n_layer):
        a, f = f"blocks.{i}.att.", f"blocks.{i}.ffn."
        ddd, r01, r1a0 = rwkv6.ramps(cfg, i)
        amounts = {"k": ddd.pow(r1a0), "v": ddd.pow(r1a0) + 0.3 * r01, "r": ddd.pow(0.5 * r1a0)}
        amounts["g"] = ddd.pow(0.5 * r1a0)
        for n, amount in amounts.items():
            sd[a + f"time_mix_{n}"] = amount.float() + small((1, 1, C), random, g)
        speed, bonus = rwkv6.decay_init(cfg, i)
        sd[a + "time_decay"] = speed.float().view(H, N) + small((H, N), random, g, 0.5)
        sd[a + "time_faaaa"] = bonus.float().view(H, N) + small((H, N), random, g, 0.5)
        sd[f + "time_mix_k"] = ddd.pow(r1a0).float() + small((1, 1, C), random, g)
        sd[f + "time_mix_r"] = ddd.pow(r1a0).float() + small((1, 1, C), random, g)
        sd.update(rwkv6.linear_weights(cfg, random, g, f"blocks.{i}."))
    return sd
