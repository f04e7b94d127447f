"""`merge`: merged model == adapter model (Bone, Bat, LoRA; with --quant), exact key set, rwkv package."""

from __future__ import annotations

import pytest
import torch
from adapter_helpers import adapted, config, logits, rel_err, tokens

from rwkv_disha import load_model
from rwkv_disha.adapters import adapter_state_dict, save_adapter_file
from rwkv_disha.adapters.merge import merge_adapter_file
from rwkv_disha.cli import main
from rwkv_disha.errors import RWKVDishaError
from rwkv_disha.model.load import load_state_dict

CASES = [
    pytest.param("bone", 48, id="bone-r48-padded"),  # 128 % 48 and 512 % 48 != 0: zero-padded input
    pytest.param("bone", 64, id="bone-r64"),
    pytest.param("bat", 32, id="bat-r32"),
    pytest.param("lora", 8, id="lora-r8"),
]


@pytest.fixture(scope="module")
def base(make_checkpoint):
    return make_checkpoint(2, 128, 300)


@pytest.mark.parametrize("kind,r", CASES)
def test_merged_logits_equal_adapter_logits(base, tmp_path, kind, r):
    cfg = config(kind, r)
    model = adapted(base, cfg, seed=11)
    save_adapter_file(model, cfg, tmp_path / "rwkv-0.pth")
    info = merge_adapter_file(base, tmp_path / "rwkv-0.pth", tmp_path / "merged.pth")
    assert info["layers"] == 12 and info["replaced"] == 16  # 12 adapted layers, 16 ln tensors
    merged_sd, base_sd = load_state_dict(tmp_path / "merged.pth"), load_state_dict(base)
    assert list(merged_sd) == list(base_sd)  # exactly the base's keys, in its order
    assert all(merged_sd[k].dtype == base_sd[k].dtype for k in base_sd)
    idx = tokens(300)
    ref = logits(model, idx)
    assert rel_err(ref, logits(load_model(base, op="torch"), idx)) > 1e-3  # the adapter does change the model
    assert rel_err(logits(load_model(tmp_path / "merged.pth", op="torch"), idx), ref) <= 1e-5


@pytest.mark.parametrize("kind,r", CASES)
def test_merged_file_loads_in_rwkv_package(base, tmp_path, rwkv_oracle, kind, r):
    cfg = config(kind, r)
    model = adapted(base, cfg, seed=12)
    save_adapter_file(model, cfg, tmp_path / "rwkv-0.pth")
    merge_adapter_file(base, tmp_path / "rwkv-0.pth", tmp_path / "merged.pth")
    idx = tokens(300, (40,))
    theirs = rwkv_oracle(tmp_path / "merged.pth", idx.tolist())
    assert rel_err(theirs, logits(model, idx)[0]) <= 2e-5


@pytest.mark.parametrize(
    "kind,r,mode",
    [("bone", 48, "nf4"), ("bone", 64, "int8"), ("bat", 32, "nf4"), ("lora", 8, "fp4"), ("bat", 32, "int8")],
)
def test_merge_with_quant_equals_quantized_training_forward(base, tmp_path, kind, r, mode):
    pytest.importorskip("bitsandbytes")
    cfg = config(kind, r, quant=mode)
    model = adapted(base, cfg, seed=13)
    save_adapter_file(model, cfg, tmp_path / "rwkv-0.pth")
    merge_adapter_file(base, tmp_path / "rwkv-0.pth", tmp_path / "q.pth", quant=mode)
    idx = tokens(300)
    ref = logits(model, idx)
    assert rel_err(logits(load_model(tmp_path / "q.pth", op="torch"), idx), ref) <= 1e-5
    if (kind, mode) != ("bone", "nf4"):
        return
    # without --quant the sidecar's quant is used; --quant none merges onto the unquantized base
    merge_adapter_file(base, tmp_path / "rwkv-0.pth", tmp_path / "auto.pth")
    assert rel_err(logits(load_model(tmp_path / "auto.pth", op="torch"), idx), ref) <= 1e-5
    merge_adapter_file(base, tmp_path / "rwkv-0.pth", tmp_path / "plain.pth", quant="none")
    assert rel_err(logits(load_model(tmp_path / "plain.pth", op="torch"), idx), ref) > 1e-4


def test_bf16_base_stays_bf16(make_checkpoint, tmp_path):
    base16 = make_checkpoint(2, 128, 300, dtype=torch.bfloat16)
    cfg = config("bone", 64)
    model = adapted(base16, cfg, seed=14, dtype=torch.float32)
    save_adapter_file(model, cfg, tmp_path / "rwkv-0.pth")
    merge_adapter_file(base16, tmp_path / "rwkv-0.pth", tmp_path / "m.pth")
    merged = load_state_dict(tmp_path / "m.pth")
    assert all(t.dtype == torch.bfloat16 for t in merged.values())
    # merged in fp32, rounded once to bf16
    w = load_state_dict(base16)["blocks.0.att.key.weight"].float()
    expected = (w + model.blocks[0].att.key.delta_weight()).bfloat16()
    torch.testing.assert_close(merged["blocks.0.att.key.weight"], expected, rtol=0, atol=0)


@pytest.mark.parametrize("kind,r", [("bone", 48), ("bat", 32), ("lora", 8)])
def test_merge_rwkv_peft_file_without_sidecar(base, tmp_path, kind, r):
    cfg = config(kind, r)
    model = adapted(base, cfg, seed=15)
    torch.save(adapter_state_dict(model, cfg), tmp_path / "rwkv-5.pth")
    extra = {"lora_alpha": 32.0} if kind == "lora" else {}
    merge_adapter_file(base, tmp_path / "rwkv-5.pth", tmp_path / "m.pth", **extra)
    idx = tokens(300)
    assert rel_err(logits(load_model(tmp_path / "m.pth", op="torch"), idx), logits(model, idx)) <= 1e-5


