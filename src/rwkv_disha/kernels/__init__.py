"""WKV kernel registry: ``get_wkv7(op)`` returns ``f(r, w, k, v, a, b, state) -> (y, state)`` (RWKV-7),
``get_wkv6(op)`` returns ``f(r, w, k, v, u, state) -> (y, state)`` (RWKV-6, and RWKV-5.2).

Ops: ``torch`` (chunked, any device; default on CPU), ``loop`` (per-step reference), ``fla``
(flash-linear-attention Triton kernel, CUDA only). ``cuda`` and ``triton`` (RWKV-PEFT's names for its
GPU kernels) resolve to ``fla``; ``auto`` picks ``fla`` when it can run, else ``torch``.
"""

from __future__ import annotations

from collections.abc import Callable

from rwkv_disha.choices import OPS
from rwkv_disha.errors import RWKVDishaError
from rwkv_disha.kernels.fla import fla_available, wkv6_fla, wkv7_fla
from rwkv_disha.kernels.wkv6 import wkv6_chunked, wkv6_loop
from rwkv_disha.kernels.wkv7 import wkv7_chunked, wkv7_loop

_ALIASES = {"cuda": "fla", "triton": "fla"}


def available_ops() -> list[str]:
    return ["torch", "loop"] + (["fla"] if fla_available() else [])


def resolve_op(op: str) -> str:
    """Map a user's ``--op`` to a kernel that runs here, or fail naming what does."""
    if op not in OPS:
        raise RWKVDishaError(f"unknown --op {op!r}; choose one of {', '.join(OPS)}")
    if op == "auto":
        return "auto"
    name = _ALIASES.get(op, op)
    if name == "fla" and not fla_available():
        raise RWKVDishaError(
            f"--op {op} needs flash-linear-attention and a CUDA GPU (pip install 'rwkv-disha[gpu]'); "
            f"available here: {', '.join(available_ops())}"
        )
    return name


def wkv7_auto(r, w, k, v, a, b, state=None):
    """fla on CUDA tensors when installed, the chunked torch kernel otherwise."""
    if r.is_cuda and fla_available():
        return wkv7_fla(r, w, k, v, a, b, state)
    return wkv7_chunked(r, w, k, v, a, b, state)


def get_wkv7(op: str) -> Callable:
    return {"auto": wkv7_auto, "torch": wkv7_chunked, "loop": wkv7_loop, "fla": wkv7_fla}[resolve_op(op)]


def wkv6_auto(r, w, k, v, u, state=None):
    """fla on CUDA tensors when installed, the chunked torch kernel otherwise."""
    if r.is_cuda and fla_available():
        return wkv6_fla(r, w, k, v, u, state)
    return wkv6_chunked(r, w, k, v, u, state)


def get_wkv6(op: str) -> Callable:
    return {"auto": wkv6_auto, "torch": wkv6_chunked, "loop": wkv6_loop, "fla": wkv6_fla}[resolve_op(op)]


__all__ = [
    "OPS",
    "available_ops",
    "get_wkv6",
    "get_wkv7",
    "resolve_op",
    "wkv6_auto",
    "wkv6_chunked",
    "wkv6_loop",
    "wkv7_auto",
    "wkv7_chunked",
    "wkv7_loop",
]
