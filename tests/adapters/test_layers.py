"""Adapter layers on plain weights: forward == x @ merged_weight()^T, the formulas of docs/ADAPTERS.md,
gradients, no ΔW in Bone, Bat against an independent per-block loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rwkv_disha.adapters import BatLinear, BoneLinear, LoRALinear
from rwkv_disha.adapters import bone as bone_module
from rwkv_disha.errors import RWKVDishaError

torch.manual_seed(0)


def _random_adapter(layer, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.adapter_parameters().values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return layer


def _weight(out_f, in_f, seed=1):
    return torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed))


LAYERS = [
    pytest.param(lambda w: BoneLinear(w, 16), id="bone-r16"),
    pytest.param(lambda w: BoneLinear(w, 48), id="bone-r48-padded"),  # 80 % 48 != 0
    pytest.param(lambda w: BoneLinear(w, 80), id="bone-r=in"),
    pytest.param(lambda w: BatLinear(w, 16), id="bat-r16"),
    pytest.param(lambda w: LoRALinear(w, 8, 32.0), id="lora-r8"),
]


@pytest.mark.parametrize("make", LAYERS)
def test_zero_init_equals_base(make):
    w = _weight(96, 80)
    layer = make(w)
    x = torch.randn(3, 7, 80)
    torch.testing.assert_close(layer(x), F.linear(x, w), rtol=0, atol=0)
    assert layer.delta_weight().abs().max() == 0


@pytest.mark.parametrize("make", LAYERS)
def test_forward_equals_merged_weight(make):
    w = _weight(96, 80)
    layer = _random_adapter(make(w))
    x = torch.randn(3, 7, 80)
    y = layer(x)
    assert layer.delta_weight().abs().max() > 0
    torch.testing.assert_close(
        y, F.linear(x, layer.merged_weight()), rtol=1e-5, atol=1e-5 * y.abs().max().item()
    )


@pytest.mark.parametrize("make", LAYERS)
def test_merge_is_pure_and_fp32(make):
    w = _weight(96, 80)
    layer = _random_adapter(make(w.clone()))
    first, second = layer.merged_weight(), layer.merged_weight()
    assert first.dtype == torch.float32 and first.shape == (96, 80)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(layer.weight, w, rtol=0, atol=0)  # the base is untouched


@pytest.mark.parametrize("make", LAYERS)
def test_gradients_match_merged_weight_and_only_adapter_trains(make):
    w = _weight(96, 80)
    layer = _random_adapter(make(w))
    assert not layer.weight.requires_grad
    x = torch.randn(2, 5, 80)
    target = torch.randn(2, 5, 96)
    ((layer(x) - target) ** 2).sum().backward()
    ours = {n: p.grad.clone() for n, p in layer.adapter_parameters().items()}
    assert layer.weight.grad is None
    # reference: differentiate through W + delta_weight() built from the same parameters
    params = {n: p.detach().clone().requires_grad_() for n, p in layer.adapter_parameters().items()}
    if isinstance(layer, BoneLinear):
        delta = bone_module.bone_delta(params["disha"], 80)
    elif isinstance(layer, BatLinear):
        delta = bat_weight_ref(w, params["disha"]) - w
    else:
        delta = params["lora_B"] @ params["lora_A"] * layer.scale
    ((F.linear(x, w + delta) - target) ** 2).sum().backward()
    for n, g in ours.items():
        torch.testing.assert_close(
            g, params[n].grad, rtol=1e-4, atol=1e-4 * params[n].grad.abs().max().item()
        )


def test_bone_matches_the_formula_elementwise():
    w = _weight(12, 10)
    layer = _random_adapter(BoneLinear(w, 4))  # 10 % 4 != 0: the last block is padded
    expected = w.clone()
    for o in range(12):
        for i in range(10):
            expected[o, i] += layer.disha[i % 4, o]
    torch.testing.assert_close(layer.merged_weight(), expected, rtol=0, atol=1e-6)


def test_bat_matches_the_formula_blockwise():
    r = 4
    w = _weight(8, 12)
    layer = _random_adapter(BatLinear(w, r))
    assert layer.disha.shape == (12 // r, r, r)  # indexed by the INPUT block (RWKV-PEFT layout)
    expected = w.clone()
    for a in range(8 // r):
        for b in range(12 // r):
            blk = w[a * r : (a + 1) * r, b * r : (b + 1) * r]
            expected[a * r : (a + 1) * r, b * r : (b + 1) * r] = blk + blk @ layer.disha[b] + layer.disha[b]
    torch.testing.assert_close(layer.merged_weight(), expected, rtol=1e-6, atol=1e-6)


def bat_weight_ref(w: torch.Tensor, disha: torch.Tensor) -> torch.Tensor:
    """W' (out, in) block by block, from docs/ADAPTERS.md alone: W'[a, b] = W[a, b] (I + disha[b]) + disha[b],
    with disha (in/r, r, r) indexed by the INPUT block b. Differentiable in disha; no batched products."""
    r = disha.shape[1]
    rows = []
    for a in range(w.shape[0] // r):
        row = []
        for b in range(w.shape[1] // r):
            blk = w[a * r : (a + 1) * r, b * r : (b + 1) * r]  # (r, r)
            row.append(blk + blk @ disha[b] + disha[b])
        rows.append(torch.cat(row, dim=1))
    return torch.cat(rows, dim=0)


def bat_forward_ref(x: torch.Tensor, w: torch.Tensor, disha: torch.Tensor) -> torch.Tensor:
    """y (..., out) = x @ W'^T summed block by block: y[a] = sum over b of x[b] @ W'[a, b]^T."""
    r = disha.shape[1]
    out_blocks = []
    for a in range(w.shape[0] // r):
        acc = 0
        for b in range(w.shape[1] // r):
            blk = w[a * r : (a + 1) * r, b * r : (b + 1) * r]
            acc = acc + x[..., b * r : (b + 1) * r] @ (blk + blk @ disha[b] + disha[b]).t()
        out_blocks.append(acc)
    return torch.cat(out_blocks, dim=-1)


@pytest.mark.parametrize("out_f,in_f,r", [(12, 8, 4), (96, 80, 16), (32, 64, 32)])
def test_bat_forward_and_gradients_against_a_per_block_loop(out_f, in_f, r):
    """Bat's forward, input gradient and disha gradient against a loop over r x r blocks that never calls
    the package's Bat code (its batched product is otherwise only tested against itself)."""
    w = _weight(out_f, in_f)
    layer = _random_adapter(BatLinear(w, r), seed=3)
    disha_ref = layer.disha.detach().clone().requires_grad_()
    x = torch.randn(2, 5, in_f, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    g = torch.randn(2, 5, out_f)
    y = layer(x)
    y_ref = bat_forward_ref(x_ref, w, disha_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5 * y_ref.abs().max().item())
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5 * x_ref.grad.abs().max().item())
    torch.testing.assert_close(
        layer.disha.grad, disha_ref.grad, rtol=1e-5, atol=1e-5 * disha_ref.grad.abs().max().item()
    )
    assert layer.disha.grad.abs().max() > 0 and layer.weight.grad is None
    torch.testing.assert_close(
        layer.merged_weight(), bat_weight_ref(w, disha_ref.detach()), rtol=1e-6, atol=1e-6
    )


