"""`export --format hf` / `import`: fla's Hugging Face RWKV-7 layout both ways. The round trip gives back
every tensor exactly; the exported folder, run by the pure-PyTorch `rwkv7-hf` reference, gives our logits."""

from __future__ import annotations

import json

import pytest
import torch

from rwkv_disha import load_model
from rwkv_disha.cli import main
from rwkv_disha.hf_layout import hf_name
from rwkv_disha.model.load import load_state_dict


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pth_to_hf_and_back_is_identical(make_checkpoint, tmp_path, dtype):
    base = make_checkpoint(3, 128, 300, dtype=dtype)
    assert (
        main(["export", "--format", "hf", "--load_model", str(base), "--output", str(tmp_path / "hf")]) == 0
    )
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (conf["model_type"], conf["num_hidden_layers"], conf["hidden_size"], conf["vocab_size"]) == (
        "rwkv7",
        3,
        128,
        300,
    )
    assert main(["import", "--hf_model", str(tmp_path / "hf"), "--output", str(tmp_path / "back.pth")]) == 0
    a, b = load_state_dict(base), load_state_dict(tmp_path / "back.pth")
    assert list(a) == list(b)  # the official order too
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


def test_names_follow_fla():
    assert hf_name("blocks.2.att.w1") == ("model.layers.2.attn.w_lora.lora.0.weight", "t")
    assert hf_name("blocks.2.att.a0") == ("model.layers.2.attn.a_lora.lora.2.bias", "flat")
    assert hf_name("blocks.0.att.ln_x.bias") == ("model.layers.0.attn.g_norm.bias", "same")
    assert hf_name("blocks.0.ln0.weight") == ("model.layers.0.pre_norm.weight", "same")
    assert hf_name("blocks.1.ffn.x_k") == ("model.layers.1.ffn.x_k", "flat")
    assert hf_name("head.weight") == ("lm_head.weight", "same")


def test_exported_folder_gives_our_logits_in_the_reference(make_checkpoint, tmp_path):
    modeling = pytest.importorskip("rwkv7_hf.modeling_rwkv7")
    base = make_checkpoint(2, 128, 300)
    assert (
        main(["export", "--format", "hf", "--load_model", str(base), "--output", str(tmp_path / "hf")]) == 0
    )
    ref = (
        modeling.RWKV7ForCausalLM.from_pretrained(str(tmp_path / "hf"), attn_mode="reference").float().eval()
    )
    idx = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = ref(idx).logits.float()
        ours = load_model(base, op="torch").eval()(idx).float()
    assert float((theirs - ours).abs().max() / ours.abs().max()) <= 2e-5
