"""RWKV-6 (x060) and RWKV-5.2 (x052): logits against BlinkDL's `rwkv` package, the layout table against
the module and init, the shape read back from tensors, the stateful forward, --my_testing."""

import pytest
import torch

from rwkv_disha import RWKVDishaError, load_model
from rwkv_disha.model.init import init_state_dict, make_config
from rwkv_disha.model.load import build_model, infer_config
from rwkv_disha.model.registry import get_version

VERSIONS = ("x060", "x052")


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    "n_layer,n_embd,head_size,vocab",
    [(2, 128, 64, 1000), (3, 96, 32, 777)],  # 2 heads of 64; 3 heads of 32 with a non-round vocabulary
)
def test_logits_match_rwkv_package(make_checkpoint, rwkv_oracle, version, n_layer, n_embd, head_size, vocab):
    path = make_checkpoint(n_layer, n_embd, vocab, seed=n_layer, head_size=head_size, version=version)
    tokens = torch.randint(0, vocab, (80,), generator=torch.Generator().manual_seed(1))
    model = load_model(path).eval()
    assert model.config.version == version and model.config.n_head == n_embd // head_size
    with torch.no_grad():
        ours = model(tokens[None])[0]
    ref = rwkv_oracle(path, tokens.tolist(), version=version)
    assert ref.std() > 0.1  # a degenerate model would make the comparison meaningless
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("shape", [(1, 64, 50, 64), (3, 96, 300, 32)])
def test_tensor_shapes_equal_the_module_and_init(version, shape):
    n_layer, n_embd, vocab, head = shape
    cfg = make_config(n_layer, n_embd, vocab, head, version)
    want = get_version(version).tensor_shapes(cfg)
    module = {k: tuple(t.shape) for k, t in build_model(cfg).state_dict().items()}
    sd = init_state_dict(n_layer, n_embd, vocab, head, version=version)
    assert want == module == {k: tuple(t.shape) for k, t in sd.items()}
    assert infer_config(sd) == cfg
    assert want["blocks.0.att.time_faaaa"] == (n_embd // head, head)
    assert want["blocks.0.ffn.key.weight"] == (int(3.5 * n_embd) // 32 * 32, n_embd)
    assert "blocks.0.att.gate.weight" in want and "blocks.0.ffn.receptance.weight" in want


def test_rwkv6_low_rank_widths_are_read_from_the_tensors():
    """Released RWKV-6 models differ in time_maa_w1/w2 and time_decay_w1/w2 widths: never assumed."""
    cfg = make_config(2, 128, 100, 64, "x060")
    cfg.d_mix, cfg.d_decay = 24, 40
    sd = {k: torch.randn(s) for k, s in get_version("x060").tensor_shapes(cfg).items()}
    assert sd["blocks.1.att.time_maa_w1"].shape == (128, 120)
    got = infer_config(sd)
    assert (got.d_mix, got.d_decay) == (24, 40) and got == cfg


def test_rwkv5_decay_is_per_head_and_constant_in_time():
    sd = init_state_dict(1, 64, 50, 32, version="x052", style="random")
    assert sd["blocks.0.att.time_decay"].shape == (2, 32)
    assert not any("time_maa" in k or "_w1" in k for k in sd)


@pytest.mark.parametrize("version", VERSIONS)
def test_two_pieces_with_state_equal_one_piece(make_checkpoint, version):
    model = load_model(make_checkpoint(2, 64, 300, head_size=32, version=version)).eval()
    idx = torch.randint(0, 300, (2, 50), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole, s_whole = model(idx, return_state=True)
        first, s = model(idx[:, :21], return_state=True)
        second, s2 = model(idx[:, 21:], state=s, return_state=True)
        s_tok, steps = None, []
        for t in range(6):  # token by token, as generation does
            out, s_tok = model(idx[:, t : t + 1], state=s_tok, return_state=True)
            steps.append(out)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(steps, dim=1), whole[:, :6], atol=2e-5, rtol=1e-5)
    for a, b in zip(s2, s_whole):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("version", VERSIONS)
def test_loop_op_grad_cp_and_gradients(make_checkpoint, version):
    path = make_checkpoint(2, 64, 300, head_size=32, version=version)
    idx = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(3))
    grads = []
    for op, cp in (("torch", False), ("loop", False), ("torch", True)):
        model = load_model(path, op=op).train()
        model.grad_cp = cp
        model(idx).logsumexp(-1).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for other in grads[1:]:
        assert other.keys() == grads[0].keys()
        for n in grads[0]:
            torch.testing.assert_close(other[n], grads[0][n], atol=1e-5, rtol=1e-4, msg=n)
    assert all(g.abs().sum() > 0 for n, g in grads[0].items() if "time_" in n)  # every time_* tensor matters


@pytest.mark.parametrize(
    "version,flag,other",
    [("x060", "x070", "RWKV-7"), ("x052", "x060", "RWKV-6"), ("x060", "x052", "RWKV-5.2")],
)
def test_my_testing_must_match_the_file(make_checkpoint, version, flag, other):
    path = make_checkpoint(1, 64, 50, head_size=32, version=version)
    name = get_version(version).name
    match = rf"--my_testing {flag} \({other}\) disagrees .* is {name} \({version}"
    with pytest.raises(RWKVDishaError, match=match):
        load_model(path, my_testing=flag)
    assert load_model(path, my_testing=version.upper()).config.version == version


@pytest.mark.parametrize("version,n_targets", [("x070", 6), ("x060", 8), ("x052", 8)])
def test_default_adapter_targets_come_from_the_version(make_checkpoint, version, n_targets):
    """Bone / Bat / LoRA (+ int8 base) on every default layer; randomised adapters change the logits and
    the merged weights give the same logits as the adapter layers."""
    from rwkv_disha.adapters import AdapterConfig, adapter_modules, inject_adapters

    path = make_checkpoint(1, 64, 50, head_size=32, version=version)
    idx = torch.randint(0, 50, (1, 12), generator=torch.Generator().manual_seed(4))
    for peft, disha, lora, quant in (
        ("disha", '{"mode":"bone","r":16}', "", "none"),
        ("disha", '{"mode":"bat","r":16}', "", "none"),
        ("lora", "", '{"lora_r":4,"lora_alpha":8}', "int8"),
    ):
        model = load_model(path).eval()
        base = model(idx)
        cfg = AdapterConfig.from_cli(peft, disha, lora, quant=quant)
        names = inject_adapters(model, cfg)
        model.eval()  # the new layers too (LoRA's dropout)
        assert cfg.targets == list(get_version(version).adapter_targets) and len(names) == n_targets
        with torch.no_grad():
            for _, layer in adapter_modules(model):
                for p in layer.adapter_parameters().values():
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
            adapted = model(idx)
            for name, layer in adapter_modules(model):
                merged = torch.nn.Linear(layer.weight.shape[1], layer.weight.shape[0], bias=False)
                merged.weight.copy_(layer.merged_weight())
                model.set_submodule(name, merged)
            from_merged = model(idx)
        assert not torch.allclose(adapted, base, atol=1e-3)
        torch.testing.assert_close(from_merged, adapted, atol=1e-4, rtol=1e-4)