def test_lora_shapes_names_and_scale():
    layer = LoRALinear(_weight(96, 80), 8, 32.0, 0.0)
    assert layer.lora_A.shape == (8, 80) and layer.lora_B.shape == (96, 8)
    assert set(layer.adapter_parameters()) == {"lora_A", "lora_B"} and layer.scale == 4.0
    assert layer.lora_A.abs().max() > 0 and layer.lora_B.abs().max() == 0  # RWKV-PEFT's init


def test_bone_forward_never_builds_delta_weight(monkeypatch):
    layer = _random_adapter(BoneLinear(_weight(96, 80), 48))

    def forbidden(*args, **kwargs):
        raise AssertionError("Bone's forward must not materialise ΔW")

    monkeypatch.setattr(bone_module, "bone_delta", forbidden)
    x = torch.randn(2, 5, 80, requires_grad=True)
    layer(x).sum().backward()  # would raise if forward or backward built ΔW
    # and no (out, in)-sized tensor is saved for backward besides the frozen weight itself
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        layer(x)
    assert saved.count((96, 80)) <= 1


def test_adapters_are_fp32_and_follow_bf16_inputs():
    w = _weight(96, 80).bfloat16()
    for layer in (BoneLinear(w, 16), BatLinear(w, 16), LoRALinear(w, 8, 16.0)):
        _random_adapter(layer)
        assert all(p.dtype == torch.float32 for p in layer.adapter_parameters().values())
        x = torch.randn(2, 3, 80).bfloat16()
        y = layer(x)
        assert y.dtype == torch.bfloat16
        ref = F.linear(x.float(), layer.merged_weight())
        assert (y.float() - ref).abs().max() <= 0.03 * ref.abs().max()


