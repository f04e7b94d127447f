"""RWKV-6 ("x060", Finch) in plain PyTorch, with the official parameter names (docs/MODEL.md).

    x = emb(idx); x = ln0(x)                                   (block 0)
    per block:  x = x + att(ln1(x));  x = x + ffn(ln2(x))
    logits = head(ln_out(x))

att: data-dependent token shift (``time_maa_*``, low-rank ``time_maa_w1/w2``), data-dependent per-channel
decay (``time_decay`` + low-rank ``time_decay_w1/w2``), bonus ``time_faaaa``, a SiLU gate, GroupNorm over
heads. ffn: token shift, squared ReLU, a sigmoid receptance. The math follows the ``rwkv`` package's CPU
path (RWKV Runner's engine), which is what the tests compare with: ``ln_x`` is GroupNorm(H, eps 64e-5)
applied to the WKV output as is (no head-size divisor).

The model is :class:`~rwkv_disha.model.lm.RWKVLM`'s skeleton, as RWKV-7's; ``model(idx, state=s,
return_state=True)`` carries the recurrent state (one :class:`~rwkv_disha.model.lm.LayerState` per
block). RWKV-5.2 (``rwkv5.py``) reuses :class:`Block` and :class:`RWKV6` with its own attention and
feed-forward.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from rwkv_disha.kernels import get_wkv6
from rwkv_disha.model.config import ModelConfig
from rwkv_disha.model.lm import RWKVLM, Block, KernelChoice
from rwkv_disha.model.rwkv7 import token_shift
from rwkv_disha.model.tensor_init import orthogonal, small, uniform

Tensor = torch.Tensor
LN_X_EPS = 64e-5  # rwkv package, att_seq_v6_0 / att_seq_v5_2: group_norm(out, eps=64e-5), out not divided


class WKVHeads(KernelChoice, nn.Module):
    """What RWKV-6 and 5.2 attention share after r, k, v, g and the decay: the WKV recurrence per head
    (bonus ``time_faaaa``), GroupNorm over heads (``ln_x``), the gate, ``output``.

    ``time_state`` is the initial WKV state (H, N, N), (value, key): a Parameter under state tuning
    (adapters/state.py), else None (zeros)."""

    n_head: int
    head_size: int
    time_state: nn.Parameter | None
    lookup = staticmethod(get_wkv6)

    def mix_heads(self, r: Tensor, log_w: Tensor, k: Tensor, v: Tensor, g: Tensor, wkv: Tensor | None):
        """r, log_w, k, v, g (B, T, C), state (B, H, N, N) or None -> (out (B, T, C), final state)."""
        B, T, C = r.shape
        heads = lambda t: t.reshape(B, T, self.n_head, self.head_size)  # noqa: E731
        if wkv is None and self.time_state is not None:  # a new sequence starts from the tuned state
            wkv = self.time_state.expand(B, self.n_head, self.head_size, self.head_size)
        y, wkv = self._wkv(heads(r), heads(log_w), heads(k), heads(v), self.time_faaaa, wkv)
        y = self.ln_x(y.reshape(B * T, C)).view(B, T, C)
        return self.output(y * g), wkv


class TimeMix(WKVHeads):
    """RWKV-6 attention ("att")."""

    def __init__(self, cfg: ModelConfig, layer_id: int, op: str = "auto"):
        super().__init__()
        C, H, N = cfg.n_embd, cfg.n_head, cfg.head_size
        self.n_head, self.head_size, self.op = H, N, op
        for name in ("time_maa_x", "time_maa_w", "time_maa_k", "time_maa_v", "time_maa_r", "time_maa_g"):
            setattr(self, name, nn.Parameter(torch.zeros(1, 1, C)))
        self.time_maa_w1 = nn.Parameter(torch.zeros(C, 5 * cfg.d_mix))
        self.time_maa_w2 = nn.Parameter(torch.zeros(5, cfg.d_mix, C))
        self.time_decay = nn.Parameter(torch.zeros(1, 1, C))
        self.time_decay_w1 = nn.Parameter(torch.zeros(C, cfg.d_decay))
        self.time_decay_w2 = nn.Parameter(torch.zeros(cfg.d_decay, C))
        self.time_faaaa = nn.Parameter(torch.zeros(H, N))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.gate = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=LN_X_EPS)
        self.time_state = None

    def forward(
        self, x: Tensor, last_x: Tensor | None = None, wkv: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """x (B, T, C) -> (out (B, T, C), final WKV state (B, H, N, N))."""
        B, T, C = x.shape
        xx = token_shift(x, last_x) - x
        # five data-dependent shift amounts from one low-rank map: (B, T, 5, Dm) x (5, Dm, C) -> 5 x (B, T, C)
        mix = torch.tanh((x + xx * self.time_maa_x) @ self.time_maa_w1).view(B, T, 5, -1)
        mw, mk, mv, mr, mg = torch.einsum("btfd,fdc->fbtc", mix, self.time_maa_w2).unbind(0)
        xw, xk = x + xx * (self.time_maa_w + mw), x + xx * (self.time_maa_k + mk)
        xv, xr = x + xx * (self.time_maa_v + mv), x + xx * (self.time_maa_r + mr)
        xg = x + xx * (self.time_maa_g + mg)

        r, k, v = self.receptance(xr), self.key(xk), self.value(xv)
        g = F.silu(self.gate(xg))
        # log of the per-channel decay exp(-exp(.)); in fp32 (bf16 would round the exponent)
        decay = self.time_decay + torch.tanh(xw @ self.time_decay_w1) @ self.time_decay_w2
        log_w = -torch.exp(decay.float())
        return self.mix_heads(r, log_w, k, v, g, wkv)


class ChannelMix(nn.Module):
    """RWKV-6 feed-forward ("ffn"): token shift, squared ReLU, sigmoid receptance."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C = cfg.n_embd
        self.time_maa_k = nn.Parameter(torch.zeros(1, 1, C))
        self.time_maa_r = nn.Parameter(torch.zeros(1, 1, C))
        self.key = nn.Linear(C, cfg.dim_ffn, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(cfg.dim_ffn, C, bias=False)

    def forward(self, x: Tensor, last_x: Tensor | None = None) -> Tensor:
        xx = token_shift(x, last_x) - x
        k = torch.relu(self.key(x + xx * self.time_maa_k)) ** 2
        return torch.sigmoid(self.receptance(x + xx * self.time_maa_r)) * self.value(k)


class RWKV6(RWKVLM):
    """The whole RWKV-6 language model. ``op`` picks the WKV kernel (see :mod:`rwkv_disha.kernels`)."""

    time_mix: type = TimeMix
    channel_mix: type = ChannelMix

    def make_block(self, cfg: ModelConfig, layer_id: int, op: str) -> Block:
        return Block(cfg, layer_id, op, self.time_mix, self.channel_mix, carries=False)


# --- the checkpoint layout ------------------------------------------------------------------------------
def dim_of(sd: dict[str, Tensor], key: str, dim: int) -> int:
    """``sd[key].shape[dim]``, or 0 when the key is absent or has too few dimensions."""
    t = sd.get(key)
    return int(t.shape[dim]) if t is not None and t.dim() > dim else 0


def n_layers(sd: dict[str, Tensor]) -> int:
    blocks = {int(k.split(".")[1]) for k in sd if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    return 1 + max(blocks, default=-1)


def infer_config(sd: dict[str, Tensor]) -> ModelConfig:
    """The RWKV-6 shape read from emb, time_faaaa (head size), ffn.key, time_maa_w2 and time_decay_w1."""
    return ModelConfig(
        version="x060",
        n_layer=n_layers(sd),
        n_embd=dim_of(sd, "emb.weight", 1),
        vocab_size=dim_of(sd, "emb.weight", 0),
        head_size=dim_of(sd, "blocks.0.att.time_faaaa", 1),
        dim_ffn=dim_of(sd, "blocks.0.ffn.key.weight", 0),
        d_decay=dim_of(sd, "blocks.0.att.time_decay_w1", 1),
        d_mix=dim_of(sd, "blocks.0.att.time_maa_w2", 1),
    )


def common_shapes(cfg: ModelConfig, att: dict[str, tuple[int, ...]], ffn: dict[str, tuple[int, ...]]):
    """Every key of an RWKV-6/5 checkpoint: emb, norms, head, and per block ``att`` / ``ffn`` (suffix ->
    shape), which add to the Linear layers both versions share."""
    C, V, F = cfg.n_embd, cfg.vocab_size, cfg.dim_ffn
    vec = (C,)
    shapes: dict[str, tuple[int, ...]] = {"emb.weight": (V, C)}
    for i in range(cfg.n_layer):
        p = f"blocks.{i}."
        norms = ("ln0", "ln1", "ln2") if i == 0 else ("ln1", "ln2")
        shapes.update({f"{p}{ln}.{w}": vec for ln in norms for w in ("weight", "bias")})
        shapes.update({f"{p}att.{n}": shape for n, shape in att.items()})
        linears = ("receptance", "key", "value", "output", "gate")
        shapes.update({f"{p}att.{n}.weight": (C, C) for n in linears})
        shapes.update({f"{p}att.ln_x.weight": vec, f"{p}att.ln_x.bias": vec})
        shapes.update({f"{p}ffn.{n}": shape for n, shape in ffn.items()})
        shapes.update({p + "ffn.key.weight": (F, C), p + "ffn.receptance.weight": (C, C)})
        shapes[p + "ffn.value.weight"] = (C, F)
    shapes.update({"ln_out.weight": vec, "ln_out.bias": vec, "head.weight": (V, C)})
    return shapes


def tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every key of an RWKV-6 checkpoint of shape ``cfg``, with its tensor shape (the official layout)."""
    C, mix = cfg.n_embd, (1, 1, cfg.n_embd)
    att = {f"time_maa_{n}": mix for n in ("x", "w", "k", "v", "r", "g")}
    att.update({"time_maa_w1": (C, 5 * cfg.d_mix), "time_maa_w2": (5, cfg.d_mix, C)})
    att.update({"time_decay": mix, "time_decay_w1": (C, cfg.d_decay), "time_decay_w2": (cfg.d_decay, C)})
    att["time_faaaa"] = (cfg.n_head, cfg.head_size)
    return common_shapes(cfg, att, {"time_maa_k": mix, "time_maa_r": mix})


# --- rwkv-disha init -----------------------------------------------------------------------------------
def ffn_width(n_embd: int) -> int:
    """3.5 C rounded down to a multiple of 32, as in the released RWKV-6 / 5.2 models (C=2048 -> 7168)."""
    return int(n_embd * 3.5) // 32 * 32


def default_config(n_layer: int, n_embd: int, vocab_size: int, head_size: int) -> ModelConfig:
    """The RWKV-6 shape for these sizes: FFN 3.5C; low-rank widths 32 (shift) and 64 (decay) as in the
    released models up to C=2560, 64 / 128 from C=4096."""
    big = n_embd >= 4096
    return ModelConfig(
        "x060", n_layer, n_embd, vocab_size, head_size, ffn_width(n_embd),
        d_decay=128 if big else 64, d_mix=64 if big else 32,
    )  # fmt: skip


def ramps(cfg: ModelConfig, i: int) -> tuple[Tensor, float, float]:
    """(channel ramp n/C as (1, 1, C) fp64, layer ratio 0 -> 1, layer ratio 1 -> ~0) of block ``i``."""
    C, L = cfg.n_embd, cfg.n_layer
    return (torch.arange(C, dtype=torch.float64) / C).view(1, 1, C), i / max(L - 1, 1), 1.0 - i / L


def decay_init(cfg: ModelConfig, i: int) -> tuple[Tensor, Tensor]:
    """(time_decay (C,), time_faaaa (C,)) of block ``i``: decay speeds spread over channels, zigzag bonus."""
    C = cfg.n_embd
    _, r01, _ = ramps(cfg, i)
    n = torch.arange(C, dtype=torch.float64)
    speed = -6 + 5 * (n / max(C - 1, 1)) ** (0.7 + 1.3 * r01)
    zigzag = ((n + 1) % 3 - 1) * 0.1
    return speed, r01 * (1 - n / max(C - 1, 1)) + zigzag


def linear_weights(cfg: ModelConfig, random: bool, g: torch.Generator, prefix: str) -> dict[str, Tensor]:
    """The Linear layers RWKV-6 and 5.2 share: attention r, k, v, gate, output; ffn key, receptance, value.
    The pretrain style zeroes the output-side layers (output, ffn receptance / value) as the authors do."""
    C, F = cfg.n_embd, cfg.dim_ffn
    s, a, f = 1 / math.sqrt(C), prefix + "att.", prefix + "ffn."
    out = {a + f"{n}.weight": uniform((C, C), 0.5 * s, g) for n in ("receptance", "key", "value", "gate")}
    out[a + "output.weight"] = uniform((C, C), 0.5 * s, g) if random else torch.zeros(C, C)
    out[f + "key.weight"] = uniform((F, C), 0.5 * s, g)
    out[f + "receptance.weight"] = uniform((C, C), 0.5 * s, g) if random else torch.zeros(C, C)
    out[f + "value.weight"] = uniform((C, F), 0.5 / math.sqrt(F), g) if random else torch.zeros(C, F)
    return out


def norms_and_embeddings(cfg: ModelConfig, random: bool, g: torch.Generator) -> dict[str, Tensor]:
    """emb, head and every LayerNorm / ln_x of an RWKV-6/5 model."""
    C, V, L = cfg.n_embd, cfg.vocab_size, cfg.n_layer
    sd: dict[str, Tensor] = {"emb.weight": uniform((V, C), 1.0 if random else 1e-4, g)}
    norms = ["blocks.0.ln0"] + [f"blocks.{i}.{ln}" for i in range(L) for ln in ("ln1", "ln2")] + ["ln_out"]
    for name in norms:
        sd[name + ".weight"], sd[name + ".bias"] = 1 + small((C,), random, g, 0.2), small((C,), random, g)
    for i in range(L):
        sd[f"blocks.{i}.att.ln_x.weight"] = torch.full((C,), ((1 + i) / L) ** 0.7) + small((C,), random, g)
        sd[f"blocks.{i}.att.ln_x.bias"] = small((C,), random, g)
    sd["head.weight"] = orthogonal(V, C, 0.5 * math.sqrt(V / C) if V > C else 0.5, g)
    return sd


def init_tensors(cfg: ModelConfig, random: bool, g: torch.Generator) -> dict[str, Tensor]:
    """A fresh fp32 RWKV-6 state dict: the time_* recipe of the x060 training code, or every tensor random."""
    C, H, N, Dm, Dw = cfg.n_embd, cfg.n_head, cfg.head_size, cfg.d_mix, cfg.d_decay
    sd = norms_and_embeddings(cfg, random, g)
    for i in range(cfg.n_layer):
        a, f = f"blocks.{i}.att.", f"blocks.{i}.ffn."
        ddd, r01, r1a0 = ramps(cfg, i)
        shift = {"x": ddd.pow(r1a0), "w": ddd.pow(r1a0), "k": ddd.pow(r1a0), "v": ddd.pow(r1a0) + 0.3 * r01}
        shift.update({"r": ddd.pow(0.5 * r1a0), "g": ddd.pow(0.5 * r1a0)})
        for n, amount in shift.items():
            sd[a + f"time_maa_{n}"] = (1.0 - amount).float() + small((1, 1, C), random, g)
        sd[a + "time_maa_w1"] = small((C, 5 * Dm), True, g, 0.1 if random else 1e-4)
        sd[a + "time_maa_w2"] = small((5, Dm, C), True, g, 0.1 if random else 1e-4)
        speed, bonus = decay_init(cfg, i)
        sd[a + "time_decay"] = speed.float().view(1, 1, C) + small((1, 1, C), random, g, 0.5)
        sd[a + "time_decay_w1"] = small((C, Dw), random, g)
        sd[a + "time_decay_w2"] = small((Dw, C), True, g, 0.1 if random else 1e-2)
        sd[a + "time_faaaa"] = bonus.float().view(H, N) + small((H, N), random, g, 0.5)
        sd[f + "time_maa_k"] = (1.0 - ddd.pow(r1a0)).float() + small((1, 1, C), random, g)
        sd[f + "time_maa_r"] = (1.0 - ddd.pow(r1a0)).float() + small((1, 1, C), random, g)
        sd.update(linear_weights(cfg, random, g, f"blocks.{i}."))
    return sd
