"""Write a randomly initialised RWKV base model (RWKV-7, 6 or 5.2) in the official layout.

Style ``pretrain`` follows the initialisation each version's authors use before pretraining (small
uniform embedding, per-layer token-shift ratios, spread decay speeds, zero output projections). Style
``random`` makes every tensor random and non-zero, so tests of the forward pass exercise every parameter.
The per-version recipes are the ``init_tensors`` of ``rwkv7.py`` / ``rwkv6.py`` / ``rwkv5.py``, reached
through :mod:`rwkv_disha.model.registry`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

import torch

from rwkv_disha.choices import MODEL_VERSIONS
from rwkv_disha.config import opt
from rwkv_disha.errors import RWKVDishaError
from rwkv_disha.fsio import check_output_path
from rwkv_disha.model.config import ModelConfig
from rwkv_disha.model.registry import get_version
from rwkv_disha.model.rwkv7 import lowrank_widths

__all__ = ["init_state_dict", "lowrank_widths", "make_config", "parameter_count"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # dtype names of the CLI


def make_config(
    n_layer: int, n_embd: int, vocab_size: int, head_size: int = 64, version: str = "x070"
) -> ModelConfig:
    """The shape of a ``version`` model of these sizes (FFN and low-rank widths as its authors pick
    them), or one line why not."""
    for name, value in (("n_layer", n_layer), ("n_embd", n_embd), ("vocab_size", vocab_size)):
        if not isinstance(value, int) or value < 1:
            raise RWKVDishaError(f"--{name} must be a positive integer, got {value!r}")
    if not isinstance(head_size, int) or head_size < 1:
        raise RWKVDishaError(
            f"--head_size must be a positive integer (64 in every release), got {head_size!r}"
        )
    if n_embd % head_size:
        raise RWKVDishaError(f"n_embd {n_embd} must be a multiple of head_size {head_size}")
    return get_version(version).default_config(n_layer, n_embd, vocab_size, head_size)


def parameter_count(cfg: ModelConfig) -> int:
    """Number of parameters of a model of shape ``cfg`` (from the layout, without building it).

    Arithmetic in ``n_layer``: the layouts of one and two blocks give the embeddings + head + block 0 and
    the size of every later block (they are all alike), so an absurd ``n_layer`` costs nothing here."""
    shapes = get_version(cfg.version).tensor_shapes

    def count(n_layer: int) -> int:
        return sum(math.prod(shape) for shape in shapes(replace(cfg, n_layer=n_layer)).values())

    first = count(1)
    return first + (cfg.n_layer - 1) * (count(2) - first)


def init_state_dict(
    n_layer: int,
    n_embd: int,
    vocab_size: int,
    head_size: int = 64,
    seed: int = 0,
    style: str = "pretrain",
    dtype: torch.dtype = torch.float32,
    version: str = "x070",
) -> dict[str, torch.Tensor]:
    """A fresh state dict of ``version`` with official key names and shapes."""
    if style not in ("pretrain", "random"):
        raise RWKVDishaError(f"unknown init style {style!r}; choose pretrain or random")
    cfg = make_config(n_layer, n_embd, vocab_size, head_size, version)
    g = torch.Generator().manual_seed(seed)
    sd = get_version(version).init_tensors(cfg, style == "random", g)
    return {k: v.to(dtype).contiguous() for k, v in sd.items()}


@dataclass
class Config:
    output: str = opt("rwkv7-init.pth", "where to write the model (.pth, or .safetensors)")
    version: str = opt("x070", "model version: x070 (RWKV-7), x060 (RWKV-6), x052 (RWKV-5.2)", MODEL_VERSIONS)
    n_layer: int = opt(2, "number of blocks")
    n_embd: int = opt(128, "model width C (a multiple of head_size)")
    vocab_size: int = opt(65536, "vocabulary size (65536 for the RWKV World tokenizer)")
    head_size: int = opt(64, "head size N (64 in every released model)")
    dtype: str = opt("fp32", "dtype of the saved tensors", choices=tuple(DTYPES))
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


def _biggest_flags(mcfg: ModelConfig) -> str:
    """The flags to shrink: --vocab_size when the embedding and head hold most of the parameters."""
    emb_and_head = 2 * mcfg.vocab_size * mcfg.n_embd
    if 2 * emb_and_head > parameter_count(mcfg):
        return "--vocab_size / --n_embd"
    return "--n_layer / --n_embd"


def validate(cfg: Config) -> ModelConfig:
    """Every option checked before any tensor is made or any file written (one line each)."""
    if cfg.version not in MODEL_VERSIONS:
        raise RWKVDishaError(f"--version must be one of {', '.join(MODEL_VERSIONS)}, got {cfg.version!r}")
    mcfg = make_config(cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.head_size, cfg.version)
    if cfg.dtype not in DTYPES:
        raise RWKVDishaError(f"--dtype must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    if cfg.style not in ("pretrain", "random"):
        raise RWKVDishaError(f"--style must be pretrain or random, got {cfg.style!r}")
    if not 0 <= cfg.seed < 2**64:
        raise RWKVDishaError(f"--seed must be in [0, 2**64), got {cfg.seed}")
    if not cfg.output:
        raise RWKVDishaError("--output is required: the .pth file to write")
    check_output_path(cfg.output, "--output", overwrite=cfg.overwrite)
    # init builds the fp32 tensors first: 4 bytes a parameter, plus the saved copy
    need, have = parameter_count(mcfg) * (4 + DTYPES[cfg.dtype].itemsize), _memory_bytes()
    if have is not None and need > have:
        raise RWKVDishaError(
            f"a model of {mcfg.summary()} needs about {need / 2**30:.3g} GiB of memory to write, "
            f"more than this machine's {have / 2**30:.1f} GiB; choose a smaller {_biggest_flags(mcfg)}"
        )
    return mcfg


def run(cfg: Config) -> int:
    from rwkv_disha.model.load import save_state_dict

    validate(cfg)
    sd = init_state_dict(
        cfg.n_layer,
        cfg.n_embd,
        cfg.vocab_size,
        cfg.head_size,
        cfg.seed,
        cfg.style,
        DTYPES[cfg.dtype],
        cfg.version,
    )
    path = save_state_dict(sd, cfg.output)
    n_params = sum(t.numel() for t in sd.values())
    print(
        f"wrote {path}: {get_version(cfg.version).name} L{cfg.n_layer} C{cfg.n_embd} V{cfg.vocab_size}, "
        f"{n_params / 1e6:.2f}M params, {cfg.dtype}"
    )
    return 0