def test_layer_constructors_refuse_bad_r():
    """The constructor and injection share each kind's one shape rule (and its message)."""
    w = _weight(96, 80)
    with pytest.raises(RWKVDishaError, match="Bone r=81 exceeds the input width 80 of this layer"):
        BoneLinear(w, 81)
    with pytest.raises(RWKVDishaError, match="Bat r=32 must divide both sides .* this layer is 96x80"):
        BatLinear(w, 32)  # 80 % 32 != 0
    with pytest.raises(RWKVDishaError, match="this layer is 100x80"):
        BatLinear(_weight(100, 80), 16)  # in divides, out does not
    with pytest.raises(RWKVDishaError, match="LoRA r=0 must be a positive integer"):
        LoRALinear(w, 0, 1.0)
    with pytest.raises(RWKVDishaError, match="Bone r=-1 must be a positive integer"):
        BoneLinear(w, -1)
    with pytest.raises(RWKVDishaError, match="LoRA r=81 exceeds the smaller side 80"):
        LoRALinear(w, 81, 1.0)


def test_bone_equals_hugging_face_peft_miss():
    """docs/ADAPTERS.md, "Bone": HF peft's MiSS (default mode) is Bone's math; needs peft installed."""
    peft = pytest.importorskip("peft")
    from peft import MissConfig, get_peft_model

    class Net(torch.nn.Module):
        def __init__(self, w):
            super().__init__()
            self.key = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            with torch.no_grad():
                self.key.weight.copy_(w)

        def forward(self, x):
            return self.key(x)

    r = 16
    w = _weight(96, 80)
    hf = get_peft_model(Net(w), MissConfig(r=r, target_modules=["key"]))
    ours = BoneLinear(w, r)
    hf_params = [p for n, p in hf.named_parameters() if "miss" in n.lower()]
    assert len(hf_params) == 1, f"peft {peft.__version__}: unexpected MiSS parameters"
    with torch.no_grad():
        p = hf_params[0]
        values = torch.randn(p.shape) * 0.1
        p.copy_(values)
        ours.disha.copy_(values if values.shape == ours.disha.shape else values.t())
    x = torch.randn(2, 5, 80)
    torch.testing.assert_close(ours(x), hf(x), rtol=1e-5, atol=1e-5)


def bone_forward_ref(layer: BoneLinear, x: torch.Tensor) -> torch.Tensor:
    """Bone's forward in plain autograd ops: x @ W^T + fold(x) @ disha (the fused node's reference)."""
    y = F.linear(x, layer.weight)  # (..., out)
    folded = bone_module.bone_fold_input(x, layer.r)  # (..., r)
    return y + folded @ layer.disha.to(y.dtype)


@pytest.mark.parametrize("in_f,r", [(80, 16), (80, 48), (96, 96)])
def test_bone_fused_autograd_node_equals_plain_autograd(in_f, r):
    """Bone's forward is one custom autograd node; it must match the same math in plain autograd ops."""
    layer = _random_adapter(BoneLinear(_weight(64, in_f), r))
    x = torch.randn(2, 5, in_f, requires_grad=True)
    g = torch.randn(2, 5, 64)
    (layer(x) * g).sum().backward()
    fused = (x.grad.clone(), layer.disha.grad.clone())
    x.grad, layer.disha.grad = None, None
    (bone_forward_ref(layer, x) * g).sum().backward()
    torch.testing.assert_close(fused[0], x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused[1], layer.disha.grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # and in inference (no grad, input not requiring grad)
        torch.testing.assert_close(
            layer(x.detach()), bone_forward_ref(layer, x.detach()), rtol=1e-6, atol=1e-6
        )
