"""Injection into RWKV-7, what trains, adapter files (ours and RWKV-PEFT's), strict loading."""

from __future__ import annotations

import json

import pytest
import torch
from adapter_helpers import adapted, config, logits, randomise, rel_err, tokens

from rwkv_disha import load_model
from rwkv_disha.adapters import (
    AdapterLinear,
    adapter_state_dict,
    inject_adapters,
    load_adapter_file,
    mark_trainable,
    save_adapter_file,
)
from rwkv_disha.adapters.adapter_file import infer_adapter_config
from rwkv_disha.errors import RWKVDishaError
from rwkv_disha.model.load import load_state_dict

LN_KEYS = lambda sd: [k for k in sd if ".ln" in f".{k}"]  # noqa: E731  ln0/ln1/ln2/ln_x/ln_out


@pytest.fixture(scope="module")
def base(make_checkpoint):
    return make_checkpoint(2, 128, 300)


@pytest.mark.parametrize("kind,r", [("bone", 64), ("bat", 32), ("lora", 8)])
def test_base_keys_keep_their_names(base, kind, r):
    model = load_model(base, op="torch")
    official = list(model.state_dict())
    names = inject_adapters(model, config(kind, r))
    assert len(names) == 12 and all(isinstance(model.get_submodule(n), AdapterLinear) for n in names)
    suffixes = ("disha",) if kind != "lora" else ("lora_A", "lora_B")
    added = [k for k in model.state_dict() if k not in official]
    assert sorted(added) == sorted(f"{n}.{s}" for n in names for s in suffixes)
    assert all(k in model.state_dict() for k in official)
    # a base checkpoint still loads strictly into the adapted model; only adapter keys are "missing"
    result = model.load_state_dict(load_state_dict(base), strict=False)
    assert result.unexpected_keys == [] and sorted(result.missing_keys) == sorted(added)


def test_zero_init_adapted_model_equals_base(base):
    idx = tokens(300)
    ref = logits(load_model(base, op="torch"), idx)
    for kind, r in (("bone", 48), ("bat", 32)):
        model = load_model(base, op="torch")
        inject_adapters(model, config(kind, r))
        assert rel_err(logits(model, idx), ref) == 0


@pytest.mark.parametrize(
    "parts,expected_extra",
    [
        (["time", "ln"], LN_KEYS),
        ([], lambda sd: []),
        (["emb", "head"], lambda sd: ["emb.weight", "head.weight"]),
    ],
)
def test_mark_trainable_and_adapter_state_dict(base, parts, expected_extra):
    cfg = config("bone", 64, train_parts=parts)
    model = load_model(base, op="torch")
    inject_adapters(model, cfg)
    trainable = mark_trainable(model, cfg)
    sd = model.state_dict()
    adapter_keys = [k for k in sd if k.endswith(".disha")]
    assert sorted(trainable) == sorted(adapter_keys + expected_extra(sd))
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == sorted(trainable)
    saved = adapter_state_dict(model, cfg)
    assert list(saved) == [k for k in sd if k in set(trainable)]  # exactly these, in model order
    assert all(not t.requires_grad and t.device.type == "cpu" for t in saved.values())


def test_only_trainable_tensors_change_in_training(base):
    cfg = config("bone", 48)
    model = load_model(base, op="torch")
    inject_adapters(model, cfg)
    trainable = set(mark_trainable(model, cfg))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    idx = tokens(300)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == trainable


@pytest.mark.parametrize("kind,r", [("bone", 48), ("bat", 32), ("lora", 8)])
def test_save_then_load_restores_every_tensor(base, tmp_path, kind, r):
    cfg = config(kind, r)
    model = adapted(base, cfg, seed=3)
    path = save_adapter_file(model, cfg, tmp_path / "rwkv-3.pth")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rwkv-3.json", "rwkv-3.pth"]
    meta = json.loads((tmp_path / "rwkv-3.json").read_text())
    assert meta["adapter"]["peft"] == cfg.peft and meta["adapter"]["r"] == r
    assert meta["base"]["shape"]["n_embd"] == 128 and meta["tensors"] == len(adapter_state_dict(model, cfg))

    fresh = load_model(base, op="torch")
    inject_adapters(fresh, cfg)
    mark_trainable(fresh, cfg)
    loaded = load_adapter_file(fresh, path, cfg)
    assert sorted(loaded) == sorted(adapter_state_dict(model, cfg))
    for k, v in adapter_state_dict(model, cfg).items():
        torch.testing.assert_close(fresh.state_dict()[k], v, rtol=0, atol=0)
    idx = tokens(300)
    assert rel_err(logits(fresh.eval(), idx), logits(model, idx)) == 0


