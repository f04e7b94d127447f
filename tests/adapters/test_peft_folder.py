"""Hugging Face peft adapter folders, both ways, checked against peft itself on our RWKV-7 module:
peft's MissConfig (each mode) / LoraConfig + save_pretrained -> rwkv-disha gives peft's logits; our
adapters -> `rwkv-disha export --format peft` -> PeftModel.from_pretrained gives ours."""

from __future__ import annotations

import json

import pytest
import torch
from adapter_helpers import adapted, logits, rel_err, tokens

from rwkv_disha import load_model
from rwkv_disha.adapters import (
    AdapterConfig,
    inject_adapters,
    load_adapter_file,
    open_adapter_file,
    save_adapter_file,
)
from rwkv_disha.adapters.merge import merge_adapter_file
from rwkv_disha.cli import main

peft = pytest.importorskip("peft")

ALL_LN = ["ln0", "ln1", "ln2", "ln_x", "ln_out"]
PEFT_CONFIGS = {
    "miss-balance": lambda: peft.MissConfig(r=8, target_modules=["receptance", "key", "value", "output"]),
    "miss-balance-padded": lambda: peft.MissConfig(r=48, target_modules=["key", "value"]),
    "miss-bat": lambda: peft.MissConfig(r=8, target_modules=["receptance", "key"], init_weights="bat"),
    "miss-mini": lambda: peft.MissConfig(r=16, target_modules=["value"], init_weights="mini", mini_r=8),
    "lora": lambda: peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=["receptance", "key", "value", "output"], modules_to_save=ALL_LN
    ),
}


@pytest.fixture(scope="module")
def base(make_checkpoint):
    return make_checkpoint(2, 128, 300)


def _peft_model(base, conf, seed=0):
    model = peft.get_peft_model(load_model(base, op="torch"), conf)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # random adapter (and modules_to_save) weights: zero would prove nothing
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


@pytest.mark.parametrize("name", list(PEFT_CONFIGS))
def test_a_peft_folder_loads_with_peft_logits(base, tmp_path, name):
    pm = _peft_model(base, PEFT_CONFIGS[name]())
    idx = tokens(300)
    with torch.no_grad():
        ref = pm(idx).float()
    pm.save_pretrained(tmp_path / "adapter")
    file = open_adapter_file(tmp_path / "adapter")
    ours = load_model(base, op="torch")
    inject_adapters(ours, file.cfg)
    load_adapter_file(ours, file, file.cfg)
    assert rel_err(logits(ours.eval(), idx), ref) <= 1e-5
    assert rel_err(ref, logits(load_model(base, op="torch"), idx)) > 1e-3
    # and merge takes the folder as it is
    merge_adapter_file(base, tmp_path / "adapter", tmp_path / "merged.pth")
    assert rel_err(logits(load_model(tmp_path / "merged.pth", op="torch"), idx), ref) <= 1e-5


def _ours(kind_text):
    peft_name, text = kind_text
    if peft_name == "lora":
        return AdapterConfig.from_cli("lora", lora_config=text)
    if peft_name == "pissa":
        return AdapterConfig.from_cli("pissa", pissa_config=text)
    if peft_name == "disha":
        return AdapterConfig.from_cli("disha", disha_config=text)
    return AdapterConfig.from_cli("miss", peft_config=text)


OURS = {
    "bone": ("disha", '{"mode":"bone","r":32}'),
    "miss-bat": ("miss", '{"r":8,"init_weights":"bat"}'),
    "miss-mini": ("miss", '{"r":8,"init_weights":"mini","mini_r":4}'),
    "lora": ("lora", '{"lora_r":4,"lora_alpha":8,"lora_dropout":0}'),
    "pissa": ("pissa", '{"pissa_r":4}'),
}


@pytest.mark.parametrize("name", list(OURS))
def test_our_export_loads_in_peft_with_our_logits(base, tmp_path, name):
    cfg = _ours(OURS[name])
    model = adapted(base, cfg, seed=4)  # random adapter + perturbed ln tensors (train_parts)
    save_adapter_file(model, cfg, tmp_path / "rwkv-0.pth")
    argv = ["export", "--peft_checkpoint", str(tmp_path / "rwkv-0.pth"), "--format", "peft"]
    assert main([*argv, "--output", str(tmp_path / "peft")]) == 0
    conf = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert conf["peft_type"] == ("LORA" if name in ("lora", "pissa") else "MISS")
    pm = peft.PeftModel.from_pretrained(load_model(base, op="torch"), str(tmp_path / "peft")).eval()
    idx = tokens(300)
    with torch.no_grad():
        theirs = pm(idx).float()
    assert rel_err(theirs, logits(model, idx)) <= 1e-5


