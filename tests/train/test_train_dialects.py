"""Every RWKV-PEFT command-line dialect trains, and lands on the same adapter as our own spelling of it:
same kind, same keys and shapes, same tensors and loss for the same seed (docs/MIGRATING.md)."""

import csv
import json

import pytest
import torch

from rwkv_disha.cli import main
from rwkv_disha.model.load import load_state_dict

SIX = ["att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value"]


def _run(train_args, base, data, proj, peft_flags):
    argv = train_args(base, data, proj, epochs=1, steps=2)
    i = argv.index("--disha_config")
    del argv[i : i + 2]  # each case gives its own adapter flags
    assert main([*argv, *peft_flags]) == 0
    tensors = load_state_dict(proj / "rwkv-0.pth")
    side = json.loads((proj / "rwkv-0.json").read_text())["adapter"]
    with open(proj / "metrics.csv") as f:
        losses = [float(row["loss"]) for row in csv.DictReader(f)]
    return tensors, side, losses


PAIRS = [
    (
        ["--peft", "miss", "--peft_config", '{"r":16}'],
        ["--peft", "disha", "--disha_config", '{"mode":"bone","load":"","r":16}'],
    ),
    (
        ["--peft", "bone", "--bone_config", '{"bone_mode":"bat","bone_load":"","bone_r":16}'],
        ["--peft", "disha", "--disha_config", '{"mode":"bat","load":"","r":16}'],
    ),
    (
        ["--peft", "lora", "--peft_config", '{"r":4,"lora_alpha":32,"lora_dropout":0}'],
        ["--peft", "lora", "--lora_config", '{"lora_load":"","lora_r":4,"lora_alpha":32,"lora_dropout":0}'],
    ),
]


@pytest.mark.parametrize("dialect, ours", PAIRS, ids=["miss", "bone", "lora-peft_config"])
def test_a_dialect_trains_the_same_adapter_as_our_flags(
    tmp_path, base_path, count_data, train_args, dialect, ours
):
    a, side_a, loss_a = _run(train_args, base_path, count_data, tmp_path / "dialect", dialect)
    b, side_b, loss_b = _run(train_args, base_path, count_data, tmp_path / "ours", ours)
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert loss_a == loss_b and len(loss_a) == 2
    for key in ("peft", "mode", "r", "targets", "train_parts"):
        assert side_a[key] == side_b[key], key
    assert side_a["targets"] == SIX  # peft's ["receptance","key","value","output"] hits ffn.key/value too


@pytest.mark.parametrize(
    "flags, suffix, shape",
    [
        (
            ["--peft", "miss", "--peft_config", '{"r":16,"init_weights":"bat"}'],
            "miss_block",
            (64 // 16, 16, 16),
        ),
        (
            [
                "--peft",
                "miss",
                "--peft_config",
                '{"r":16,"init_weights":"mini","mini_r":8,"target_modules":["key"]}',
            ],
            "miss_block",
            (16, 8),
        ),
        (["--peft", "pissa", "--pissa_config", '{"pissa_r":4,"svd_niter":2}'], "lora_A", (4, 64)),
    ],
    ids=["miss-bat", "miss-mini", "pissa"],
)
def test_miss_modes_and_pissa_train(
    tmp_path, make_checkpoint, count_data, train_args, flags, suffix, shape, capsys
):
    # a random base: the "pretrain" init zeroes att.output / ffn.value, whose SVD (PiSSA's start) is all zero
    base = make_checkpoint(2, 64, 256, style="random", seed=3)
    tensors, side, losses = _run(train_args, base, count_data, tmp_path / "run", flags)
    assert tuple(tensors[f"blocks.0.att.key.{suffix}"].shape) == shape
    assert all(torch.isfinite(torch.tensor(losses)))
    layers = {k.rsplit(".", 1)[0] for k in tensors if k.endswith(suffix)}
    if "mini" in flags[-1]:  # target_modules ["key"]: att.key and ffn.key, nothing else
        assert layers == {f"blocks.{i}.{t}" for i in range(2) for t in ("att.key", "ffn.key")}
        assert "on att.key ffn.key (every block)" in capsys.readouterr().out
    if suffix == "lora_A":  # PiSSA: A0 / B0 saved unchanged, A / B trained away from them
        a0 = tensors["blocks.0.att.output.pissa_A0"]
        assert not torch.equal(a0, tensors["blocks.0.att.output.lora_A"])
        assert side["peft"] == "pissa"


def test_train_continues_from_a_peft_folder(tmp_path, make_checkpoint, count_data, train_args):
    """`load` in --peft_config takes a Hugging Face peft folder (RWKV-PEFT's output without --merge 1)."""
    peft = pytest.importorskip("peft")
    from rwkv_disha import load_model

    base = make_checkpoint(2, 64, 256, style="random", seed=3)
    pm = peft.get_peft_model(load_model(base, op="torch"), peft.MissConfig(r=16, target_modules=["key"]))
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape) * 0.05)
    pm.save_pretrained(tmp_path / "adapter")
    argv = train_args(base, count_data, tmp_path / "run", epochs=1, steps=2, lr="1e-12")
    i = argv.index("--disha_config")
    del argv[i : i + 2]
    text = json.dumps({"r": 16, "target_modules": ["key"], "load": str(tmp_path / "adapter")})
    assert main([*argv, "--peft", "miss", "--peft_config", text, "--train_parts"]) == 0
    saved = load_state_dict(tmp_path / "run" / "rwkv-0.pth")
    block = load_state_dict(tmp_path / "adapter" / "adapter_model.safetensors")[
        "base_model.model.blocks.1.ffn.key.miss_block"
    ]
    torch.testing.assert_close(saved["blocks.1.ffn.key.disha"], block, rtol=0, atol=1e-8)  # lr 1e-12
    assert set(saved) == {f"blocks.{i}.{t}.disha" for i in range(2) for t in ("att.key", "ffn.key")}
