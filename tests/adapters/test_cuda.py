"""The adapters on a CUDA device (skipped without one): quantized base, autocast, merge on CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from adapter_helpers import adapted, config, logits, rel_err, tokens

from rwkv_disha import load_model
from rwkv_disha.adapters import BatLinear, BoneLinear, LoRALinear, inject_adapters, save_adapter_file
from rwkv_disha.adapters.merge import merge_adapter_file

pytestmark = pytest.mark.gpu
MODES = ["int8", "nf4", "fp4"]


def _weight(out_f=512, in_f=384):
    return torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(1)) * 0.05


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "make", [lambda w: BoneLinear(w, 40), lambda w: BatLinear(w, 32), lambda w: LoRALinear(w, 8, 16.0)]
)
def test_quantized_layer_on_cuda_equals_its_merge(mode, make):
    pytest.importorskip("bitsandbytes")
    layer = make(_weight().cuda())
    layer.quantize_base(mode)
    with torch.no_grad():
        for p in layer.adapter_parameters().values():
            p.normal_(0, 0.05)
    x = torch.randn(2, 16, 384, device="cuda", requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert all(p.grad is not None for p in layer.adapter_parameters().values())
    torch.testing.assert_close(
        y, F.linear(x, layer.merged_weight()), rtol=1e-4, atol=1e-4 * y.abs().max().item()
    )


@pytest.mark.parametrize("mode", MODES)
def test_cuda_weight_gets_the_cpu_codes(mode):
    """merge runs on CPU; a model trained with --quant on CUDA must dequantize to the same base, bit for bit
    (bitsandbytes' CUDA int8 kernel alone would round ~0.2 % of the weights to a neighbouring code)."""
    pytest.importorskip("bitsandbytes")
    from adapter_helpers import quantize_dequantize_ref

    from rwkv_disha.adapters.quant import QuantizedWeight

    w = _weight()
    on_gpu = QuantizedWeight(w.cuda(), mode)
    assert on_gpu.packed.is_cuda and on_gpu._state.absmax.is_cuda
    torch.testing.assert_close(
        on_gpu.dequantized_weight().cpu(), quantize_dequantize_ref(w, mode), rtol=0, atol=0
    )
    moved = QuantizedWeight(w, mode).cuda().dequantized_weight().cpu()
    torch.testing.assert_close(moved, quantize_dequantize_ref(w, mode), rtol=0, atol=0)


def test_bf16_autocast_on_cuda():
    pytest.importorskip("bitsandbytes")
    layer = BoneLinear(_weight().cuda(), 64)
    layer.quantize_base("nf4")
    x = torch.randn(2, 16, 384, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.disha.grad.dtype == torch.float32


@pytest.mark.parametrize("kind,r,quant", [("bone", 48, "none"), ("bat", 32, "nf4"), ("lora", 8, "int8")])
def test_cuda_trained_adapter_merges_on_cpu(make_checkpoint, tmp_path, kind, r, quant):
    if quant != "none":
        pytest.importorskip("bitsandbytes")
    base = make_checkpoint(2, 128, 300)
    cfg = config(kind, r, quant=quant)
    model = load_model(base, op="torch").cuda()
    inject_adapters(model, cfg)
    ref_model = adapted(base, cfg, seed=21)  # CPU, same randomised adapter
    model.load_state_dict(ref_model.state_dict(), strict=False)
    idx = tokens(300)
    on_gpu = logits(model.eval(), idx.cuda()).cpu()
    save_adapter_file(model, cfg, tmp_path / "rwkv-0.pth")
    merge_adapter_file(base, tmp_path / "rwkv-0.pth", tmp_path / "m.pth")
    merged = logits(load_model(tmp_path / "m.pth", op="torch"), idx)
    assert rel_err(merged, on_gpu) <= 1e-4  # TF32 / kernel differences only


def test_quantized_model_memory_on_cuda(make_checkpoint):
    pytest.importorskip("bitsandbytes")
    base = make_checkpoint(2, 768, 1000)
    torch.cuda.empty_cache()
    start = torch.cuda.memory_allocated()
    dense = load_model(base, op="torch").cuda()
    dense_bytes = torch.cuda.memory_allocated() - start
    del dense
    torch.cuda.empty_cache()
    start = torch.cuda.memory_allocated()
    model = load_model(base, op="torch")
    inject_adapters(model, config("bone", 64, quant="nf4"))
    model.cuda()
    quant_bytes = torch.cuda.memory_allocated() - start
    # the 12 adapted layers hold 14.2 M of the 16.6 M weights; nf4 keeps ~0.56 of their 4 bytes, and the
    # fp32 Bone adapters add 0.9 M weights: ~21 MB against ~66 MB dense
    assert quant_bytes < 0.4 * dense_bytes, (quant_bytes, dense_bytes)