@pytest.mark.parametrize("kind,r,mode", [("bone", 48, "bone"), ("bat", 32, "bat"), ("lora", 8, None)])
def test_rwkv_peft_file_without_sidecar(base, tmp_path, kind, r, mode):
    """RWKV-PEFT writes only the tensors (bf16 in practice): mode and r come from the shapes."""
    cfg = config(kind, r)
    model = adapted(base, cfg, seed=4)
    path = tmp_path / "rwkv-0.pth"
    torch.save({k: v.bfloat16() for k, v in adapter_state_dict(model, cfg).items()}, path)
    inferred = infer_adapter_config(load_state_dict(path), lora_alpha=32.0)
    assert (inferred.peft, inferred.r, inferred.train_parts) == (cfg.peft, r, ["ln"])
    if mode:
        assert inferred.mode == mode
    fresh = load_model(base, op="torch")
    inject_adapters(fresh, cfg)
    load_adapter_file(fresh, path, cfg)
    for k, v in adapter_state_dict(model, cfg).items():
        torch.testing.assert_close(fresh.state_dict()[k], v.bfloat16().float(), rtol=0, atol=0)


# -- loading refuses what does not fit ------------------------------------------------------------------
@pytest.fixture
def saved(base, tmp_path):
    cfg = config("bone", 64)
    model = adapted(base, cfg, seed=5)
    path = save_adapter_file(model, cfg, tmp_path / "rwkv-1.pth")
    return cfg, path, adapter_state_dict(model, cfg)


def _fresh(base, cfg):
    model = load_model(base, op="torch")
    inject_adapters(model, cfg)
    mark_trainable(model, cfg)
    return model


def _expect(fn, *messages):
    with pytest.raises(RWKVDishaError) as e:
        fn()
    for m in messages:
        assert m in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_tensor(base, saved, tmp_path):
    cfg, _, tensors = saved
    del tensors["blocks.1.ffn.value.disha"]
    torch.save(tensors, tmp_path / "cut.pth")
    _expect(
        lambda: load_adapter_file(_fresh(base, cfg), tmp_path / "cut.pth", cfg),
        "lacks tensors blocks.1.ffn.value.disha",
        "same targets",
    )


def test_missing_train_parts_tensor(base, saved, tmp_path):
    cfg, _, tensors = saved
    torch.save({k: v for k, v in tensors.items() if k.endswith(".disha")}, tmp_path / "noln.pth")
    _expect(
        lambda: load_adapter_file(_fresh(base, cfg), tmp_path / "noln.pth", cfg),
        "lacks tensors blocks.0.ln0.weight",
        "pass the --train_parts used in training (none)",
    )


def test_unexpected_base_tensor(base, saved, tmp_path):
    cfg, _, tensors = saved
    tensors["emb.weight"] = load_state_dict(base)["emb.weight"]
    torch.save(tensors, tmp_path / "emb.pth")
    _expect(
        lambda: load_adapter_file(_fresh(base, cfg), tmp_path / "emb.pth", cfg),
        "unexpected tensors emb.weight",
        "pass the --train_parts used in training (ln emb)",
    )


def test_unexpected_adapter_tensor(base, saved):
    cfg, path, _ = saved
    narrow = config("bone", 64, targets=["att.key"])
    _expect(
        lambda: load_adapter_file(_fresh(base, narrow), path, narrow),
        "unexpected tensors blocks.0.att.receptance.disha",
        "set the same targets as in training",
    )


def test_file_for_another_model_shape(base, make_checkpoint, tmp_path):
    cfg = config("bone", 64)
    other = adapted(make_checkpoint(2, 192, 300), cfg)
    with_sidecar = save_adapter_file(other, cfg, tmp_path / "a" / "rwkv-0.pth")
    _expect(
        lambda: load_adapter_file(_fresh(base, cfg), with_sidecar, cfg),
        "was trained on a RWKV-7 L2 C192 V300",
        "but this base is RWKV-7 L2 C128 V300",
        "use the base model the adapter was trained on",
    )
    torch.save(adapter_state_dict(other, cfg), tmp_path / "peft.pth")  # no sidecar: shapes decide
    _expect(
        lambda: load_adapter_file(_fresh(base, cfg), tmp_path / "peft.pth", cfg),
        "does not fit this model (blocks.0.ln0.weight (192,) vs model (128,)",
        "use that base model",
    )


