"""Adapter files from other tools that used to be refused or mis-applied: peft folders whose config builds
another model than plain LoRA / MiSS on the released base (checked against peft itself), peft folders that
adapt some blocks only, and RWKV-PEFT files that name the DiSHA tensor ``bone`` (checked against RWKV-PEFT's
merge formula, written out here)."""

from __future__ import annotations

import json

import pytest
import torch
from adapter_helpers import logits, rel_err, tokens

from rwkv_disha import load_model
from rwkv_disha.adapters.merge import merge_adapter_file
from rwkv_disha.cli import main
from rwkv_disha.model.load import load_state_dict

peft = pytest.importorskip("peft")

SIX = ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value")


@pytest.fixture(scope="module")
def base(make_checkpoint):
    return make_checkpoint(2, 128, 300)


def _randomise(pm, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # random adapter weights: zero would prove nothing
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return pm.eval()


def _peft_logits(pm, idx):
    with torch.no_grad():
        return pm(idx).float()


def _merge_refused(base, folder, tmp_path, capsys, *words):
    out = tmp_path / "merged.pth"
    argv = ["merge", "--base_model", str(base), "--peft_checkpoint", str(folder), "--output", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and all(w in err for w in words), err
    assert not out.exists()


@pytest.mark.filterwarnings("ignore:(PiSSA|OLoRA) changes the base weights:UserWarning")  # on purpose here
@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_a_lora_folder_started_by_rewriting_the_base_is_refused(base, tmp_path, capsys, init):
    """peft's PiSSA / OLoRA start from W minus the adapter's first value: the folder's tensors belong to
    that residual, so W + ΔW would be another model. peft's converted save (a plain LoRA of rank 2r on the
    released base) is the way in, and merges to the trained model."""
    conf = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=init, target_modules=["key", "value"])
    pm = peft.get_peft_model(load_model(base, op="torch"), conf)
    pm.peft_config["default"].init_lora_weights = True  # peft's recipe: the starting adapter, as plain LoRA
    pm.save_pretrained(tmp_path / "start")
    pm.peft_config["default"].init_lora_weights = init
    idx = tokens(300)
    ref = _peft_logits(_randomise(pm), idx)
    pm.save_pretrained(tmp_path / "trained")
    _merge_refused(base, tmp_path / "trained", tmp_path, capsys, f"init_lora_weights={init!r}", "residual")
    pm.save_pretrained(tmp_path / "plain", path_initial_model_for_weight_conversion=str(tmp_path / "start"))
    merge_adapter_file(base, tmp_path / "plain", tmp_path / "merged.pth")
    assert rel_err(logits(load_model(tmp_path / "merged.pth", op="torch"), idx), ref) <= 1e-5


FOREIGN_FIELDS = {
    "lora_bias": True,
    "alora_invocation_tokens": [1, 2],
    "layer_replication": [[0, 1], [0, 2]],
    "use_qalora": True,
    "target_parameters": ["att.r_k"],
}


@pytest.mark.parametrize("field", list(FOREIGN_FIELDS))
def test_a_peft_field_that_builds_another_model_is_refused(base, tmp_path, capsys, field):
    pm = peft.get_peft_model(load_model(base, op="torch"), peft.LoraConfig(r=4, target_modules=["key"]))
    _randomise(pm).save_pretrained(tmp_path / "pf")
    conf_path = tmp_path / "pf" / "adapter_config.json"
    conf_path.write_text(json.dumps({**json.loads(conf_path.read_text()), field: FOREIGN_FIELDS[field]}))
    _merge_refused(base, tmp_path / "pf", tmp_path, capsys, f"{field}=", "is not supported")


def test_miss_init_weights_false_is_the_balance_mode(base, tmp_path):
    """peft's MiSS with init_weights false is balance (Bone) started from random values: the same layer."""
    conf = peft.MissConfig(r=48, target_modules=["key", "value"], init_weights=False)
    pm = _randomise(peft.get_peft_model(load_model(base, op="torch"), conf))
    idx = tokens(300)
    pm.save_pretrained(tmp_path / "pf")
    merge_adapter_file(base, tmp_path / "pf", tmp_path / "merged.pth")
    assert (
        rel_err(logits(load_model(tmp_path / "merged.pth", op="torch"), idx), _peft_logits(pm, idx)) <= 1e-5
    )


SOME_BLOCKS = {
    "layers_to_transform": lambda: peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["key"], layers_to_transform=[1], layers_pattern="blocks"
    ),
    "full-names": lambda: peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["blocks.1.att.key", "blocks.0.ffn.value"]
    ),  # fmt: skip
    "miss-bat-one-block": lambda: peft.MissConfig(
        r=8, target_modules=["blocks.1.att.output"], init_weights="bat"
    ),  # fmt: skip
}


