"""What our compiled kernels (``--op cuda``, ``--op cpp``) share: the build by torch's cpp_extension at
first use, cached by it (``~/.cache/torch_extensions``; a failed build is one error line), and the
autograd glue that makes each kernel's forward custom op differentiable through its backward op."""

from __future__ import annotations

import functools
import shutil
import sys
from pathlib import Path

from rwkv_disha.errors import RWKVDishaError


@functools.cache
def build_tools_missing() -> str | None:
    """What cpp_extension lacks here to build anything (a C++ compiler, ninja), or None."""
    from torch.utils.cpp_extension import get_cxx_compiler, is_ninja_available

    if shutil.which(get_cxx_compiler()) is None:
        return f"a C++ compiler ({get_cxx_compiler()}: install g++ or clang)"
    if not is_ninja_available():
        return "ninja (pip install ninja, or the cpp extra: pip install 'rwkv-disha[cpp]')"
    return None


def build_extension(op: str, what: str, instead: str, name: str, sources: list[Path], **flags):
    """Build (or load from torch's cache) extension ``name`` for ``--op op``; a failed build becomes one line
    naming the ops that still run (``instead``)."""
    from torch.utils.cpp_extension import load

    if not _built_before(name):  # the first build is silent for half a minute or more: say why
        print(f"--op {op}: building the {what} kernel (first use only, 30-60 s)", file=sys.stderr, flush=True)
    try:
        return load(name=name, sources=[str(s) for s in sources], **flags)
    except (OSError, RuntimeError) as e:  # compiler missing or failing: say which op still runs
        last = (str(e).strip().splitlines() or ["?"])[-1]  # the build log is long; its last line says why
        msg = f"--op {op}: building the {what} kernel failed ({last}); use --op {instead}"
        raise RWKVDishaError(msg) from e


def register_wkv_autograd(forward_op, backward_op) -> None:
    """Make a WKV kernel's custom op differentiable through its backward op.

    forward_op  (*inputs, s0, save) -> (y, s_T, *saved)        saved: what the kernel keeps for backward
    backward_op (*inputs, *saved, dy, ds_T) -> the gradients of (*inputs, s0)

    Unused outputs' gradients arrive as None, not as zeros of the saved tensors' size."""

    def setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*inputs[:-2], *output[2:])

    def backward(ctx, dy, ds_last, *_):
        saved = ctx.saved_tensors
        dy, ds_last = output_grads(saved[0], dy, ds_last, saved[0].dtype)
        return (*backward_op(*saved, dy, ds_last), None)  # None: `save` is no tensor

    forward_op.register_autograd(backward, setup_context=setup_context)


def _built_before(name: str) -> bool:
    """Whether torch's extension cache holds a build of ``name`` (True when that cannot be told)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory  # private: where load() builds
    except ImportError:
        return True
    return (Path(_get_build_directory(name, verbose=False)) / f"{name}.so").is_file()


def output_grads(r, dy, ds_last, dy_dtype) -> tuple:
    """The gradients a WKV autograd Function's backward receives, as its kernel takes them: an unused
    output's None as zeros, dy (B, T, H, N) in ``dy_dtype``, ds_last (B, H, N, N) fp32, both contiguous."""
    import torch

    B, _, H, N = r.shape
    dy = torch.zeros_like(r, dtype=dy_dtype) if dy is None else dy.to(dy_dtype).contiguous()
    if ds_last is None:  # the final state fed nothing
        ds_last = r.new_zeros(B, H, N, N, dtype=torch.float32)
    return dy, ds_last.float().contiguous()


def backward_to_come(*xs) -> bool:
    """Whether autograd will ask these tensors' kernel for gradients; if not, its forward keeps nothing for a
    backward. Asked before the autograd Function: inside its forward, grad mode is always off (and
    ``ctx.needs_input_grad`` is True under ``torch.no_grad()`` for inputs that require grad)."""
    import torch

    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)
