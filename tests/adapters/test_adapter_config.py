"""AdapterConfig from RWKV-PEFT's flags, and every bad input refused at configuration time."""

from __future__ import annotations

import pytest
import torch

from rwkv_disha import load_model
from rwkv_disha.adapters import AdapterConfig, inject_adapters
from rwkv_disha.adapters.config import parse_train_parts
from rwkv_disha.errors import RWKVDishaError


def test_disha_config_as_in_rwkv_peft_readme():
    cfg = AdapterConfig.from_cli("disha", '{"mode":"bone","load":"","r":64}', "", ["time", "ln"], "none")
    assert (cfg.peft, cfg.mode, cfg.r, cfg.load, cfg.quant) == ("disha", "bone", 64, "", "none")
    assert cfg.targets == [] and cfg.train_parts == ["time", "ln"]  # []: the model version's layers
    bat = AdapterConfig.from_cli("disha", '{"mode":"bat","load":"x.pth","r":32}', quant="nf4")
    assert (bat.mode, bat.r, bat.load, bat.quant) == ("bat", 32, "x.pth", "nf4")


def test_lora_config_as_in_rwkv_peft_readme():
    cfg = AdapterConfig.from_cli(
        "lora", "", '{"lora_load":"","lora_r":8,"lora_alpha":32,"lora_dropout":0.01}', None, "int8"
    )
    assert (cfg.peft, cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.quant) == ("lora", 8, 32.0, 0.01, "int8")


def test_only_the_chosen_peft_json_is_read():
    cfg = AdapterConfig.from_cli("disha", '{"mode":"bone","r":64}', "not json at all")
    assert cfg.peft == "disha"
    assert AdapterConfig.from_cli("none", "{{", "{{").peft == "none"


@pytest.mark.parametrize(
    "spelling",
    [["time", "ln"], "time ln", '["time", "ln"]', ['["time",', '"ln"]'], ["[time,", "ln]"], "time,ln"],
)
def test_train_parts_spellings(spelling):
    assert parse_train_parts(spelling) == ["time", "ln"]


def test_train_parts_default_and_empty():
    assert parse_train_parts(None) == ["time", "ln"]
    assert parse_train_parts([]) == []
    assert parse_train_parts(["emb", "head", "ln", "ln"]) == ["emb", "head", "ln"]


BAD_CONFIGS = [
    (("disha", '{"mode":"bone","r":64'), "--disha_config is not valid JSON"),
    (("disha", "{'mode':'bone','r':64}"), "double quotes inside"),
    (("disha", '["bone", 64]'), "must be a JSON object"),
    (("disha", '{"mode":"bott","r":64}'), 'mode \'bott\' is unknown: use "bone" or "bat"'),
    (("disha", '{"mode":"bone","r":0}'), "r must be a positive integer, got 0"),
    (("disha", '{"mode":"bat","r":-8}'), "r must be a positive integer, got -8"),
    (("disha", '{"mode":"bone","r":"64"}'), "r must be int, got '64'"),
    (("disha", '{"mode":"bone","r":true}'), "r must be int, got True"),
    (("disha", '{"mode":"bone","r":64,"rank":8}'), "unknown key(s) rank: known keys are mode, load, r"),
    (("lora", "", '{"lora_r":8,"lora_alpha":32'), "--lora_config is not valid JSON"),
    (("lora", "", '{"lora_r":0}'), "lora_r must be a positive integer"),
    (("lora", "", '{"lora_r":8,"lora_alpha":0}'), "lora_alpha must be > 0"),
    (("lora", "", '{"lora_r":8,"lora_dropout":1.5}'), "lora_dropout must be in [0, 1)"),
    (("lora", "", '{"r":8}'), "unknown key(s) r: known keys are lora_load, lora_r"),
    (
        ("bat", '{"mode":"bat","r":64}'),
        "unknown --peft 'bat': use disha, lora, miss, pissa, state or none (Bat is --peft disha",
    ),
    (("dora",), "unknown --peft 'dora'"),
]


