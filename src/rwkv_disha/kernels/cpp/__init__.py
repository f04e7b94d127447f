"""Our compiled CPU WKV kernels (``--op cpp``): RWKV-7 (``wkv7.h``) and RWKV-6 / 5.2 (``wkv6.h``), with
their torch binding (``wkv_cpu.cpp``), built by torch's cpp_extension at first use (~25 s with g++, then
cached in ``~/.cache/torch_extensions``).

One (batch, head) per task across the CPU's threads, the state walked step by step in cache: about 2x the
chunked torch kernel's speed for a 0.1B RWKV-7 layer's forward + backward (docs/BENCHMARKS.md). Any head
size up to 256 (64 is compiled as a constant), fp32 computation (bf16 inputs are widened, as the chunked
kernels do), exact gradients for every input and the initial state.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import torch

from rwkv_disha.kernels.compiled import (
    backward_to_come,
    build_extension,
    build_tools_missing,
    register_wkv_autograd,
)
from rwkv_disha.kernels.wkv7 import _init_state

Tensor = torch.Tensor
SOURCES = Path(__file__).parent
CHUNK = 16  # steps between the states a forward saves for its backward (common.h)
MAX_HEAD_SIZE = 256  # MAX_N in common.h
# Vector instructions by the CPU torch itself dispatches to; the build's name carries them, so a cache
# shared between different CPUs never loads code built for another's instructions.
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512dq", "-mavx2", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}


def missing() -> str | None:
    """What this machine lacks to build the kernel (for an error message), or None."""
    return build_tools_missing()


@functools.cache
def extension():
    """Build (first call in a fresh cache) and import the extension module."""
    capability = torch.backends.cpu.get_cpu_capability()
    cflags = ["-O3", *_ISA_FLAGS.get(capability, [])]
    ldflags = []
    if torch.backends.openmp.is_available():  # at::parallel_for spreads the heads over threads only with it
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    # cpp_extension rebuilds when a listed source changes, not a header it includes: the name carries a hash
    # of every file, so an edited kernel never loads a stale build
    files = sorted(SOURCES.glob("*.[ch]*"))
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:12]
    isa = "".join(c for c in capability.lower() if c.isalnum())
    name = f"rwkv_disha_wkv_cpu_{isa}_{digest}"
    sources = [SOURCES / "wkv_cpu.cpp"]
    return build_extension("cpp", "CPU", "torch", name, sources, extra_cflags=cflags, extra_ldflags=ldflags)


def _apply(op, r: Tensor, inputs: tuple, state: Tensor | None) -> tuple[Tensor, Tensor]:
    """One of the ops below on fp32 contiguous copies of ``inputs`` and of the start state (zeros if None)
    -> (y in r's dtype, final state fp32)."""
    if r.device.type != "cpu":
        raise ValueError(f"--op cpp runs on CPU tensors, got {r.device}; on a GPU use --op fla, cuda, torch")
    with torch.autocast(device_type="cpu", enabled=False):
        xs = [x.float().contiguous() for x in inputs]
        s0 = _init_state(r, state, torch.float32).contiguous()
        y, s_last, *_ = op(*xs, s0, backward_to_come(*xs, s0))
    return y.to(r.dtype), s_last


def _saved_states(r: Tensor, save: bool) -> Tensor:
    """The chunk start states a forward keeps for its backward: (B, H, ceil(T / CHUNK), N, N), or (0, ...)."""
    B, T, H, N = r.shape
    return r.new_empty(B if save else 0, H, (T + CHUNK - 1) // CHUNK, N, N)


# torch custom ops (not autograd Functions), so that torch.compile traces through them: --compile 1 --op cpp
# makes one graph per block, with no break at the kernel (tests/kernels/test_cpp.py)
@torch.library.custom_op("rwkv_disha::wkv7_cpp", mutates_args=())
def _wkv7(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, s0: Tensor, save: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(r, w, k, v, a, b) (B, T, H, N) fp32 contiguous, w the log-decay, s0 (B, H, N, N) fp32
    -> (y, s_T, the chunk start states, sa (B, T, H, N)); the last two empty without ``save``."""
    # the kernel takes the decay itself and returns the log-decay's gradient
    return tuple(extension().wkv7_forward([r, torch.exp(w), k, v, a, b], s0, save))


@_wkv7.register_fake
def _(r, w, k, v, a, b, s0, save):
    return (
        torch.empty_like(r),
        torch.empty_like(s0),
        _saved_states(r, save),
        r.new_empty(r.shape if save else 0),
    )


@torch.library.custom_op("rwkv_disha::wkv7_cpp_backward", mutates_args=())
def _wkv7_backward(
    r: Tensor,
    w: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    starts: Tensor,
    sa: Tensor,
    dy: Tensor,
    ds_last: Tensor,
) -> list[Tensor]:
    """-> the gradients of (r, w, k, v, a, b, s0)."""
    return extension().wkv7_backward([r, torch.exp(w), k, v, a, b], starts, sa, dy, ds_last)


@_wkv7_backward.register_fake
def _(r, w, k, v, a, b, starts, sa, dy, ds_last):
    return [*(torch.empty_like(r) for _ in range(6)), torch.empty_like(ds_last)]


register_wkv_autograd(_wkv7, _wkv7_backward)


def wkv7_cpp(r, w, k, v, a, b, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Same contract as :func:`rwkv_disha.kernels.wkv7.wkv7_loop`, on CPU tensors: (B, T, H, N) inputs,
    ``w`` the log-decay -> (y (B, T, H, N) in r's dtype, state (B, H, N, N) fp32 as (value, key)); computed
    in fp32 whatever the inputs' dtype (fp64 ones too)."""
    return _apply(_wkv7, r, (r, w, k, v, a, b), state)


@torch.library.custom_op("rwkv_disha::wkv6_cpp", mutates_args=())
def _wkv6(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, u: Tensor, s0: Tensor, save: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(r, w, k, v) (B, T, H, N) fp32 contiguous, w the log-decay, u (H, N), s0 (B, H, N, N)
    -> (y, s_T, the chunk start states; empty without ``save``)."""
    return tuple(extension().wkv6_forward([r, torch.exp(w), k, v], u, s0, save))


@_wkv6.register_fake
def _(r, w, k, v, u, s0, save):
    return torch.empty_like(r), torch.empty_like(s0), _saved_states(r, save)


@torch.library.custom_op("rwkv_disha::wkv6_cpp_backward", mutates_args=())
def _wkv6_backward(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, u: Tensor, starts: Tensor, dy: Tensor, ds_last: Tensor
) -> list[Tensor]:
    """-> the gradients of (r, w, k, v, u, s0)."""
    dr, dw, dk, dv, du, ds0 = extension().wkv6_backward([r, torch.exp(w), k, v], u, starts, dy, ds_last)
    return [dr, dw, dk, dv, du.sum(0), ds0]  # u is shared by the batch


@_wkv6_backward.register_fake
def _(r, w, k, v, u, starts, dy, ds_last):
    return [*(torch.empty_like(r) for _ in range(4)), torch.empty_like(u), torch.empty_like(ds_last)]


register_wkv_autograd(_wkv6, _wkv6_backward)


def wkv6_cpp(r, w, k, v, u, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Same contract as :func:`rwkv_disha.kernels.wkv6.wkv6_loop`, on CPU tensors: (B, T, H, N) inputs,
    ``w`` the log-decay, u (H, N) -> (y (B, T, H, N) in r's dtype, state (B, H, N, N) fp32 (value, key));
    computed in fp32 whatever the inputs' dtype."""
    return _apply(_wkv6, r, (r, w, k, v, u), state)
