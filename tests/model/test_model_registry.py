"""The model registry: one entry per version, and a layout table that agrees with the module."""

import pytest
import torch

from rwkv_disha import RWKVDishaError
from rwkv_disha.choices import MODEL_VERSIONS
from rwkv_disha.cli import main
from rwkv_disha.model.config import ModelConfig
from rwkv_disha.model.init import init_state_dict, make_config
from rwkv_disha.model.load import build_model, infer_config, save_state_dict
from rwkv_disha.model.registry import MODELS, get_version


def test_registry_lists_the_cli_versions():
    assert tuple(MODELS) == MODEL_VERSIONS == ("x070", "x060", "x052")
    assert [get_version(v).name for v in MODEL_VERSIONS] == ["RWKV-7", "RWKV-6", "RWKV-5.2"]


@pytest.mark.parametrize("shape", [(1, 64, 50, 64), (3, 128, 300, 32), (2, 192, 777, 64)])
def test_tensor_shapes_equal_the_module_and_init(shape):
    n_layer, n_embd, vocab, head = shape
    cfg = make_config(n_layer, n_embd, vocab, head)
    want = get_version("x070").tensor_shapes(cfg)
    module = {k: tuple(t.shape) for k, t in build_model(cfg).state_dict().items()}
    init = {k: tuple(t.shape) for k, t in init_state_dict(n_layer, n_embd, vocab, head).items()}
    assert want == module == init
    assert want["blocks.0.att.r_k"] == (n_embd // head, head)
    assert "blocks.0.att.v1" not in want
    assert want[f"blocks.{n_layer - 1}.ffn.key.weight"] == (4 * n_embd, n_embd)


def test_build_model_uses_the_registry_class():
    cfg = make_config(1, 64, 10)
    assert type(build_model(cfg)) is MODELS["x070"].model_class


def test_infer_config_is_the_init_config():
    cfg = infer_config(init_state_dict(2, 128, 300, head_size=32))
    assert cfg == make_config(2, 128, 300, 32)
    assert isinstance(cfg, ModelConfig) and cfg.n_head == 4


@pytest.mark.parametrize(
    "key,tensor,match",
    [
        # a head size that does not divide C: once a GroupNorm ValueError from inside torch
        ("blocks.0.att.r_k", torch.zeros(42, 3), "n_embd 128 is not a multiple of head_size 3"),
        ("blocks.1.att.r_k", torch.zeros(4, 32), r"blocks.1.att.r_k \(4, 32\) != \(2, 64\)"),
        ("blocks.0.att.r_k", torch.zeros(128), r"head_size \(blocks.0.att.r_k dim 1\) is 0"),
        ("blocks.0.ffn.key.weight", torch.zeros(0, 128), r"dim_ffn .* is 0"),
        ("emb.weight", torch.zeros(1000), r"n_embd \(emb.weight dim 1\) is 0"),
        ("blocks.0.att.w1", torch.zeros(128, 7), r"blocks.0.att.w2 \(32, 128\) != \(7, 128\)"),
        ("head.weight", torch.zeros(999, 128), r"head.weight \(999, 128\) != \(1000, 128\)"),
        ("blocks.0.ln1.weight", torch.zeros(128, dtype=torch.int64), r"non-floating-point .*ln1.weight"),
    ],
)
def test_bad_tensor_is_one_line_before_building(tmp_path, capsys, key, tensor, match):
    sd = init_state_dict(2, 128, 1000)
    sd[key] = tensor
    p = save_state_dict(sd, tmp_path / "bad.pth")
    with pytest.raises(RWKVDishaError, match=match):
        infer_config(sd)
    before = sorted(tmp_path.iterdir())
    assert main(["generate", "--load_model", str(p), "--prompt", "hi", "--max_tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert str(p) in err
    assert sorted(tmp_path.iterdir()) == before
