"""RWKV-7 ("x070", Goose) in plain PyTorch, with the official parameter names (docs/MODEL.md).

    x = emb(idx); x = ln0(x)                                   (block 0)
    per block:  x = x + att(ln1(x));  x = x + ffn(ln2(x))
    logits = head(ln_out(x))

``model(idx)`` returns logits (B, T, V). ``model(idx, state=s, return_state=True)`` also carries the
recurrent state: a list with one ``LayerState`` per block, so a sequence can be fed in pieces
(generation, long documents). That skeleton is :class:`~rwkv_disha.model.lm.RWKVLM`'s; RWKV-7's blocks
hand ``v_first`` on as its ``carry``. The Linear layers adapters target (docs/ADAPTERS.md) are plain
``nn.Linear`` modules that adapters replace in place, keeping their ``.weight`` names.

The version's other pieces live here too, for :mod:`rwkv_disha.model.registry`:
:func:`infer_config` (the shape from a checkpoint's tensors), :func:`tensor_shapes` (every key and
shape a checkpoint of a given shape must hold; "Checkpoint layout" in docs/MODEL.md), and for
``rwkv-disha init`` :func:`default_config` and :func:`init_tensors`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from rwkv_disha.kernels import get_wkv7
from rwkv_disha.model.config import ModelConfig
from rwkv_disha.model.lm import RWKVLM, Block, KernelChoice
from rwkv_disha.model.tensor_init import orthogonal, small, uniform

Tensor = torch.Tensor
_DECAY_SCALE = 0.6065306597126334  # exp(-0.5): the largest per-step log-decay magnitude


def token_shift(x: Tensor, last: Tensor | None) -> Tensor:
    """x (B, T, C) -> previous token's x, with ``last`` (B, C) (or zeros) before t = 0."""
    prev = torch.zeros_like(x[:, :1]) if last is None else last.unsqueeze(1).to(x.dtype)
    return torch.cat([prev, x[:, :-1]], dim=1)


class TimeMix(KernelChoice, nn.Module):
    """RWKV-7 attention ("att"): low-rank data-dependent decay, in-context learning rate a, WKV state."""

    lookup = staticmethod(get_wkv7)

    def __init__(self, cfg: ModelConfig, layer_id: int, op: str = "auto"):
        super().__init__()
        C, H, N = cfg.n_embd, cfg.n_head, cfg.head_size
        self.layer_id, self.n_head, self.head_size = layer_id, H, N
        self.first = layer_id == 0  # forward reads this, not layer_id (one compiled graph for blocks 1..L-1)
        self.op = op  # checks the kernel here; forward calls the one found (KernelChoice)
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "k_k", "k_a"):
            setattr(self, name, nn.Parameter(torch.zeros(1, 1, C)))
        self.w1 = nn.Parameter(torch.zeros(C, cfg.d_decay))
        self.w2 = nn.Parameter(torch.zeros(cfg.d_decay, C))
        self.a1 = nn.Parameter(torch.zeros(C, cfg.d_aaa))
        self.a2 = nn.Parameter(torch.zeros(cfg.d_aaa, C))
        if layer_id > 0:  # layer 0 defines v_first; later layers mix towards it
            self.v0 = nn.Parameter(torch.zeros(1, 1, C))
            self.v1 = nn.Parameter(torch.zeros(C, cfg.d_mv))
            self.v2 = nn.Parameter(torch.zeros(cfg.d_mv, C))
        self.g1 = nn.Parameter(torch.zeros(C, cfg.d_gate))
        self.g2 = nn.Parameter(torch.zeros(cfg.d_gate, C))
        self.r_k = nn.Parameter(torch.zeros(H, N))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=64e-5)
        # the initial WKV state (H, N, N), (value, key): a Parameter under state tuning, else zeros
        self.time_state: nn.Parameter | None = None

    def _mixes(self, x: Tensor, xx: Tensor) -> tuple[Tensor, ...]:
        """The six token-shift mixes x + xx * x_{r,w,k,v,a,g}, x and xx (B, T, C), as one addcmul over a
        (6, B, T, C) tensor: one kernel forward and one backward instead of twelve each (a GPU step at
        small shapes is launch-bound). Each returned (B, T, C) slice is contiguous."""
        mix = torch.cat([self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g])  # (6, 1, C)
        return torch.addcmul(x.unsqueeze(0), xx.unsqueeze(0), mix.unsqueeze(1)).unbind(0)

    def forward(
        self, x: Tensor, v_first: Tensor | None, last_x: Tensor | None = None, wkv: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, T, C) -> (out (B, T, C), v_first (B, T, C), final WKV state (B, H, N, N))."""
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        xx = token_shift(x, last_x) - x
        xr, xw, xk, xv, xa, xg = self._mixes(x, xx)

        r = self.receptance(xr)
        k = self.key(xk)
        v = self.value(xv)
        # log of the per-step decay, in (-exp(-0.5), 0): the kernels take the log to stay in fp32 range
        log_w = -_DECAY_SCALE * torch.sigmoid(self.w0 + torch.tanh(xw @ self.w1) @ self.w2)
        if self.first:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)
        a = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)
        g = torch.sigmoid(xg @ self.g1) @ self.g2

        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1, p=2.0)
        k = k * (1 + (a - 1) * self.k_a)
        heads = lambda t: t.view(B, T, H, N)  # noqa: E731
        if wkv is None and self.time_state is not None:  # a new sequence starts from the tuned state
            wkv = self.time_state.expand(B, H, N, N)
        y, wkv = self._wkv(
            heads(r), heads(log_w), heads(k), heads(v), -kk, kk * heads(a), wkv
        )  # y (B, T, H, N)
        y = self.ln_x(y.reshape(B * T, C)).view(B, T, C)
        bonus = (heads(r) * heads(k) * self.r_k).sum(dim=-1, keepdim=True) * heads(v)
        y = y + bonus.reshape(B, T, C)
        return self.output(y * g), v_first, wkv


class ChannelMix(nn.Module):
    """RWKV-7 feed-forward ("ffn"): token shift, squared ReLU."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.x_k = nn.Parameter(torch.zeros(1, 1, cfg.n_embd))
        self.key = nn.Linear(cfg.n_embd, cfg.dim_ffn, bias=False)
        self.value = nn.Linear(cfg.dim_ffn, cfg.n_embd, bias=False)

    def forward(self, x: Tensor, last_x: Tensor | None = None) -> Tensor:
        xx = token_shift(x, last_x) - x
        k = torch.relu(self.key(x + xx * self.x_k)) ** 2
        return self.value(k)