@pytest.mark.parametrize("args,message", BAD_CONFIGS, ids=[m for _, m in BAD_CONFIGS])
def test_bad_config_is_a_clear_one_line_error(args, message):
    with pytest.raises(RWKVDishaError) as e:
        AdapterConfig.from_cli(*args)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_train_parts_and_quant():
    with pytest.raises(RWKVDishaError, match="unknown --train_parts 'att': choose from time ln emb head"):
        AdapterConfig.from_cli("disha", '{"r":8}', train_parts=["ln", "att"])
    with pytest.raises(RWKVDishaError, match="unknown --quant 'int4': use none, int8, nf4, fp4"):
        AdapterConfig.from_cli("disha", '{"r":8}', quant="int4")
    with pytest.raises(RWKVDishaError, match="add --peft disha or lora"):
        AdapterConfig.from_cli("none", quant="nf4")


# -- errors that need the model's shapes: raised by inject_adapters, before any layer is replaced -------
@pytest.fixture(scope="module")
def model_path(make_checkpoint):
    return make_checkpoint(2, 128, 300)  # C=128, FFN 512


@pytest.mark.parametrize(
    "disha,message",
    [
        ('{"mode":"bat","r":48}', "Bat r=48 must divide both sides of every adapted layer, but blocks.0.att"),
        ('{"mode":"bat","r":256}', "Bat r=256 must divide both sides"),
        ('{"mode":"bone","r":129}', "Bone r=129 exceeds the input width 128 of blocks.0.att.receptance"),
    ],
)
def test_shape_errors_at_injection(model_path, disha, message):
    model = load_model(model_path, op="torch")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RWKVDishaError) as e:
        inject_adapters(model, AdapterConfig.from_cli("disha", disha))
    assert message in str(e.value) and "\n" not in str(e.value)
    assert "choose r" in str(e.value)
    assert set(model.state_dict()) == set(before)  # nothing was replaced


def test_bat_r_not_dividing_out_only(model_path):
    """ffn.value is 128 x 512 (out x in): r=256 divides in but not out."""
    model = load_model(model_path, op="torch")
    cfg = AdapterConfig.from_cli("disha", '{"mode":"bat","r":256}', targets=["ffn.value"])
    with pytest.raises(
        RWKVDishaError, match=r"Bat r=256 must divide both sides .* blocks.0.ffn.value is 128x512"
    ):
        inject_adapters(model, cfg)


def test_bat_error_suggests_a_valid_r(model_path):
    model = load_model(model_path, op="torch")
    with pytest.raises(RWKVDishaError, match="e.g. r=32"):
        inject_adapters(model, AdapterConfig.from_cli("disha", '{"mode":"bat","r":48}'))


def test_unknown_target_and_double_injection(model_path):
    model = load_model(model_path, op="torch")
    with pytest.raises(
        RWKVDishaError, match="adapter target 'att.gate' matches no layer of this model: use some of"
    ):
        inject_adapters(model, AdapterConfig.from_cli("disha", '{"r":8}', targets=["att.gate"]))
    with pytest.raises(RWKVDishaError, match="not a bias-free nn.Linear"):
        inject_adapters(model, AdapterConfig.from_cli("disha", '{"r":8}', targets=["att.ln_x"]))
    for target in ("head", "emb"):  # outside the blocks (a peft folder's LoRA on lm_head): said so
        with pytest.raises(
            RWKVDishaError, match=f"not on the {target}; train it whole with --train_parts {target}"
        ):
            inject_adapters(model, AdapterConfig.from_cli("lora", '{"lora_r":4}', targets=[target]))
    cfg = AdapterConfig.from_cli("disha", '{"r":8}')
    inject_adapters(model, cfg)
    with pytest.raises(RWKVDishaError, match="already has an adapter"):
        inject_adapters(model, cfg)


def test_lora_rank_larger_than_layer(model_path):
    model = load_model(model_path, op="torch")
    with pytest.raises(RWKVDishaError, match="LoRA r=200 exceeds the smaller side 128"):
        inject_adapters(model, AdapterConfig.from_cli("lora", "", '{"lora_r":200}'))


def test_configurable_targets(model_path):
    model = load_model(model_path, op="torch")
    names = inject_adapters(
        model, AdapterConfig.from_cli("disha", '{"r":8}', targets=["att.key", "blocks.1.ffn.value"])
    )
    assert names == ["blocks.0.att.key", "blocks.1.att.key", "blocks.1.ffn.value"]
    assert isinstance(model.blocks[0].att.value, torch.nn.Linear)
