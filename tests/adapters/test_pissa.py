"""PiSSA: the SVD start, zero training == base, merged == adapter logits, PiSSA -> plain LoRA of rank 2r."""

from __future__ import annotations

import pytest
import torch
from adapter_helpers import logits, rel_err, tokens

from rwkv_disha import load_model
from rwkv_disha.adapters import (
    AdapterConfig,
    inject_adapters,
    mark_trainable,
    open_adapter_file,
    save_adapter_file,
)
from rwkv_disha.adapters.merge import merge_adapter_file
from rwkv_disha.adapters.pissa import PissaLinear
from rwkv_disha.cli import main
from rwkv_disha.errors import RWKVDishaError


def _pissa(r=4, niter=4):
    return AdapterConfig.from_cli("pissa", pissa_config=f'{{"pissa_r":{r},"svd_niter":{niter}}}')


def test_start_is_the_top_r_singular_part():
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(40, 40))
    v, _ = torch.linalg.qr(torch.randn(24, 24))
    s = torch.tensor([10.0, 8.0, 6.0, 4.0] + [0.01] * 20)  # a clear gap after the 4th triplet
    w = (u[:, :24] * s) @ v.t()  # (40, 24)
    layer = PissaLinear(w, 4, svd_niter=4)
    exact = (u[:, :4] * s[:4]) @ v[:, :4].t()  # the best rank-4 part, from the exact SVD
    start = layer.pissa_B0 @ layer.pissa_A0
    torch.testing.assert_close(start, exact, rtol=0, atol=1e-4)
    assert torch.equal(layer.lora_A, layer.pissa_A0) and torch.equal(layer.lora_B, layer.pissa_B0)
    # balanced factors: A0 = sqrt(S) V^T, B0 = U sqrt(S): both have row / column norms sqrt(s_i)
    torch.testing.assert_close(layer.pissa_A0.norm(dim=1), s[:4].sqrt(), rtol=1e-4, atol=0)
    torch.testing.assert_close(layer.pissa_B0.norm(dim=0), s[:4].sqrt(), rtol=1e-4, atol=0)
    x = torch.randn(3, 24)
    torch.testing.assert_close(layer(x), x @ w.t(), rtol=0, atol=0)  # zero training: exactly the base


def test_forward_and_grads_equal_the_residual_form():
    """y = x (W - B0 A0 + B A)^T, gradients only into A and B."""
    w = torch.randn(12, 10)
    layer = PissaLinear(w, 3)
    with torch.no_grad():
        layer.lora_A.add_(torch.randn(3, 10) * 0.1)
        layer.lora_B.add_(torch.randn(12, 3) * 0.1)
    a, b = (
        layer.lora_A.detach().clone().requires_grad_(True),
        layer.lora_B.detach().clone().requires_grad_(True),
    )
    w_res = w - layer.pissa_B0.detach() @ layer.pissa_A0.detach()
    x = torch.randn(5, 10)
    y, y_ref = layer(x), x @ (w_res + b @ a).t()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(layer.lora_A.grad, a.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_B.grad, b.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.merged_weight(), w_res + (b @ a).detach(), rtol=1e-5, atol=1e-6)


def _trained_like(base, cfg, seed=3):
    """A PiSSA model whose trainable A, B moved away from the start (A0, B0 untouched)."""
    model = load_model(base, op="torch")
    inject_adapters(model, cfg)
    names = mark_trainable(model, cfg)
    assert not any(n.endswith(("pissa_A0", "pissa_B0")) for n in names)  # saved, never trained
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("lora_A", "lora_B")):
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def test_zero_training_is_the_base(make_checkpoint):
    base = make_checkpoint(2, 128, 300)
    model = load_model(base, op="torch")
    inject_adapters(model, _pissa())
    idx = tokens(300)
    assert rel_err(logits(model, idx), logits(load_model(base, op="torch"), idx)) <= 1e-6


def test_merged_logits_equal_adapter_logits_and_the_lora_export(make_checkpoint, tmp_path):
    base = make_checkpoint(2, 128, 300)
    cfg = _pissa(r=6, niter=2)
    model = _trained_like(base, cfg)
    save_adapter_file(model, cfg, tmp_path / "rwkv-0.pth")
    f = open_adapter_file(tmp_path / "rwkv-0.pth")
    assert f.cfg.layer_class is PissaLinear and f.cfg.r == 6
    merge_adapter_file(base, tmp_path / "rwkv-0.pth", tmp_path / "merged.pth")
    idx = tokens(300)
    ref = logits(model, idx)
    assert rel_err(ref, logits(load_model(base, op="torch"), idx)) > 1e-3
    assert rel_err(logits(load_model(tmp_path / "merged.pth", op="torch"), idx), ref) <= 1e-5
    # PiSSA -> plain LoRA of rank 2r (alpha 2r: scale 1), merged onto the released base: the same model
    argv = ["export", "--peft_checkpoint", str(tmp_path / "rwkv-0.pth"), "--format", "lora"]
    assert main([*argv, "--output", str(tmp_path / "lora.pth")]) == 0
    lora = open_adapter_file(tmp_path / "lora.pth")
    assert (lora.cfg.peft, lora.cfg.r, lora.cfg.lora_alpha) == ("lora", 12, 12.0)
    merge_adapter_file(base, tmp_path / "lora.pth", tmp_path / "merged-lora.pth")
    assert rel_err(logits(load_model(tmp_path / "merged-lora.pth", op="torch"), idx), ref) <= 1e-5


def test_refusals():
    with pytest.raises(
        RWKVDishaError, match="pissa_init completes an RWKV-PEFT PiSSA checkpoint given as pissa_load"
    ):
        AdapterConfig.from_cli("pissa", pissa_config='{"pissa_init":"init.pth"}')
    with pytest.raises(RWKVDishaError, match="svd_niter must be an integer >= 0"):
        AdapterConfig.from_cli("pissa", pissa_config='{"svd_niter":-1}')
    with pytest.raises(RWKVDishaError, match="unknown key.*lora_r: known keys are pissa_load, pissa_init"):
        AdapterConfig.from_cli("pissa", pissa_config='{"lora_r":8}')
    with pytest.raises(RWKVDishaError, match="PiSSA r=20 exceeds the smaller side 16"):
        PissaLinear(torch.zeros(16, 32), 20)