# -- the command ---------------------------------------------------------------------------------------
@pytest.fixture
def bone_file(base, tmp_path):
    cfg = config("bone", 64)
    model = adapted(base, cfg, seed=16)
    return save_adapter_file(model, cfg, tmp_path / "rwkv-7.pth"), model


def test_merge_command(base, bone_file, tmp_path, capsys):
    adapter, model = bone_file
    out = tmp_path / "out" / "merged.pth"
    argv = ["merge", "--base_model", str(base), "--peft_checkpoint", str(adapter), "--output", str(out)]
    assert main(argv) == 0
    assert "merged Bone r=64: 12 layers, 16 train_parts tensors" in capsys.readouterr().out
    assert sorted(p.name for p in out.parent.iterdir()) == ["merged.pth"]  # no temp files left
    idx = tokens(300)
    assert rel_err(logits(load_model(out, op="torch"), idx), logits(model, idx)) <= 1e-5


def test_merge_safetensors_output(base, bone_file, tmp_path):
    adapter, model = bone_file
    merge_adapter_file(base, adapter, tmp_path / "m.safetensors")
    idx = tokens(300)
    assert (
        rel_err(logits(load_model(tmp_path / "m.safetensors", op="torch"), idx), logits(model, idx)) <= 1e-5
    )


def _merge_error(argv, capsys, *messages):
    assert main(["merge", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for m in messages:
        assert m in err, err


def test_merge_refuses_a_base_of_another_shape_and_leaves_no_output(
    make_checkpoint, bone_file, tmp_path, capsys
):
    adapter, _ = bone_file
    other = make_checkpoint(2, 192, 300)
    out = tmp_path / "never" / "merged.pth"
    argv = ["--base_model", str(other), "--peft_checkpoint", str(adapter), "--output", str(out)]
    _merge_error(
        argv, capsys, "was trained on a RWKV-7 L2 C128 V300", "model but this base is RWKV-7 L2 C192 V300"
    )
    assert not out.exists()
    # without the sidecar, the tensor shapes refuse it
    adapter.with_suffix(".json").unlink()
    _merge_error(argv, capsys, "does not fit")
    assert not out.exists() and (not out.parent.exists() or not any(out.parent.iterdir()))


def test_merge_names_the_versions_when_the_base_is_another_rwkv_version(make_checkpoint, tmp_path, capsys):
    """An RWKV-6 adapter on an RWKV-7 base of the same size: the message names both versions."""
    v6 = make_checkpoint(2, 128, 300, version="x060")
    cfg = config("bone", 32)
    adapter = save_adapter_file(adapted(v6, cfg, seed=3), cfg, tmp_path / "rwkv-0.pth")
    out = tmp_path / "merged.pth"
    argv = [
        "--base_model",
        str(make_checkpoint(2, 128, 300)),
        "--peft_checkpoint",
        str(adapter),
        "--output",
        str(out),
    ]
    _merge_error(
        argv, capsys, "trained on a RWKV-6 L2 C128 V300", "this base is RWKV-7 L2 C128", "differs in version"
    )
    assert not out.exists()


def test_merge_argument_errors(base, bone_file, tmp_path, capsys):
    adapter, _ = bone_file
    _merge_error(["--base_model", str(base), "--output", "x.pth"], capsys, "--peft_checkpoint is required")
    _merge_error(
        ["--base_model", str(base), "--peft_checkpoint", str(adapter), "--output", str(base)],
        capsys,
        "would overwrite an input",
    )
    _merge_error(  # base and adapter swapped
        ["--base_model", str(adapter), "--peft_checkpoint", str(base), "--output", str(tmp_path / "m.pth")],
        capsys,
        "this is an adapter checkpoint",
    )
    _merge_error(
        ["--base_model", str(base), "--peft_checkpoint", str(tmp_path / "nope.pth"), "--output", "m.pth"],
        capsys,
        "adapter file not found",
    )


def test_merge_lora_without_sidecar_needs_alpha(base, tmp_path, capsys):
    cfg = config("lora", 8)
    torch.save(adapter_state_dict(adapted(base, cfg), cfg), tmp_path / "rwkv-0.pth")
    argv = ["--base_model", str(base), "--peft_checkpoint", str(tmp_path / "rwkv-0.pth")]
    _merge_error([*argv, "--output", str(tmp_path / "m.pth")], capsys, "pass --lora_alpha")
    assert main(["merge", *argv, "--output", str(tmp_path / "m.pth"), "--lora_alpha", "32"]) == 0


def test_failed_write_leaves_nothing(base, bone_file, tmp_path, monkeypatch):
    adapter, _ = bone_file

    def broken_save(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    out = tmp_path / "o" / "merged.pth"
    with pytest.raises(RWKVDishaError, match=r"cannot write merged model .*merged.pth: disk full"):
        merge_adapter_file(base, adapter, out)
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_train_parts_from_the_adapter_replace_base_tensors(base, tmp_path):
    cfg = config("bone", 64, train_parts=["ln", "head"])
    model = adapted(base, cfg, seed=17)
    with torch.no_grad():
        model.head.weight.add_(0.1)
    save_adapter_file(model, cfg, tmp_path / "rwkv-0.pth")
    info = merge_adapter_file(base, tmp_path / "rwkv-0.pth", tmp_path / "m.pth")
    assert info["replaced"] == 17
    merged = load_state_dict(tmp_path / "m.pth")
    torch.testing.assert_close(merged["head.weight"], model.head.weight.detach(), rtol=0, atol=0)
