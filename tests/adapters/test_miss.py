"""MiSS bat / mini (peft's layout): forward, gradients and merge against loops written here from the
formulas in docs/ADAPTERS.md; the --peft miss dialect's choices and refusals."""

from __future__ import annotations

import pytest
import torch
from adapter_helpers import adapted, logits, rel_err, tokens

from rwkv_disha import load_model
from rwkv_disha.adapters import AdapterConfig, save_adapter_file
from rwkv_disha.adapters.merge import merge_adapter_file
from rwkv_disha.adapters.miss import MissBatLinear, MissMiniLinear
from rwkv_disha.errors import RWKVDishaError


def miss_bat_ref(w: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """W'[a, b] = W[a, b] + W[a, b] @ block[a] + block[a], block by block."""
    r = block.shape[-1]
    rows = []
    for a in range(w.shape[0] // r):
        cols = []
        for b in range(w.shape[1] // r):
            wab = w[a * r : (a + 1) * r, b * r : (b + 1) * r]
            cols.append(wab + wab @ block[a] + block[a])
        rows.append(torch.cat(cols, 1))
    return torch.cat(rows, 0)


def miss_mini_delta_ref(block: torch.Tensor, out_f: int, in_f: int) -> torch.Tensor:
    """ΔW[o, i] = block[i mod r, o mod mini_r], element by element."""
    r, mini_r = block.shape
    d = torch.empty(out_f, in_f, dtype=block.dtype)
    for o in range(out_f):
        for i in range(in_f):
            d[o, i] = block[i % r, o % mini_r]
    return d


def _randomised(layer, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.adapter_parameters().values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return layer


@pytest.mark.parametrize("out_f,in_f,r", [(24, 16, 8), (16, 32, 4)])
def test_miss_bat_forward_grads_and_merge_equal_the_block_loop(out_f, in_f, r):
    w = torch.randn(out_f, in_f, dtype=torch.float64).float()
    layer = _randomised(MissBatLinear(w.clone(), r))
    assert layer.miss_block.shape == (out_f // r, r, r)  # indexed by OUTPUT block
    x = torch.randn(3, 5, in_f, requires_grad=True)
    y = layer(x)
    block = layer.miss_block.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    y_ref = x2 @ miss_bat_ref(w, block).t()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(layer.miss_block.grad, block.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.merged_weight(), miss_bat_ref(w, block.detach()), rtol=1e-5, atol=1e-6)
    assert layer.weight.grad is None  # the base stays frozen


@pytest.mark.parametrize("out_f,in_f,r,mini_r", [(24, 16, 8, 4), (16, 20, 8, 16), (32, 32, 4, 1)])
def test_miss_mini_forward_grads_and_merge_equal_the_element_loop(out_f, in_f, r, mini_r):
    w = torch.randn(out_f, in_f)
    layer = _randomised(MissMiniLinear(w.clone(), r, mini_r), seed=1)
    assert layer.miss_block.shape == (r, mini_r)
    x = torch.randn(2, 7, in_f, requires_grad=True)
    y = layer(x)
    block = layer.miss_block.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    delta = torch.stack(  # the same loop, differentiable in block
        [torch.stack([block[i % r, o % mini_r] for i in range(in_f)]) for o in range(out_f)]
    )
    y_ref = x2 @ (w + delta).t()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(layer.miss_block.grad, block.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.delta_weight(), miss_mini_delta_ref(block.detach(), out_f, in_f))


def test_zero_start_equals_the_base():
    w = torch.randn(16, 16)
    x = torch.randn(4, 16)
    for layer in (MissBatLinear(w, 4), MissMiniLinear(w, 4, 2)):
        torch.testing.assert_close(layer(x), x @ w.t(), rtol=0, atol=1e-6)


def test_shape_refusals():
    with pytest.raises(RWKVDishaError, match="MiSS bat r=3 must divide both sides"):
        MissBatLinear(torch.zeros(16, 12), 3)
    with pytest.raises(RWKVDishaError, match="mini_r=5 must divide the output width 16"):
        MissMiniLinear(torch.zeros(16, 12), 4, 5)
    with pytest.raises(RWKVDishaError, match="MiSS mini r=13 exceeds the input width 12"):
        MissMiniLinear(torch.zeros(16, 12), 13, 4)


@pytest.mark.parametrize(
    "text, kind, mode",
    [
        ('{"r":8}', "disha", "bone"),  # MiSS balance is Bone
        ('{"r":8,"init_weights":true}', "disha", "bone"),
        ('{"r":8,"init_weights":"bat"}', "miss", "miss_bat"),
        ('{"r":8,"init_weights":"mini","mini_r":4}', "miss", "miss_mini"),
    ],
)
def test_peft_miss_dialect_picks_the_kind(text, kind, mode):
    cfg = AdapterConfig.from_cli("miss", peft_config=text)
    assert (cfg.peft, cfg.mode, cfg.r) == (kind, mode, 8)
    assert cfg.targets == []  # the model's layers: peft's ["receptance","key","value","output"] on RWKV-7


@pytest.mark.parametrize(
    "text, message",
    [
        (
            '{"r":8,"alpha":2}',
            "has unknown key(s) alpha: known keys are r, init_weights, mini_r, miss_dropout",
        ),
        ('{"init_weights":"fancy"}', 'init_weights \'fancy\' is unknown: use true or "bat" or "mini"'),
        ('{"init_weights":false}', "init_weights 'false' is unknown"),
        ('{"miss_dropout":0.1}', "miss_dropout 0.1 is not supported"),
        ('{"target_modules":["gate_proj"]}', "target_modules 'gate_proj' names no RWKV Linear"),
        ('{"target_modules":"key"}', "target_modules has the wrong type"),
        ('{"r":"8"}', "r has the wrong type"),
        ('{"r":0}', "must be a positive integer"),
    ],
)
def test_peft_miss_dialect_refusals(text, message):
    with pytest.raises(RWKVDishaError, match=None) as e:
        AdapterConfig.from_cli("miss", peft_config=text)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "text", ['{"r":8,"init_weights":"bat"}', '{"r":16,"init_weights":"mini","mini_r":8}']
)
def test_merged_logits_equal_adapter_logits(make_checkpoint, tmp_path, text):
    base = make_checkpoint(2, 128, 300)
    cfg = AdapterConfig.from_cli("miss", peft_config=text)
    model = adapted(base, cfg, seed=5)
    save_adapter_file(model, cfg, tmp_path / "rwkv-0.pth")
    info = merge_adapter_file(base, tmp_path / "rwkv-0.pth", tmp_path / "merged.pth")
    assert info["layers"] == 12
    idx = tokens(300)
    ref = logits(model, idx)
    assert rel_err(ref, logits(load_model(base, op="torch"), idx)) > 1e-3
    assert rel_err(logits(load_model(tmp_path / "merged.pth", op="torch"), idx), ref) <= 1e-5