class RWKV7(RWKVLM):
    """The whole RWKV-7 language model. ``op`` picks the WKV kernel (see :mod:`rwkv_disha.kernels`)."""

    def make_block(self, cfg: ModelConfig, layer_id: int, op: str) -> Block:
        return Block(cfg, layer_id, op, TimeMix, ChannelMix, carries=True)


# --- the checkpoint layout ------------------------------------------------------------------------------
def _dim(sd: dict[str, Tensor], key: str, dim: int, default: int = 0) -> int:
    """``sd[key].shape[dim]``, or ``default`` when the key is absent or has too few dimensions."""
    t = sd.get(key)
    return int(t.shape[dim]) if t is not None and t.dim() > dim else default


def infer_config(sd: dict[str, Tensor]) -> ModelConfig:
    """The RWKV-7 shape read from a few tensors (emb, r_k, ffn.key, w1, a1, v1, g1); the caller then
    checks every tensor against :func:`tensor_shapes` of the result."""
    blocks = {int(k.split(".")[1]) for k in sd if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    return ModelConfig(
        version="x070",
        n_layer=1 + max(blocks, default=-1),
        n_embd=_dim(sd, "emb.weight", 1),
        vocab_size=_dim(sd, "emb.weight", 0),
        head_size=_dim(sd, "blocks.0.att.r_k", 1),
        dim_ffn=_dim(sd, "blocks.0.ffn.key.weight", 0),
        d_decay=_dim(sd, "blocks.0.att.w1", 1),
        d_aaa=_dim(sd, "blocks.0.att.a1", 1),
        d_mv=_dim(sd, "blocks.1.att.v1", 1, default=32),  # block 0 has no v1/v2
        d_gate=_dim(sd, "blocks.0.att.g1", 1),
    )


def tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every key of an RWKV-7 checkpoint of shape ``cfg``, with its tensor shape (the official layout)."""
    C, V, F, H, N = cfg.n_embd, cfg.vocab_size, cfg.dim_ffn, cfg.n_head, cfg.head_size
    vec, mix = (C,), (1, 1, C)
    shapes: dict[str, tuple[int, ...]] = {"emb.weight": (V, C)}
    for i in range(cfg.n_layer):
        p, a = f"blocks.{i}.", f"blocks.{i}.att."
        norms = ("ln0", "ln1", "ln2") if i == 0 else ("ln1", "ln2")
        shapes.update({f"{p}{ln}.{w}": vec for ln in norms for w in ("weight", "bias")})
        shapes.update({a + n: mix for n in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0")})
        lowrank = [("w", cfg.d_decay), ("a", cfg.d_aaa), ("g", cfg.d_gate)]
        if i > 0:  # layer 0 defines v_first; later layers mix towards it
            shapes[a + "v0"] = mix
            lowrank.append(("v", cfg.d_mv))
        for n, d in lowrank:
            shapes[f"{a}{n}1"], shapes[f"{a}{n}2"] = (C, d), (d, C)
        shapes.update({a + "k_k": mix, a + "k_a": mix, a + "r_k": (H, N)})
        shapes.update({f"{a}{n}.weight": (C, C) for n in ("receptance", "key", "value", "output")})
        shapes.update({a + "ln_x.weight": vec, a + "ln_x.bias": vec, p + "ffn.x_k": mix})
        shapes.update({p + "ffn.key.weight": (F, C), p + "ffn.value.weight": (C, F)})
    shapes.update({"ln_out.weight": vec, "ln_out.bias": vec, "head.weight": (V, C)})
    return shapes


# --- rwkv-disha init -----------------------------------------------------------------------------------
def lowrank_widths(n_embd: int) -> tuple[int, int, int, int]:
    """(Dw, Da, Dv, Dg) the RWKV-7 authors use for width C (64/64/32/128 at C=768, 128/128/96/480 at 4096)."""

    def r32(x: float) -> int:
        return max(32, int(round(x / 32) * 32))

    s = math.sqrt(n_embd)
    return r32(1.8 * s), r32(1.8 * s), r32(1.3 * s), r32(0.6 * n_embd**0.8)


def default_config(n_layer: int, n_embd: int, vocab_size: int, head_size: int) -> ModelConfig:
    """The RWKV-7 shape for these sizes: FFN 4C, low-rank widths as the authors pick them."""
    dw, da, dv, dg = lowrank_widths(n_embd)
    return ModelConfig("x070", n_layer, n_embd, vocab_size, head_size, 4 * n_embd, dw, da, dv, dg)


def init_tensors(cfg: ModelConfig, random: bool, g: torch.Generator) -> dict[str, Tensor]:
    """A fresh fp32 RWKV-7 state dict: the authors' pretraining init, or every tensor random (``random``)."""
    C, H, N, L, V, F = cfg.n_embd, cfg.n_head, cfg.head_size, cfg.n_layer, cfg.vocab_size, cfg.dim_ffn
    rnd = random
    ones_ln = lambda: 1 + small((C,), rnd, g, 0.2)  # noqa: E731
    sd: dict[str, Tensor] = {}
    sd["emb.weight"] = uniform((V, C), 1.0 if rnd else 1e-4, g)
    ddd = (torch.arange(C, dtype=torch.float64) / C).view(1, 1, C)
    for i in range(L):
        p = f"blocks.{i}."
        r01 = i / max(L - 1, 1)
        r1a0 = 1.0 - i / L
        if i == 0:
            sd[p + "ln0.weight"], sd[p + "ln0.bias"] = ones_ln(), small((C,), rnd, g)
        for ln in ("ln1", "ln2"):
            sd[p + f"{ln}.weight"], sd[p + f"{ln}.bias"] = ones_ln(), small((C,), rnd, g)
        a = p + "att."
        for name, power in (
            ("x_r", 0.2),
            ("x_w", 0.9),
            ("x_k", 0.7),
            ("x_v", 0.7),
            ("x_a", 0.9),
            ("x_g", 0.2),
        ):
            sd[a + name] = (1.0 - ddd.pow(power * r1a0)).float()
        n = torch.arange(C, dtype=torch.float64)
        decay_speed = -7 + 5 * (n / max(C - 1, 1)) ** (0.85 + 1.0 * r01**0.5)
        sd[a + "w0"] = (decay_speed + 0.5).float().view(1, 1, C)
        sd[a + "w1"], sd[a + "w2"] = small((C, cfg.d_decay), rnd, g), orthogonal(cfg.d_decay, C, 0.1, g)
        sd[a + "a0"] = small((1, 1, C), rnd, g, 0.5)
        sd[a + "a1"], sd[a + "a2"] = small((C, cfg.d_aaa), rnd, g), orthogonal(cfg.d_aaa, C, 0.1, g)
        if i > 0:
            sd[a + "v0"] = 1 + small((1, 1, C), rnd, g, 0.5)
            sd[a + "v1"], sd[a + "v2"] = small((C, cfg.d_mv), rnd, g), orthogonal(cfg.d_mv, C, 0.1, g)
        sd[a + "g1"], sd[a + "g2"] = small((C, cfg.d_gate), rnd, g), orthogonal(cfg.d_gate, C, 0.1, g)
        sd[a + "k_k"] = torch.full((1, 1, C), 0.85) + small((1, 1, C), rnd, g)
        sd[a + "k_a"] = torch.ones(1, 1, C) + small((1, 1, C), rnd, g)
        sd[a + "r_k"] = small((H, N), rnd, g, 0.5) if rnd else torch.full((H, N), -0.04)
        s = 1 / math.sqrt(C)
        sd[a + "receptance.weight"] = uniform((C, C), 0.5 * s, g)
        sd[a + "key.weight"] = uniform((C, C), (0.5 if rnd else 0.05) * s, g)
        sd[a + "value.weight"] = uniform((C, C), 0.5 * s, g)
        sd[a + "output.weight"] = uniform((C, C), 0.5 * s, g) if rnd else torch.zeros(C, C)
        sd[a + "ln_x.weight"] = torch.full((C,), ((1 + i) / L) ** 0.7) + small((C,), rnd, g)
        sd[a + "ln_x.bias"] = small((C,), rnd, g)
        f = p + "ffn."
        sd[f + "x_k"] = (1.0 - ddd.pow(r1a0**4)).float()
        sd[f + "key.weight"] = uniform((F, C), 0.5 * s, g)
        sd[f + "value.weight"] = uniform((C, F), 0.5 / math.sqrt(F), g) if rnd else torch.zeros(C, F)
    sd["ln_out.weight"], sd["ln_out.bias"] = ones_ln(), small((C,), rnd, g)
    sd["head.weight"] = orthogonal(V, C, 0.5 * math.sqrt(V / C) if V > C else 0.5, g)
    return sd