@pytest.mark.parametrize("name", list(SOME_BLOCKS))
def test_a_folder_adapting_some_blocks_only_gives_peft_logits(base, tmp_path, name):
    """The folder's layers are taken by full name (not extended to every block), in merge and through
    export --format pth and back to a peft folder."""
    pm = _randomise(peft.get_peft_model(load_model(base, op="torch"), SOME_BLOCKS[name]()))
    idx = tokens(300)
    ref = _peft_logits(pm, idx)
    assert rel_err(ref, logits(load_model(base, op="torch"), idx)) > 1e-3
    pm.save_pretrained(tmp_path / "pf")
    merge_adapter_file(base, tmp_path / "pf", tmp_path / "merged.pth")
    assert rel_err(logits(load_model(tmp_path / "merged.pth", op="torch"), idx), ref) <= 1e-5
    argv = ["export", "--peft_checkpoint", str(tmp_path / "pf"), "--format", "pth"]
    assert main([*argv, "--output", str(tmp_path / "rwkv-0.pth")]) == 0
    argv = ["export", "--peft_checkpoint", str(tmp_path / "rwkv-0.pth"), "--format", "peft"]
    assert main([*argv, "--output", str(tmp_path / "back")]) == 0
    conf = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert all(t.startswith("blocks.") for t in conf["target_modules"])
    again = peft.PeftModel.from_pretrained(load_model(base, op="torch"), str(tmp_path / "back")).eval()
    assert rel_err(_peft_logits(again, idx), ref) <= 1e-5


def _rwkv_peft_merge(w: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """RWKV-PEFT's merge_bone.py / merge_disha.py, written out: 3-D (in/r, r, r) W[a, b] @ d[b] + d[b];
    2-D (r, out) ΔW[o, i] = d[i mod r, o]."""
    w = w.float().clone()
    if d.dim() == 3:
        r = d.shape[1]
        out_f, in_f = w.shape
        blocks = w.view(out_f // r, r, in_f // r, r).permute(0, 2, 1, 3)  # (a, b, r, r)
        return w + (blocks @ d + d).permute(0, 2, 1, 3).reshape(out_f, in_f)
    for i in range(w.shape[1]):
        w[:, i] += d[i % d.shape[0]]
    return w


@pytest.mark.parametrize(("mode", "r"), [("bone", 48), ("bat", 32)])
def test_an_rwkv_peft_file_with_bone_tensors_merges(base, tmp_path, capsys, mode, r):
    """RWKV-PEFT's --peft bone releases saved the DiSHA tensor as ``.bone`` (bf16, no sidecar)."""
    w = load_state_dict(base)
    g = torch.Generator().manual_seed(0)
    file = {}
    for key, t in w.items():
        if key.endswith(tuple(f".{m}.weight" for m in SIX)):
            out_f, in_f = t.shape
            shape = (r, out_f) if mode == "bone" else (in_f // r, r, r)
            file[key.removesuffix("weight") + "bone"] = (torch.randn(shape, generator=g) * 0.05).bfloat16()
    file.update({k: t + 0.5 for k, t in w.items() if "ln" in k})  # --train_parts ln tensors beside them
    torch.save(file, tmp_path / "rwkv-3.pth")
    out = tmp_path / "merged.pth"
    argv = ["merge", "--base_model", str(base), "--peft_checkpoint", str(tmp_path / "rwkv-3.pth")]
    assert main([*argv, "--output", str(out)]) == 0, capsys.readouterr().err
    merged = load_state_dict(out)
    assert list(merged) == list(w)
    for key, t in w.items():
        bone = key.removesuffix("weight") + "bone"
        want = _rwkv_peft_merge(t, file[bone].float()) if bone in file else file.get(key, t)
        torch.testing.assert_close(merged[key].float(), want.float(), rtol=0, atol=1e-6)
