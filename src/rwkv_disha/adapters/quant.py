"""Quantized storage for a frozen base weight (``--quant int8|nf4|fp4``), through bitsandbytes.

    dense W (out, in) --quantize once--> packed codes + per-block absmax   (int8 ~1 byte/param, nf4 ~0.56)
    forward:   y = x @ dequant(W)^T      dequantized on the fly, never stored
    backward:  dx = dy @ dequant(W)      dequantized again; no weight gradient (W is frozen)

The quantization always starts from the fp32 value of the weight and runs on CPU (the codes then move to the
weight's device); dequantization gives fp32 first. So ``merge --quant``, which quantizes the same weights on
CPU, sees exactly the base that the training forward used, on CPU or CUDA. The adapter parameters are never
quantized.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from rwkv_disha.choices import QUANT_MODES
from rwkv_disha.errors import RWKVDishaError

Tensor = torch.Tensor

INT8_BLOCKSIZE = 256  # absmax per 256 weights: +1.6 % over the 1-byte codes
FOUR_BIT_BLOCKSIZE = 64  # bitsandbytes' default for nf4 / fp4


def _bnb_functional():
    # On a CPU with AVX-512 BF16, importing bitsandbytes warns that its optional hub kernel for 4-bit matmuls
    # is missing; we only quantize and dequantize, which never use it, so that warning is noise to a user
    cpu_ops_log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = cpu_ops_log.level
    cpu_ops_log.setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:
        raise RWKVDishaError(
            "--quant needs bitsandbytes, which is not installed: pip install 'bitsandbytes>=0.45' "
            "(or pip install -e '.[quant]'), or drop --quant"
        ) from None
    finally:
        cpu_ops_log.setLevel(level)
    return bnbf


def check_quant_mode(mode: str) -> str:
    """Normalise ``mode`` ("" / "none" -> "none"); refuse unknown modes."""
    mode = (mode or "none").strip().lower()
    if mode != "none" and mode not in QUANT_MODES:
        raise RWKVDishaError(f"unknown --quant {mode!r}: use none, {', '.join(QUANT_MODES)}")
    return mode


class QuantizedWeight(nn.Module):
    """A frozen (out, in) weight held quantized; ``dequantized_weight()`` rebuilds the dense tensor.

    The packed codes are a non-persistent buffer (the base model file, not the training checkpoint, is
    the source of base weights), and ``model.to(dtype)`` never touches the quantization statistics.
    """

    def __init__(self, weight: Tensor, mode: str):
        super().__init__()
        mode = check_quant_mode(mode)
        if mode == "none":
            raise RWKVDishaError("QuantizedWeight needs a quant mode (int8, nf4 or fp4), got none")
        if weight.dim() != 2:
            raise RWKVDishaError(f"only 2-D weights can be quantized, got shape {tuple(weight.shape)}")
        bnbf = _bnb_functional()
        self.mode = mode
        self.shape = weight.shape  # (out, in)
        self.orig_dtype = weight.dtype
        # Always quantized on CPU: bitsandbytes' CUDA int8 kernel picks a neighbouring code for ~0.2 % of
        # the weights (measured on an H100); merge runs on CPU, so this keeps training and merge identical.
        w32 = weight.detach().to("cpu", torch.float32).contiguous()
        with torch.no_grad():
            if mode == "int8":
                packed, state = bnbf.quantize_blockwise(w32, blocksize=INT8_BLOCKSIZE)
            else:
                packed, state = bnbf.quantize_4bit(w32, blocksize=FOUR_BIT_BLOCKSIZE, quant_type=mode)
        if weight.device.type != "cpu":
            packed = packed.to(weight.device)
            state.to(weight.device)
        self.register_buffer("packed", packed, persistent=False)
        self._state = state

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the weight had before quantization."""
        return self.orig_dtype

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """The dense (out, in) weight: fp32 dequantization, then cast to ``dtype`` (default fp32)."""
        bnbf = _bnb_functional()
        with torch.no_grad():
            if self.mode == "int8":
                w = bnbf.dequantize_blockwise(self.packed, self._state)
            else:
                w = bnbf.dequantize_4bit(self.packed, self._state)
        w = w.reshape(self.shape)
        return w if dtype is None or w.dtype == dtype else w.to(dtype)

    def nbytes(self) -> int:
        """Bytes held by the quantized weight (codes + statistics)."""
        st = self._state
        n = self.packed.numel() * self.packed.element_size()
        for t in (st.absmax, st.code):
            if t is not None:
                n += t.numel() * t.element_size()
        return n

    def _apply(self, fn, recurse=True):
        # Module.to / .cuda / .half call fn on every buffer; the uint8 codes only move device (dtype casts
        # skip integer tensors), and the float statistics follow them without changing dtype.
        super()._apply(fn, recurse)
        if self._state.absmax.device != self.packed.device:
            self._state.to(self.packed.device)
        return self

    def extra_repr(self) -> str:
        return f"{self.mode}, shape={tuple(self.shape)}, {self.nbytes() / 2**20:.2f} MiB"


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a matmul on ``x`` runs in: autocast's dtype when autocast is on, else x's."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


class _DequantLinear(torch.autograd.Function):
    """y = x @ dequant(W)^T, with W dequantized again in backward instead of being saved."""

    @staticmethod
    def forward(ctx, x: Tensor, qweight: QuantizedWeight) -> Tensor:
        dtype = compute_dtype(x)
        ctx.qweight, ctx.dtype, ctx.x_dtype = qweight, dtype, x.dtype
        return F.linear(x.to(dtype), qweight.dequantized_weight(dtype))

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        w = ctx.qweight.dequantized_weight(ctx.dtype)  # (out, in)
        grad_x = grad_out.to(ctx.dtype) @ w if ctx.needs_input_grad[0] else None
        return (None if grad_x is None else grad_x.to(ctx.x_dtype)), None


def dense_weight(weight: Tensor | QuantizedWeight, dtype: torch.dtype | None = None) -> Tensor:
    """A frozen base weight as a dense (out, in) tensor, no grad: dequantized (fp32, or ``dtype``) if it is
    quantized, else the weight itself (cast to ``dtype`` when given)."""
    if isinstance(weight, QuantizedWeight):
        return weight.dequantized_weight(dtype)
    w = weight.detach()
    return w if dtype is None or w.dtype == dtype else w.to(dtype)


def quantized_linear(x: Tensor, qweight: QuantizedWeight) -> Tensor:
    """``F.linear(x, dequant(W))`` without keeping the dense weight alive for backward."""
    return _DequantLinear.apply(x, qweight)
