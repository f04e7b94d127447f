"""Quantized frozen base (--quant int8 / nf4 / fp4) through bitsandbytes, on CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("bitsandbytes")

from adapter_helpers import quantize_dequantize_ref  # noqa: E402

from rwkv_disha.adapters import BatLinear, BoneLinear, LoRALinear  # noqa: E402
from rwkv_disha.adapters.quant import QuantizedWeight, dense_weight, quantized_linear  # noqa: E402
from rwkv_disha.errors import RWKVDishaError  # noqa: E402

MODES = ["int8", "nf4", "fp4"]


def _weight(out_f=256, in_f=192, seed=1):
    return torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.mark.parametrize("mode,max_ratio", [("int8", 0.27), ("nf4", 0.15), ("fp4", 0.15)])
def test_quantized_storage_really_shrinks(mode, max_ratio):
    w = _weight(1024, 768)
    q = QuantizedWeight(w, mode)
    dense = w.numel() * w.element_size()
    assert q.nbytes() <= max_ratio * dense, f"{mode}: {q.nbytes()} bytes vs {dense} dense"
    # the packed buffer is all the module keeps: no dense copy hides in it
    kept = sum(t.numel() * t.element_size() for t in q.buffers())
    assert kept <= q.nbytes()
    layer = BoneLinear(w, 64)
    layer.quantize_base(mode)
    assert not any(p.shape == w.shape for p in layer.parameters())


@pytest.mark.parametrize("mode", MODES)
def test_dequantized_weight_is_close_and_deterministic(mode):
    w = _weight()
    q = QuantizedWeight(w, mode)
    deq = q.dequantized_weight()
    assert deq.shape == w.shape and deq.dtype == torch.float32
    tol = 0.02 if mode == "int8" else 0.2
    assert (deq - w).abs().max() <= tol * w.abs().max()
    torch.testing.assert_close(
        quantize_dequantize_ref(w, mode), deq, rtol=0, atol=0
    )  # the reference the merge tests use
    torch.testing.assert_close(
        quantize_dequantize_ref(w.bfloat16(), mode), quantize_dequantize_ref(w.bfloat16(), mode)
    )


@pytest.mark.parametrize("mode", MODES)
def test_quantized_linear_forward_backward(mode):
    q = QuantizedWeight(_weight(), mode)
    w = q.dequantized_weight()
    x = torch.randn(3, 5, 192, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    g = torch.randn(3, 5, 256)
    (quantized_linear(x, q) * g).sum().backward()
    (F.linear(x_ref, w) * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    # the dense weight is not kept alive for backward
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        quantized_linear(x, q)
    assert (256, 192) not in saved


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "make", [lambda w: BoneLinear(w, 40), lambda w: BatLinear(w, 32), lambda w: LoRALinear(w, 8, 16.0)]
)
def test_adapter_on_quantized_base_equals_its_merge(mode, make):
    layer = make(_weight())
    layer.quantize_base(mode)
    with torch.no_grad():
        for p in layer.adapter_parameters().values():
            p.copy_(torch.randn(p.shape) * 0.05)
    assert all(p.dtype == torch.float32 for p in layer.adapter_parameters().values())  # adapter stays fp32
    x = torch.randn(2, 6, 192)
    y = layer(x)
    torch.testing.assert_close(
        y, F.linear(x, layer.merged_weight()), rtol=1e-5, atol=1e-5 * y.abs().max().item()
    )
    # merged_weight() sees the dequantized base, as merge --quant does
    torch.testing.assert_close(
        layer.merged_weight() - layer.delta_weight(), quantize_dequantize_ref(_weight(), mode)
    )


def test_module_to_dtype_keeps_quantization_statistics():
    layer = BoneLinear(_weight(), 64)
    layer.quantize_base("nf4")
    before = dense_weight(layer.weight)
    layer.to(torch.bfloat16)
    assert layer.weight.packed.dtype == torch.uint8
    torch.testing.assert_close(dense_weight(layer.weight), before, rtol=0, atol=0)
    assert layer.disha.dtype == torch.bfloat16  # the caller asked for it; the base codes did not change


def test_bf16_autocast_forward_backward():
    layer = BoneLinear(_weight(), 64)
    layer.quantize_base("int8")
    with torch.no_grad():
        layer.disha.normal_(0, 0.05)
    x = torch.randn(2, 6, 192, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.disha.grad is not None
    ref = F.linear(x.detach(), layer.merged_weight())
    assert (y.float() - ref).abs().max() <= 0.03 * ref.abs().max()


def test_unknown_quant_mode_is_refused():
    with pytest.raises(RWKVDishaError, match="unknown --quant 'int4'"):
        QuantizedWeight(_weight(), "int4")


def test_quantizing_prints_nothing():
    """bitsandbytes' import warns, on a CPU with AVX-512 BF16, about an optional hub kernel for 4-bit
    matmuls that quantizing never uses: a --quant run keeps that line off the user's terminal."""
    import subprocess
    import sys

    code = "import torch, rwkv_disha.adapters.quant as q; q.QuantizedWeight(torch.ones(8, 64), 'nf4')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "kernels-community" not in done.stderr and done.stdout == ""
