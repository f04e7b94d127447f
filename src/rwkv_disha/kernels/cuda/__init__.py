"""RWKV-7's own CUDA kernel (``--op cuda``): ``wkv7.cu`` (the kernels, math in its header comment) and
``wkv7_bind.cpp`` (torch binding), built by torch's cpp_extension at first use. The build needs CUDA's
compiler (nvcc) and ninja, takes about a minute once, and torch caches it (``~/.cache/torch_extensions``).

The kernel walks the whole sequence in one launch per direction, one thread block per (batch, head): no
chunk matrices, no Triton autotuning. Head size 64 only (every RWKV-7 release); fp32 or bf16 inputs,
fp32 state and accumulation.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F

from rwkv_disha.kernels.compiled import backward_to_come, build_extension, register_wkv_autograd
from rwkv_disha.kernels.wkv7 import _init_state

Tensor = torch.Tensor
SOURCES = Path(__file__).parent
HEAD_SIZE = 64
CHUNK = {torch.float32: 8, torch.bfloat16: 16}  # steps per chunk by input dtype (wkv7.cu, wkv7_cuda_chunk)
T_MULTIPLE = 16  # the kernel walks whole chunks: T padded to a multiple of both
CUDA_FLAGS = ["-O3", "--use_fast_math", "-Xptxas", "-O3"]


@functools.cache  # asked by every forward through the registry; the answer does not change in a run
def missing() -> str | None:
    """What this machine lacks to run the kernel (for an error message), or None."""
    if not torch.cuda.is_available():
        return "a CUDA GPU"
    from torch.utils.cpp_extension import CUDA_HOME

    return None if CUDA_HOME else "CUDA's compiler nvcc (install the CUDA toolkit matching torch's CUDA)"


@functools.cache
def extension():
    """Build (first call in a fresh cache: ~1 min) and import the extension module."""
    sources = [SOURCES / "wkv7_bind.cpp", SOURCES / "wkv7.cu"]
    flags = {"extra_cflags": ["-O3"], "extra_cuda_cflags": CUDA_FLAGS}
    return build_extension("cuda", "CUDA", "fla or torch", "rwkv_disha_wkv7", sources, **flags)


def _stream(r: Tensor) -> int:
    return torch.cuda.current_stream(r.device).cuda_stream


# torch custom ops (not an autograd Function), so that torch.compile traces through the kernel: with
# --compile 1 each block is one graph, and --cuda_graphs 1 records the kernel's launches inside it
@torch.library.custom_op("rwkv_disha::wkv7_cuda", mutates_args=())
def _wkv7(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, s0: Tensor, save: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(r, w, k, v, a, b) (B, T, H, 64), T a multiple of T_MULTIPLE, s0 (B, H, 64, 64) fp32
    -> (y, s_T, the saved states (B, H, T / chunk, 64, 64), sa (B, T, H, 64) fp32); empty without save."""
    return tuple(extension().forward(r, w, k, v, a, b, s0, save, _stream(r)))


@_wkv7.register_fake
def _(r, w, k, v, a, b, s0, save):
    B, T, H, N = r.shape
    chunk = CHUNK[r.dtype]
    f32 = dict(dtype=torch.float32)
    s_saved = r.new_empty(B, H, T // chunk, N, N, **f32) if save else r.new_empty(0, **f32)
    return torch.empty_like(r), torch.empty_like(s0), s_saved, r.new_empty(r.shape if save else 0, **f32)


@torch.library.custom_op("rwkv_disha::wkv7_cuda_backward", mutates_args=())
def _wkv7_backward(
    r: Tensor,
    w: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    s_saved: Tensor,
    sa: Tensor,
    dy: Tensor,
    ds_last: Tensor,
) -> list[Tensor]:
    """-> the gradients of (r, w, k, v, a, b) in r's dtype and of s0 (fp32)."""
    return extension().backward(r, w, k, v, a, b, sa, s_saved, dy, ds_last, _stream(r))


@_wkv7_backward.register_fake
def _(r, w, k, v, a, b, s_saved, sa, dy, ds_last):
    return [*(torch.empty_like(r) for _ in range(6)), torch.empty_like(ds_last)]


register_wkv_autograd(_wkv7, _wkv7_backward)


def wkv7_cuda(r, w, k, v, a, b, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Same contract as :func:`rwkv_disha.kernels.wkv7.wkv7_loop`, on CUDA tensors: (B, T, H, 64) inputs,
    ``w`` the log-decay -> (y (B, T, H, 64) in r's dtype, state (B, H, 64, 64) fp32 as (value, key)).
    bf16 inputs stay bf16 (half the kernel's reads); anything else runs in fp32."""
    B, T, H, N = r.shape
    if N != HEAD_SIZE:
        raise ValueError(f"--op cuda runs head size {HEAD_SIZE} only, got {N}; use --op fla or torch")
    out_dtype = r.dtype
    dt = torch.bfloat16 if r.dtype == torch.bfloat16 else torch.float32
    pad = (-T) % T_MULTIPLE
    with torch.autocast(device_type="cuda", enabled=False):
        # zero padding is exact: w = 0 is decay 1 and k = v = a = b = 0 adds nothing to the state
        xs = [x.to(dt) for x in (r, w, k, v, a, b)]
        xs = [(F.pad(x, (0, 0, 0, 0, 0, pad)) if pad else x).contiguous() for x in xs]  # no copy when T fits
        s0 = _init_state(r, state, torch.float32).contiguous()
        # no backward to come (inference): the kernel saves no states for one
        y, s_last, *_ = _wkv7(*xs, s0, backward_to_come(*xs, s0))
    return y[:, :T].to(out_dtype), s_last
