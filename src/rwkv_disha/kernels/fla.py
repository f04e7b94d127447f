"""flash-linear-attention's Triton RWKV-7 and RWKV-6 kernels (GPU only), behind an import guard.

fla takes the same log-decay ``w`` (and RWKV-7's a, b, RWKV-6's bonus u) as :mod:`rwkv_disha.kernels.wkv7`
and :mod:`rwkv_disha.kernels.wkv6`, but lays its state out as (key, value): the transpose of ours, so
the state is transposed in and out.
"""

from __future__ import annotations

import functools
import importlib.util

import torch


@functools.cache
def fla_available() -> bool:
    return importlib.util.find_spec("fla") is not None and torch.cuda.is_available()


def wkv7_fla(r, w, k, v, a, b, state=None):
    """(B, T, H, N) inputs on a CUDA device -> (y (B, T, H, N), state (B, H, N, N) as (value, key))."""
    from fla.ops.rwkv7 import chunk_rwkv7

    out_dtype = r.dtype
    # bf16 inputs (a bf16 run on the GPU) go in as bf16: fla accumulates its chunk products and the state
    # in fp32 itself, and six fp32 (B, T, H, N) copies would double the kernel's memory traffic. Anything
    # else (fp32, fp16: the recurrence can overflow fp16) runs in fp32.
    dt = torch.bfloat16 if r.dtype == torch.bfloat16 else torch.float32
    init = None if state is None else state.float().transpose(-1, -2).contiguous()
    with torch.autocast(device_type="cuda", enabled=False):
        y, final = chunk_rwkv7(
            r=r.to(dt),
            w=w.to(dt),
            k=k.to(dt),
            v=v.to(dt),
            a=a.to(dt),
            b=b.to(dt),
            scale=1.0,
            initial_state=init,
            output_final_state=True,
        )
    return y.to(out_dtype), final.transpose(-1, -2)


def wkv6_fla(r, w, k, v, u, state=None):
    """(B, T, H, N) inputs, u (H, N), on CUDA -> (y (B, T, H, N), state (B, H, N, N) as (value, key))."""
    from fla.ops.rwkv6 import chunk_rwkv6

    out_dtype = r.dtype
    init = None if state is None else state.float().transpose(-1, -2).contiguous()
    with torch.autocast(device_type="cuda", enabled=False):
        y, final = chunk_rwkv6(
            r=r.float(),
            k=k.float(),
            v=v.float(),
            w=w.float(),
            u=u.float(),
            scale=1.0,
            initial_state=init,
            output_final_state=True,
        )
    return y.to(out_dtype), final.transpose(-1, -2)