def test_bat_has_no_peft_form(base, tmp_path, capsys):
    cfg = AdapterConfig.from_cli("disha", disha_config='{"mode":"bat","r":32}')
    save_adapter_file(adapted(base, cfg), cfg, tmp_path / "rwkv-0.pth")
    argv = ["export", "--peft_checkpoint", str(tmp_path / "rwkv-0.pth"), "--output", str(tmp_path / "p")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1
        and "RWKV-PEFT's Bat (disha indexed by input block) has no peft equivalent" in err
    )
    assert not (tmp_path / "p").exists()


def test_train_continues_from_a_peft_folder(base, tmp_path):
    """`load` in --peft_config takes a peft folder: the model starts from its tensors."""
    pm = _peft_model(base, peft.MissConfig(r=8, target_modules=["receptance", "key", "value", "output"]))
    pm.save_pretrained(tmp_path / "adapter")
    text = json.dumps({"r": 8, "load": str(tmp_path / "adapter")})
    cfg = AdapterConfig.from_cli("miss", peft_config=text, train_parts=[])
    ours = load_model(base, op="torch")
    inject_adapters(ours, cfg)
    load_adapter_file(ours, cfg.load, cfg)
    idx = tokens(300)
    with torch.no_grad():
        assert rel_err(logits(ours.eval(), idx), pm(idx).float()) <= 1e-5


def test_generate_and_eval_take_a_peft_folder(base, tmp_path, capsys):
    import numpy as np

    from rwkv_disha.data.binidx import write_binidx

    pm = _peft_model(base, PEFT_CONFIGS["miss-bat"]())
    pm.save_pretrained(tmp_path / "adapter")
    write_binidx(tmp_path / "data", [np.arange(1, 40, dtype=np.int32) for _ in range(3)])
    merge_adapter_file(base, tmp_path / "adapter", tmp_path / "merged.pth")
    gen = ["generate", "--load_model", str(base), "--prompt", "a", "--max_tokens", "2"]
    assert main([*gen, "--peft_checkpoint", str(tmp_path / "adapter")]) == 0
    losses = []
    for extra in (["--load_model", str(base), "--peft_checkpoint", str(tmp_path / "adapter")],
                  ["--load_model", str(tmp_path / "merged.pth")]):  # fmt: skip
        capsys.readouterr()
        argv = [
            "eval",
            "--data_file",
            str(tmp_path / "data"),
            "--ctx_len",
            "16",
            "--max_samples",
            "2",
            *extra,
        ]
        assert main(argv) == 0
        losses.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


LYING_CONFIGS = {
    "lora-r": ("lora", {"r": 8}, "r 8"),
    "lora-r-string": ("lora", {"r": "4"}, "r '4'"),
    "lora-alpha-string": ("lora", {"lora_alpha": "8"}, "lora_alpha"),
    "lora-targets": ("lora", {"target_modules": ["q_proj"]}, "target_modules"),
    "lora-targets-regex": ("lora", {"target_modules": r".*\.att\.key"}, "target_modules"),
    "miss-r": ("miss-bat", {"r": 16}, "r 16"),
    "mini-r": ("miss-mini", {"mini_r": 8}, "mini_r 8"),
}


@pytest.mark.parametrize("name", list(LYING_CONFIGS))
def test_a_peft_config_that_disagrees_with_its_tensors_is_refused(base, tmp_path, capsys, name):
    kind, edit, words = LYING_CONFIGS[name]
    cfg = _ours(OURS[kind])
    save_adapter_file(adapted(base, cfg, seed=4), cfg, tmp_path / "rwkv-0.pth")
    argv = ["export", "--peft_checkpoint", str(tmp_path / "rwkv-0.pth"), "--format", "peft"]
    assert main([*argv, "--output", str(tmp_path / "peft")]) == 0
    conf_path = tmp_path / "peft" / "adapter_config.json"
    conf_path.write_text(json.dumps({**json.loads(conf_path.read_text()), **edit}))
    back = ["export", "--peft_checkpoint", str(tmp_path / "peft"), "--format", "pth"]
    assert main([*back, "--output", str(tmp_path / "back.pth")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and words in err, err
    assert not (tmp_path / "back.pth").exists()


def test_a_folder_saving_some_ln_modules_is_refused_with_its_own_fix(base, tmp_path, capsys):
    """peft's modules_to_save names modules one by one; ours train and merge the whole --train_parts ln."""
    conf = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["key"], modules_to_save=["ln1", "ln2"])
    _peft_model(base, conf).save_pretrained(tmp_path / "adapter")
    argv = ["merge", "--base_model", str(base), "--peft_checkpoint", str(tmp_path / "adapter")]
    assert main([*argv, "--output", str(tmp_path / "m.pth")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lacks tensors" in err[0], err
    assert "its modules_to_save holds only some of the --train_parts ln modules" in err[0]
    assert "save all of them in peft, or none" in err[0] and not (tmp_path / "m.pth").exists()