def test_file_for_another_base_of_the_same_shape(base, make_checkpoint, saved):
    cfg, path, _ = saved
    other_weights = make_checkpoint(2, 128, 300, seed=9)
    _expect(
        lambda: load_adapter_file(_fresh(other_weights, cfg), path, cfg),
        "different base model of the same shape",
    )


def test_other_mode_or_rank(base, saved):
    _, path, _ = saved
    bat = config("bat", 64)
    _expect(lambda: load_adapter_file(_fresh(base, bat), path, bat), "holds Bone r=64", "asks for Bat r=64")
    bone32 = config("bone", 32)
    _expect(lambda: load_adapter_file(_fresh(base, bone32), path, bone32), "asks for Bone r=32")


def test_lora_alpha_mismatch(base, tmp_path):
    cfg = config("lora", 8)
    path = save_adapter_file(adapted(base, cfg), cfg, tmp_path / "rwkv-2.pth")
    other = config("lora", 8)
    other.lora_alpha = 16.0
    _expect(
        lambda: load_adapter_file(_fresh(base, other), path, other),
        "trained with lora_alpha 32",
        "set lora_alpha",
    )


def test_base_model_given_as_adapter_and_missing_file(base, tmp_path):
    cfg = config("bone", 64)
    _expect(lambda: load_adapter_file(_fresh(base, cfg), base, cfg), "holds no *.disha", "not a base model")
    _expect(
        lambda: load_adapter_file(_fresh(base, cfg), tmp_path / "nope.pth", cfg), "adapter file not found"
    )
    _expect(
        lambda: load_adapter_file(load_model(base, op="torch"), tmp_path / "x.pth", cfg),
        "inject_adapters first",
    )


def test_bad_sidecar(base, saved):
    cfg, path, _ = saved
    path.with_suffix(".json").write_text("{oops")
    _expect(
        lambda: load_adapter_file(_fresh(base, cfg), path, cfg),
        "is not valid JSON",
        "delete it or restore it",
    )


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_quantized_injection_really_drops_memory(base, mode):
    pytest.importorskip("bitsandbytes")
    cfg = config("bone", 64, quant=mode)
    model = load_model(base, op="torch")
    dense = sum(
        m.weight.numel() * m.weight.element_size()
        for n, m in model.named_modules()
        if n.endswith(("key", "value", "receptance", "output")) and isinstance(m, torch.nn.Linear)
    )
    names = inject_adapters(model, cfg)
    quantized = sum(model.get_submodule(n).weight.nbytes() for n in names)
    assert quantized <= (0.27 if mode == "int8" else 0.16) * dense
    assert not any(k.endswith(("att.key.weight", "ffn.value.weight")) for k in model.state_dict())
    randomise(model)
    assert torch.isfinite(logits(model, tokens(300))).all()


@pytest.mark.parametrize("version", ["x060", "x052"])
def test_rwkv6_and_5_adapters_refuse_another_base_of_the_same_shape(make_checkpoint, tmp_path, version):
    """RWKV-6 / 5.2 have no r_k / k_k / w0: their fingerprint hashes the first rows of emb and head. The
    adapter loads onto its own base, also in bf16, and is refused by another base of the same shape."""
    cfg = config("bone", 32)
    own = make_checkpoint(1, 64, 300, version=version, seed=1)
    path = save_adapter_file(adapted(own, cfg), cfg, tmp_path / "rwkv-0.pth")
    base = json.loads(path.with_suffix(".json").read_text())["base"]
    assert sorted(base["checksums"]) == ["emb.weight[:16]", "head.weight[:16]"]
    load_adapter_file(_fresh(own, cfg), path, cfg)
    bf16 = load_model(own, op="torch", dtype=torch.bfloat16)
    inject_adapters(bf16, cfg)
    load_adapter_file(bf16, path, cfg)
    other = make_checkpoint(1, 64, 300, version=version, seed=2)
    refused = "different base model of the same shape"
    _expect(lambda: load_adapter_file(_fresh(other, cfg), path, cfg), refused)


def test_rwkv7_fingerprint_hashes_whole_tensors(make_checkpoint):
    """Sidecars written before the row limit existed hashed all of r_k (H, N): a model with more than 16
    heads must still give the same checksums, or its older adapter files would be refused."""
    from rwkv_disha.adapters import base_fingerprint

    path = make_checkpoint(1, 288, 300, head_size=16)  # 18 heads
    sd = load_state_dict(path)
    sums = base_fingerprint(sd)["checksums"]["blocks.0.att.r_k"]
    assert sd["blocks.0.att.r_k"].shape[0] == 18
    r_k = sd["blocks.0.att.r_k"].double()
    assert sums == pytest.approx([float(r_k.sum()), float(r_k.abs().sum())])
