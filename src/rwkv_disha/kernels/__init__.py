"""WKV kernel registry: ``get_wkv7(op)`` returns ``f(r, w, k, v, a, b, state) -> (y, state)`` (RWKV-7),
``get_wkv6(op)`` returns ``f(r, w, k, v, u, state) -> (y, state)`` (RWKV-6, and RWKV-5.2).

Ops: ``torch`` (chunked, any device; default on CPU), ``loop`` (per-step reference), ``fla``
(flash-linear-attention Triton kernel, CUDA only), ``cuda`` (RWKV-7: our CUDA kernel, built at first use,
:mod:`rwkv_disha.kernels.cuda`; RWKV-6 / 5.2 have none of ours, so there it means ``fla``), ``cpp``
(our compiled CPU kernels for RWKV-7 and RWKV-6 / 5.2, built at first use,
:mod:`rwkv_disha.kernels.cpp`; CPU only). ``triton`` (RWKV-PEFT's name) means ``fla``; ``auto`` picks
``fla`` when it can run, else ``torch``.
"""

from __future__ import annotations

from collections.abc import Callable

from rwkv_disha.choices import OPS
from rwkv_disha.errors import RWKVDishaError
from rwkv_disha.kernels import cpp, cuda
from rwkv_disha.kernels.fla import fla_available, wkv6_fla, wkv7_fla
from rwkv_disha.kernels.wkv6 import wkv6_chunked, wkv6_loop
from rwkv_disha.kernels.wkv7 import wkv7_chunked, wkv7_loop

_ALIASES = {"triton": "fla"}
GPU_OPS = ("fla", "cuda")  # run on CUDA tensors only
CPU_OPS = ("cpp",)  # run on CPU tensors only
_BUILT = {"cuda": cuda, "cpp": cpp}  # compiled at first use: built while the flags are checked


def _missing(name: str) -> str | None:
    """What this machine lacks for kernel ``name``, or None."""
    if name == "fla" and not fla_available():
        return "flash-linear-attention and a CUDA GPU (pip install 'rwkv-disha[gpu]')"
    if name in _BUILT:
        return _BUILT[name].missing()
    return None


def available_ops() -> list[str]:
    return [op for op in ("torch", "loop", "fla", "cuda", "cpp") if _missing(op) is None]


def resolve_op(op: str, build: bool = True) -> str:
    """Map a user's ``--op`` to a kernel that runs here, or fail naming what does; ``build``: build (or load)
    a compiled kernel now, so that a failed build is one error line before any work."""
    if op not in OPS:
        raise RWKVDishaError(f"unknown --op {op!r}; choose one of {', '.join(OPS)}")
    name = _ALIASES.get(op, op)
    lacking = _missing(name)
    if lacking:
        raise RWKVDishaError(f"--op {op} needs {lacking}; available here: {', '.join(available_ops())}")
    if build and name in _BUILT:  # first use: ~0.5-1 min, then cached
        _BUILT[name].extension()
    return name


def check_op_device(op: str, on_gpu: bool, to_gpu: str, to_cpu: str, flag: str = "--op") -> None:
    """Refuse a kernel that runs on one kind of device only for a run on the other; ``to_gpu`` / ``to_cpu``
    say how this command moves the run there. Builds nothing: the model's head size is checked first."""
    name = resolve_op(op, build=False)
    if name in GPU_OPS and not on_gpu:
        raise RWKVDishaError(f"{flag} {op} runs on CUDA tensors only: {to_gpu}")
    if name in CPU_OPS and on_gpu:
        raise RWKVDishaError(f"{flag} {op} runs on CPU tensors only: {to_cpu}")


# Head sizes each compiled kernel runs: op -> (model versions it serves, smallest, largest). cuda: the size
# wkv7.cu is compiled for (RWKV-6 / 5.2 run fla there); cpp: MAX_N of cpp/common.h (test_cpp.py compares).
HEAD_SIZE_LIMITS = {
    "cuda": (("x070",), cuda.HEAD_SIZE, cuda.HEAD_SIZE),
    "cpp": (("x070", "x060", "x052"), 1, cpp.MAX_HEAD_SIZE),
}
_INSTEAD = {"cuda": "fla or torch", "cpp": "torch"}  # what runs any head size where the kernel runs


def check_op_fits(
    op: str, version: str, head_size: int, flag: str = "--op", heads: str = "this model's are"
) -> None:
    """Refuse, before any work (and before a compiled kernel is built), a kernel that cannot run heads of
    ``head_size``; ``flag`` and ``heads`` word the line for the command (bench's ``--ops``, ``--N is``)."""
    name = _ALIASES.get(op, op)
    if name not in HEAD_SIZE_LIMITS:
        return
    versions, low, high = HEAD_SIZE_LIMITS[name]
    if version not in versions or low <= head_size <= high:
        return
    only = "RWKV-7 " if versions == ("x070",) else ""
    sizes = f"{only}heads of size {low} only" if low == high else f"heads of size <= {high}"
    raise RWKVDishaError(f"{flag} {op} runs {sizes}; {heads} {head_size}: use {flag} {_INSTEAD[name]}")


def wkv7_auto(r, w, k, v, a, b, state=None):
    """fla on CUDA tensors when installed, the chunked torch kernel otherwise."""
    if r.is_cuda and fla_available():
        return wkv7_fla(r, w, k, v, a, b, state)
    return wkv7_chunked(r, w, k, v, a, b, state)


def wkv6_auto(r, w, k, v, u, state=None):
    """fla on CUDA tensors when installed, the chunked torch kernel otherwise."""
    if r.is_cuda and fla_available():
        return wkv6_fla(r, w, k, v, u, state)
    return wkv6_chunked(r, w, k, v, u, state)


_WKV7 = {
    "auto": wkv7_auto,
    "torch": wkv7_chunked,
    "loop": wkv7_loop,
    "fla": wkv7_fla,
    "cuda": cuda.wkv7_cuda,
    "cpp": cpp.wkv7_cpp,
}
_WKV6 = {"auto": wkv6_auto, "torch": wkv6_chunked, "loop": wkv6_loop, "fla": wkv6_fla, "cpp": cpp.wkv6_cpp}


def get_wkv7(op: str) -> Callable:
    return _WKV7[resolve_op(op)]


def get_wkv6(op: str) -> Callable:
    op = resolve_op(op)
    # no RWKV-6 CUDA kernel of our own: `cuda` runs fla there, so fla must be installed
    return _WKV6[resolve_op("fla") if op == "cuda" else op]


__all__ = [
    "CPU_OPS",
    "GPU_OPS",
    "HEAD_SIZE_LIMITS",
    "OPS",
    "available_ops",
    "check_op_device",
    "check_op_fits",
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
