"""RWKV-6 / 5.2 end to end on CPU through the CLI: init -> prepare -> train Bone and Bat -> merge; the
merged file equals the adapter model, loads in the `rwkv` package with the same logits and holds exactly
the base's keys. And --my_testing against the file in train."""

import json

import pytest
import torch

from rwkv_disha.cli import main
from rwkv_disha.data.binidx import BinIdx
from rwkv_disha.generate import load_for_inference
from rwkv_disha.model.load import load_state_dict
from rwkv_disha.model.registry import RWKV6_TARGETS

N_LAYER = 2


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A prepared binidx prefix (World tokenizer: ids up to 65535) from a small jsonl file."""
    folder = tmp_path_factory.mktemp("corpus")
    lines = [{"text": f"User: what is {i} plus {i}?\n\nAssistant: {2 * i}.\n\n"} for i in range(24)]
    (folder / "c.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    argv = ["prepare", "--input", str(folder / "c.jsonl"), "--output", str(folder / "c")]
    assert main([*argv, "--workers", "1", "--progress", "0"]) == 0
    return str(folder / "c")


def train(base, data, proj, mode, *extra):
    argv = [
        "train", "--load_model", str(base), "--proj_dir", str(proj), "--data_file", data,
        "--data_type", "binidx", "--ctx_len", "24", "--micro_bsz", "2", "--epoch_steps", "2",
        "--epoch_count", "1", "--epoch_save", "1", "--lr_init", "1e-3", "--lr_final", "1e-3",
        "--accelerator", "cpu", "--precision", "fp32", "--progress_bar", "0", "--random_seed", "1",
        "--disha_config", json.dumps({"mode": mode, "load": "", "r": 16}), *extra,
    ]  # fmt: skip
    return main(argv)


@pytest.mark.parametrize("version", ["x060", "x052"])
def test_init_prepare_train_merge(tmp_path, corpus, rwkv_oracle, capsys, version):
    base = tmp_path / "base.pth"
    argv = ["init", "--version", version, "--output", str(base), "--n_layer", str(N_LAYER), "--n_embd", "64"]
    assert main([*argv, "--head_size", "32", "--vocab_size", "65536", "--style", "random"]) == 0
    base_sd = load_state_dict(base)
    assert "blocks.0.att.gate.weight" in base_sd and base_sd["blocks.0.att.time_faaaa"].shape == (2, 32)
    tokens = BinIdx(corpus).doc(5)[:30].tolist()

    for mode in ("bone", "bat"):
        proj = tmp_path / mode
        assert train(base, corpus, proj, mode, "--my_testing", version) == 0
        adapter = proj / "rwkv-0.pth"
        sd = load_state_dict(adapter)
        disha = {k for k in sd if k.endswith(".disha")}
        assert disha == {f"blocks.{i}.{t}.disha" for i in range(N_LAYER) for t in RWKV6_TARGETS}
        assert all(sd[k].abs().sum() > 0 for k in disha)  # every adapted layer trained
        # --train_parts time ln (the default): every time_* tensor and every norm, with the base's names
        parts = {k for k in base_sd if "time_" in k or "ln" in k}
        assert set(sd) - disha == parts and len([k for k in parts if "time_" in k]) >= 2 * N_LAYER
        assert json.loads((proj / "rwkv-0.json").read_text())["adapter"]["targets"] == list(RWKV6_TARGETS)

        merged = tmp_path / f"merged-{mode}.pth"
        argv = ["merge", "--base_model", str(base), "--peft_checkpoint", str(adapter)]
        assert main([*argv, "--output", str(merged)]) == 0
        merged_sd = load_state_dict(merged)
        assert list(merged_sd) == list(base_sd)  # exactly the base's keys, in its order
        with torch.no_grad():
            ours = load_for_inference(str(base), str(adapter))(torch.tensor([tokens]))[0]
            from_merged = load_for_inference(str(merged))(torch.tensor([tokens]))[0]
        torch.testing.assert_close(from_merged, ours, atol=1e-5, rtol=1e-5)
        if mode == "bone":  # the rwkv package once per version (Bat's merge is the same code path)
            theirs = rwkv_oracle(merged, tokens, version=version)
            torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
            assert not torch.allclose(theirs, rwkv_oracle(base, tokens, version=version), atol=1e-3)
            # generate (stateful, token by token) and eval run on the adapter / merged model
            capsys.readouterr()
            gen = ["generate", "--load_model", str(base), "--peft_checkpoint", str(adapter), "--prompt", "Hi"]
            assert main([*gen, "--max_tokens", "4", "--temperature", "0"]) == 0
            ev = ["eval", "--load_model", str(merged), "--data_file", corpus, "--ctx_len", "24"]
            ev += ["--micro_bsz", "2", "--max_samples", "4", "--json", str(tmp_path / "e.json")]
            assert main(ev) == 0
            assert capsys.readouterr().out and json.loads((tmp_path / "e.json").read_text())


@pytest.mark.parametrize("version,flag", [("x070", "x060"), ("x060", "x070"), ("x052", "x060")])
def test_my_testing_disagreeing_with_the_file_is_one_error(tmp_path, corpus, capsys, version, flag):
    base = tmp_path / "base.pth"
    argv = ["init", "--version", version, "--output", str(base), "--n_layer", "1", "--n_embd", "64"]
    assert main([*argv, "--head_size", "32", "--vocab_size", "300"]) == 0  # refused before data is read
    capsys.readouterr()
    assert train(base, corpus, tmp_path / "out", "bone", "--my_testing", flag) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --my_testing ") and err.count("\n") == 1 and "Traceback" not in err
    names = {"x070": "RWKV-7", "x060": "RWKV-6", "x052": "RWKV-5.2"}
    assert f"{flag} ({names[flag]}) disagrees" in err and f"is {names[version]} ({version}" in err
    assert not (tmp_path / "out").exists()  # refused before anything was written
