"""Random tensors for ``rwkv-disha init``, shared by every model version's ``init_tensors``."""

from __future__ import annotations

import torch


def uniform(shape: tuple[int, ...], bound: float, g: torch.Generator) -> torch.Tensor:
    """Uniform in [-bound, bound)."""
    return (torch.rand(shape, generator=g) * 2 - 1) * bound


def orthogonal(rows: int, cols: int, gain: float, g: torch.Generator) -> torch.Tensor:
    """A (rows, cols) matrix with orthonormal rows or columns (whichever are fewer), times ``gain``."""
    q, _ = torch.linalg.qr(torch.randn(max(rows, cols), min(rows, cols), generator=g))
    q = q if rows >= cols else q.T
    return gain * q[:rows, :cols].contiguous()


def small(shape: tuple[int, ...], random: bool, g: torch.Generator, scale: float = 0.1) -> torch.Tensor:
    """Uniform in [-scale, scale) in the ``random`` style, zeros in the ``pretrain`` style."""
    return uniform(shape, scale, g) if random else torch.zeros(shape)
