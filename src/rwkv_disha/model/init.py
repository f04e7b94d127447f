"""Write a randomly initialised RWKV-7 base model in the official layout.

Style ``pretrain`` follows the initialisation RWKV-7's authors use before pretraining (small uniform
embedding, per-layer token-shift ratios, spread decay speeds, zero output projections). Style ``random``
makes every tensor random and non-zero, so tests of the forward pass exercise every parameter.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from rwkv_disha.config import opt
from rwkv_disha.errors import RWKVDishaError
from rwkv_disha.fsio import check_output_path
from rwkv_disha.model.config import ModelConfig
from rwkv_disha.model.rwkv7 import tensor_shapes

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def lowrank_widths(n_embd: int) -> tuple[int, int, int, int]:
    """(Dw, Da, Dv, Dg) the RWKV-7 authors use for width C (64/64/32/128 at C=768, 128/128/96/480 at 4096)."""

    def r32(x: float) -> int:
        return max(32, int(round(x / 32) * 32))

    s = math.sqrt(n_embd)
    return r32(1.8 * s), r32(1.8 * s), r32(1.3 * s), r32(0.6 * n_embd**0.8)


def make_config(n_layer: int, n_embd: int, vocab_size: int, head_size: int = 64) -> ModelConfig:
    """The RWKV-7 shape for these sizes (low-rank widths as the authors pick them), or one line why not."""
    for name, value in (("n_layer", n_layer), ("n_embd", n_embd), ("vocab_size", vocab_size)):
        if not isinstance(value, int) or value < 1:
            raise RWKVDishaError(f"--{name} must be a positive integer, got {value!r}")
    if not isinstance(head_size, int) or head_size < 1:
        raise RWKVDishaError(
            f"--head_size must be a positive integer (64 in every release), got {head_size!r}"
        )
    if n_embd % head_size:
        raise RWKVDishaError(f"n_embd {n_embd} must be a multiple of head_size {head_size}")
    dw, da, dv, dg = lowrank_widths(n_embd)
    return ModelConfig("x070", n_layer, n_embd, vocab_size, head_size, 4 * n_embd, dw, da, dv, dg)


def parameter_count(cfg: ModelConfig) -> int:
    """Number of parameters of a model of shape ``cfg`` (from the layout, without building it)."""
    return sum(math.prod(shape) for shape in tensor_shapes(cfg).values())


def _orthogonal(rows: int, cols: int, gain: float, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(max(rows, cols), min(rows, cols), generator=g))
    q = q if rows >= cols else q.T
    return gain * q[:rows, :cols].contiguous()


def _uniform(shape: tuple[int, ...], bound: float, g: torch.Generator) -> torch.Tensor:
    return (torch.rand(shape, generator=g) * 2 - 1) * bound


def init_state_dict(
    n_layer: int,
    n_embd: int,
    vocab_size: int,
    head_size: int = 64,
    seed: int = 0,
    style: str = "pretrain",
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """A fresh RWKV-7 state dict with official key names and shapes."""
    if style not in ("pretrain", "random"):
        raise RWKVDishaError(f"unknown init style {style!r}; choose pretrain or random")
    cfg = make_config(n_layer, n_embd, vocab_size, head_size)
    C, H, N, L, V, F = n_embd, cfg.n_head, head_size, n_layer, vocab_size, cfg.dim_ffn
    g = torch.Generator().manual_seed(seed)
    rnd = style == "random"

    def small(*shape: int, scale: float = 0.1) -> torch.Tensor:  # zero in pretrain style
        return _uniform(shape, scale, g) if rnd else torch.zeros(shape)

    ones_ln = lambda: 1 + small(C, scale=0.2)  # noqa: E731
    sd: dict[str, torch.Tensor] = {}
    sd["emb.weight"] = _uniform((V, C), 1.0 if rnd else 1e-4, g)
    ddd = (torch.arange(C, dtype=torch.float64) / C).view(1, 1, C)
    for i in range(L):
        p = f"blocks.{i}."
        r01 = i / max(L - 1, 1)
        r1a0 = 1.0 - i / L
        if i == 0:
            sd[p + "ln0.weight"], sd[p + "ln0.bias"] = ones_ln(), small(C)
        for ln in ("ln1", "ln2"):
            sd[p + f"{ln}.weight"], sd[p + f"{ln}.bias"] = ones_ln(), small(C)
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
        sd[a + "w1"], sd[a + "w2"] = small(C, cfg.d_decay), _orthogonal(cfg.d_decay, C, 0.1, g)
        sd[a + "a0"] = small(1, 1, C, scale=0.5)
        sd[a + "a1"], sd[a + "a2"] = small(C, cfg.d_aaa), _orthogonal(cfg.d_aaa, C, 0.1, g)
        if i > 0:
            sd[a + "v0"] = 1 + small(1, 1, C, scale=0.5)
            sd[a + "v1"], sd[a + "v2"] = small(C, cfg.d_mv), _orthogonal(cfg.d_mv, C, 0.1, g)
        sd[a + "g1"], sd[a + "g2"] = small(C, cfg.d_gate), _orthogonal(cfg.d_gate, C, 0.1, g)
        sd[a + "k_k"] = torch.full((1, 1, C), 0.85) + small(1, 1, C)
        sd[a + "k_a"] = torch.ones(1, 1, C) + small(1, 1, C)
        sd[a + "r_k"] = small(H, N, scale=0.5) if rnd else torch.full((H, N), -0.04)
        s = 1 / math.sqrt(C)
        sd[a + "receptance.weight"] = _uniform((C, C), 0.5 * s, g)
        sd[a + "key.weight"] = _uniform((C, C), (0.5 if rnd else 0.05) * s, g)
        sd[a + "value.weight"] = _uniform((C, C), 0.5 * s, g)
        sd[a + "output.weight"] = _uniform((C, C), 0.5 * s, g) if rnd else torch.zeros(C, C)
        sd[a + "ln_x.weight"] = torch.full((C,), ((1 + i) / L) ** 0.7) + small(C)
        sd[a + "ln_x.bias"] = small(C)
        f = p + "ffn."
        sd[f + "x_k"] = (1.0 - ddd.pow(r1a0**4)).float()
        sd[f + "key.weight"] = _uniform((F, C), 0.5 * s, g)
        sd[f + "value.weight"] = _uniform((C, F), 0.5 / math.sqrt(F), g) if rnd else torch.zeros(C, F)
    sd["ln_out.weight"], sd["ln_out.bias"] = ones_ln(), small(C)
    sd["head.weight"] = _orthogonal(V, C, 0.5 * math.sqrt(V / C) if V > C else 0.5, g)
    return {k: v.to(dtype).contiguous() for k, v in sd.items()}


@dataclass
class Config:
    output: str = opt("rwkv7-init.pth", "where to write the model (.pth, or .safetensors)")
    n_layer: int = opt(2, "number of blocks")
    n_embd: int = opt(128, "model width C (a multiple of head_size)")
    vocab_size: int = opt(65536, "vocabulary size (65536 for the RWKV World tokenizer)")
    head_size: int = opt(64, "head size N (64 in every released model)")
    dtype: str = opt("fp32", "dtype of the saved tensors", choices=tuple(_DTYPES))
    style: str = opt(
        "pretrain", "pretrain: the authors' init; random: every tensor random", ("pretrain", "random")
    )
    seed: int = opt(0, "random seed")
    overwrite: bool = opt(False, "replace an existing --output file (refused otherwise)")


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def validate(cfg: Config) -> ModelConfig:
    """Every option checked before any tensor is made or any file written (one line each)."""
    mcfg = make_config(cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.head_size)
    if cfg.dtype not in _DTYPES:
        raise RWKVDishaError(f"--dtype must be one of {', '.join(_DTYPES)}, got {cfg.dtype!r}")
    if cfg.style not in ("pretrain", "random"):
        raise RWKVDishaError(f"--style must be pretrain or random, got {cfg.style!r}")
    if not 0 <= cfg.seed < 2**64:
        raise RWKVDishaError(f"--seed must be in [0, 2**64), got {cfg.seed}")
    if not cfg.output:
        raise RWKVDishaError("--output is required: the .pth file to write")
    check_output_path(cfg.output, "--output", overwrite=cfg.overwrite)
    # init builds the fp32 tensors first: 4 bytes a parameter, plus the saved copy
    need, have = parameter_count(mcfg) * (4 + _DTYPES[cfg.dtype].itemsize), _memory_bytes()
    if have is not None and need > have:
        raise RWKVDishaError(
            f"a model of {mcfg.summary()} needs about {need / 2**30:.1f} GiB of memory to write, "
            f"more than this machine's {have / 2**30:.1f} GiB; choose a smaller --n_layer / --n_embd"
        )
    return mcfg


def run(cfg: Config) -> int:
    from rwkv_disha.model.load import save_state_dict

    validate(cfg)
    sd = init_state_dict(
        cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.head_size, cfg.seed, cfg.style, _DTYPES[cfg.dtype]
    )
    path = save_state_dict(sd, cfg.output)
    n_params = sum(t.numel() for t in sd.values())
    print(
        f"wrote {path}: RWKV-7 L{cfg.n_layer} C{cfg.n_embd} V{cfg.vocab_size}, "
        f"{n_params / 1e6:.2f}M params, {cfg.dtype}"
    )
    return 0
