"""generate / eval / export, third sweep: a temperature whose reciprocal overflows float32 is greedy;
--lora_alpha replaces a LoRA sidecar's value in generate, eval and export as in merge (other kinds refuse
it); eval's --lora_alpha, --seed (get windows in the seeded order), memory check and --json-is-an-input
refusal; an empty stdin prompt, a prompt-file folder and a Hugging Face model folder are one line each."""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import rwkv_disha.data.dataset as dataset_module
import rwkv_disha.generate as generate
from rwkv_disha.adapters import AdapterConfig
from rwkv_disha.cli import main
from rwkv_disha.data.binidx import write_binidx
from rwkv_disha.data.dataset import make_dataset
from rwkv_disha.evaluate import evaluate_loss
from rwkv_disha.generate import load_for_inference, sample_token

NOTICE = "using --lora_alpha 1000 instead of the sidecar's 8"


@pytest.fixture(scope="module")
def files(make_checkpoint, tmp_path_factory, random_adapter):
    """A World-vocabulary base, a LoRA (alpha 8, with sidecar), the same LoRA without sidecar, a Bone, and
    binidx data of ~300 tokens (ids < 256)."""
    d = tmp_path_factory.mktemp("sweep3")
    base = make_checkpoint(2, 64, 65536, seed=5)
    lora_cfg = AdapterConfig.from_cli("lora", lora_config='{"lora_r":4,"lora_alpha":8}')
    lora = random_adapter(base, lora_cfg, d / "lora" / "rwkv-0.pth")
    (d / "ns").mkdir()
    bare = Path(shutil.copy(lora, d / "ns" / "lora.pth"))  # an RWKV-PEFT style file: no sidecar
    bone_cfg = AdapterConfig.from_cli("disha", disha_config='{"mode":"bone","r":16}')
    bone = random_adapter(base, bone_cfg, d / "bone" / "rwkv-0.pth")
    rng = np.random.default_rng(0)
    docs = [np.append(rng.integers(1, 255, int(rng.integers(20, 50))), 0).astype(np.int32) for _ in range(9)]
    write_binidx(d / "data", docs)
    return {"base": Path(base), "lora": Path(lora), "bare": bare, "bone": Path(bone), "data": d / "data"}


def ok(capsys, argv: list) -> tuple[str, str]:
    """Run the CLI, expect exit 0; (stdout, stderr)."""
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 0
    cap = capsys.readouterr()
    return cap.out, cap.err


def refused(capsys, monkeypatch, watched: Path, argv: list) -> str:
    """Exit 2 with one `error:` line (returned), no traceback, nothing under ``watched`` created or
    changed, and neither a model nor the data loaded."""

    def never(*args, **kw):
        raise AssertionError("loaded before the options were checked")

    monkeypatch.setattr(generate, "load_for_inference", never)
    monkeypatch.setattr(dataset_module, "make_dataset", never)
    before = {p: p.read_bytes() for p in watched.rglob("*") if p.is_file()}
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert {p: p.read_bytes() for p in watched.rglob("*") if p.is_file()} == before
    return lines[0]


# --- 1. temperature ----------------------------------------------------------------------------------
def test_a_temperature_whose_reciprocal_overflows_float32_is_greedy(files, capsys):
    logits = torch.tensor([0.0, 5.0, 4.9, -3.0])
    g = torch.Generator().manual_seed(0)
    assert {sample_token(logits, 1e-300, 1.0, 0, g) for _ in range(10)} == {1}  # 1e-300 is 0 in float32
    assert {sample_token(logits, 1e-39, 0.85, 2, g) for _ in range(10)} == {1}
    common = ["generate", "--load_model", files["base"], "--prompt", "Hello world", "--max_tokens", 8]
    greedy, _ = ok(capsys, [*common, "--temperature", 0])
    tiny, _ = ok(capsys, [*common, "--temperature", "1e-300"])
    assert tiny == greedy and greedy.strip()


# --- 2. --lora_alpha in generate / export -----------------------------------------------------------
def test_generate_lora_alpha_replaces_the_sidecars_as_merge_does(files, tmp_path, capsys):
    merged_out, _ = ok(capsys, ["merge", "--base_model", files["base"], "--peft_checkpoint", files["lora"],
                                "--lora_alpha", 1000, "--output", tmp_path / "m.pth"])  # fmt: skip
    assert NOTICE in merged_out
    common = ["--prompt", "Hello world", "--temperature", 0, "--max_tokens", 12]
    gen = ["generate", "--load_model", files["base"], "--peft_checkpoint", files["lora"], *common]
    on_the_fly, err = ok(capsys, [*gen, "--lora_alpha", 1000])
    from_merged, _ = ok(capsys, ["generate", "--load_model", tmp_path / "m.pth", *common])
    from_sidecar, err8 = ok(capsys, gen)
    assert on_the_fly == from_merged
    assert on_the_fly != from_sidecar  # alpha 1000 / r 4 against the sidecar's 8 / 4: another model
    assert err.splitlines().count(NOTICE) == 1 and "lora_alpha" not in err8
    same, err_same = ok(capsys, [*gen, "--lora_alpha", 8])  # the sidecar's own value: no notice
    assert same == from_sidecar and "lora_alpha" not in err_same


def test_export_writes_the_given_lora_alpha(files, tmp_path, capsys):
    out, _ = ok(capsys, ["export", "--peft_checkpoint", files["lora"], "--format", "peft",
                         "--lora_alpha", 99, "--output", tmp_path / "pf"])  # fmt: skip
    assert out.splitlines()[0] == "using --lora_alpha 99 instead of the sidecar's 8"
    assert json.loads((tmp_path / "pf" / "adapter_config.json").read_text())["lora_alpha"] == 99
    ok(capsys, ["export", "--peft_checkpoint", files["lora"], "--format", "pth",
                "--lora_alpha", 99, "--output", tmp_path / "a.pth"])  # fmt: skip
    assert json.loads((tmp_path / "a.json").read_text())["adapter"]["lora_alpha"] == 99


@pytest.mark.parametrize("command", ["generate", "eval", "export"])
def test_lora_alpha_is_refused_for_a_bone_adapter(files, tmp_path, capsys, monkeypatch, command):
    argv = {
        "generate": ["generate", "--load_model", files["base"], "--prompt", "hi"],
        "eval": ["eval", "--load_model", files["base"], "--data_file", files["data"]],
        "export": ["export", "--format", "peft", "--output", tmp_path / "pf"],
    }[command]
    line = refused(
        capsys, monkeypatch, tmp_path, [*argv, "--peft_checkpoint", files["bone"], "--lora_alpha", 5]
    )
    assert line == (
        f"error: --lora_alpha 5 scales LoRA adapters, but adapter file {files['bone']} holds Bone r=16: "
        "drop --lora_alpha"
    )
    assert list(tmp_path.iterdir()) == []


def test_lora_alpha_without_an_adapter_is_refused(files, tmp_path, capsys, monkeypatch):
    base, alpha = ["--load_model", files["base"]], ["--lora_alpha", 5]
    line = refused(capsys, monkeypatch, tmp_path, ["generate", *base, "--prompt", "hi", *alpha])
    assert line.endswith("none is given: give one with --peft_checkpoint, or drop --lora_alpha")
    line = refused(capsys, monkeypatch, tmp_path, ["eval", *base, "--data_file", files["data"], *alpha])
    assert line.endswith("give one with --peft_checkpoint or --compare, or drop --lora_alpha")
    hf = ["export", "--format", "hf", *base, "--output", tmp_path / "hf", *alpha]
    assert "reads no --lora_alpha" in refused(capsys, monkeypatch, tmp_path, hf)


# --- 3. eval --lora_alpha ------------------------------------------------------------------------------
def test_eval_lora_alpha_for_files_without_sidecar_and_over_the_sidecar(files, tmp_path, capsys):
    ev = ["eval", "--load_model", files["base"], "--data_file", files["data"], "--ctx_len", 32,
          "--max_samples", 0]  # fmt: skip
    with_sidecar = json.loads(ok(capsys, [*ev, "--peft_checkpoint", files["lora"]])[0])
    bare = json.loads(ok(capsys, [*ev, "--peft_checkpoint", files["bare"], "--lora_alpha", 8])[0])
    assert bare == with_sidecar
    ok(capsys, ["merge", "--base_model", files["base"], "--peft_checkpoint", files["lora"],
                "--lora_alpha", 1000, "--output", tmp_path / "m.pth"])  # fmt: skip
    merged = json.loads(ok(capsys, [*ev[:2], tmp_path / "m.pth", *ev[3:]])[0])
    out, err = ok(capsys, [*ev, "--peft_checkpoint", files["lora"], "--compare", files["bare"],
                           "--lora_alpha", 1000, "--json", tmp_path / "rows.json"])  # fmt: skip
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert err.splitlines().count(NOTICE) == 1  # the sidecar file; the bare one takes 1000 as it is
    assert rows[0]["loss"] == pytest.approx(merged["loss"], abs=1e-4)
    assert rows[1]["loss"] == pytest.approx(merged["loss"], abs=1e-4)
    assert abs(rows[0]["loss"] - with_sidecar["loss"]) > 1e-3  # alpha 1000 is not the sidecar's 8


# --- 4. eval --seed --------------------------------------------------------------------------------------
def test_eval_seed_draws_the_get_windows_as_the_datasets_shuffle(files, capsys):
    ev = ["eval", "--load_model", files["base"], "--data_file", files["data"], "--ctx_len", 16,
          "--dataload", "get", "--micro_bsz", 2, "--max_samples", 4]  # fmt: skip
    losses = {s: json.loads(ok(capsys, [*ev, "--seed", s])[0])["loss"] for s in (0, 1, 2, 3)}
    assert len(set(losses.values())) == 4  # each seed: other windows
    assert json.loads(ok(capsys, [*ev, "--seed", 2])[0])["loss"] == losses[2]
    model = load_for_inference(str(files["base"]))
    for seed in (0, 3):
        ds = make_dataset(str(files["data"]), "binidx", "get", 16, 2, 2, "pad", seed, 65536, shuffle=True)
        assert evaluate_loss(model, ds, 2, 4)["loss"] == pytest.approx(losses[seed], rel=1e-6)


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--seed", "-1"], "error: --seed must be in [0, 2**32), got -1"),
        (["--seed", str(2**32)], f"error: --seed must be in [0, 2**32), got {2**32}"),
        (
            ["--seed", "3"],
            "error: --seed draws the windows of --dataload get; --dataload pad reads the "
            "documents in file order: drop --seed, or use --dataload get",
        ),  # fmt: skip
    ],
)
def test_eval_seed_out_of_range_or_unread_is_refused(files, tmp_path, capsys, monkeypatch, extra, expected):
    argv = ["eval", "--load_model", files["base"], "--data_file", files["data"], *extra]
    assert refused(capsys, monkeypatch, tmp_path, argv) == expected


# --- 5. eval memory ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dataload", ["pad", "get"])
def test_eval_refuses_a_batch_beyond_memory_before_the_data_opens(files, tmp_path, capsys, monkeypatch,
                                                                  dataload):  # fmt: skip
    argv = ["eval", "--load_model", files["base"], "--data_file", files["data"], "--ctx_len", 99999999999,
            "--dataload", dataload]  # fmt: skip
    line = refused(capsys, monkeypatch, tmp_path, argv)
    assert line.startswith("error: --ctx_len 99999999999 x --micro_bsz 4 needs more than ")
    assert line.endswith("lower --ctx_len or --micro_bsz")


# --- 6. eval --json is never an input ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "flag, target",
    [
        ("--load_model", "model"),
        ("--load_model", "model_sidecar"),
        ("--load_model", "symlink"),
        ("--peft_checkpoint", "adapter"),
        ("--peft_checkpoint", "adapter_sidecar"),
        ("--compare", "adapter"),
        ("--data_file", "data.idx"),
        ("--data_file", "data.bin"),
        ("--data_file", "data.mask.idx"),
        ("--data_file", "data.mask.bin"),
    ],
)
def test_eval_json_that_is_an_input_is_refused_even_with_overwrite(files, tmp_path, capsys, monkeypatch,
                                                                   flag, target):  # fmt: skip
    model = Path(shutil.copy(files["base"], tmp_path / "ev.pth"))
    adapter = Path(shutil.copy(files["lora"], tmp_path / "rwkv-0.pth"))
    shutil.copy(files["lora"].with_suffix(".json"), tmp_path / "rwkv-0.json")
    for ext in (".bin", ".idx"):  # the data with answer masks beside it
        shutil.copy(str(files["data"]) + ext, tmp_path / f"data{ext}")
        shutil.copy(str(files["data"]) + ext, tmp_path / f"data.mask{ext}")
    (tmp_path / "link.pth").symlink_to(model)
    json_path = {
        "model": model,
        "model_sidecar": tmp_path / "ev.json",
        "symlink": tmp_path / "link.pth",
        "adapter": adapter,
        "adapter_sidecar": tmp_path / "rwkv-0.json",
    }.get(target, tmp_path / target)
    argv = ["eval", "--load_model", model, "--data_file", tmp_path / "data", "--ctx_len", 32]
    if flag == "--peft_checkpoint":
        argv += ["--peft_checkpoint", adapter]
    if flag == "--compare":
        argv += ["--compare", adapter]
    line = refused(capsys, monkeypatch, tmp_path, [*argv, "--json", json_path, "--overwrite", 1])
    assert line.startswith(f"error: --json {json_path} would overwrite the ")
    assert line.endswith(": write the results elsewhere")
    assert not (tmp_path / "ev.json").exists()


# --- 7. prompts ------------------------------------------------------------------------------------------
def test_prompt_file_folder_and_empty_stdin_are_one_line(files, tmp_path, capsys, monkeypatch):
    line = refused(capsys, monkeypatch, tmp_path,
                   ["generate", "--load_model", files["base"], "--prompt_file", tmp_path])  # fmt: skip
    assert line == f"error: --prompt_file {tmp_path} is a directory; give a prompt file (.jsonl, or text)"
    for prompt in ("-", ""):
        monkeypatch.setattr(sys, "stdin", io.StringIO(""))
        line = refused(capsys, monkeypatch, tmp_path,
                       ["generate", "--load_model", files["base"], "--prompt", prompt])  # fmt: skip
        assert line == (
            "error: stdin holds no prompt (--prompt '' or '-' reads it from there): pipe one in, or give "
            "--prompt TEXT"
        )


# --- 8. a Hugging Face model folder ----------------------------------------------------------------------
@pytest.mark.parametrize("command", ["generate", "eval"])
def test_a_hugging_face_model_folder_names_the_import_command(make_checkpoint, tmp_path, capsys, monkeypatch,
                                                              command):  # fmt: skip
    hf = tmp_path / "hf"
    ok(capsys, ["export", "--format", "hf", "--load_model", make_checkpoint(2, 64, 256), "--output", hf])
    rest = ["--prompt", "hi"] if command == "generate" else ["--data_file", tmp_path / "data"]
    fix = f"convert it with `rwkv-disha import --hf_model {hf} --output model.pth` and give the .pth"
    line = refused(capsys, monkeypatch, tmp_path, [command, "--load_model", hf, *rest])
    assert line == f"error: --load_model {hf} is a Hugging Face model folder: {fix}"
    weights = hf / "model.safetensors"
    line = refused(capsys, monkeypatch, tmp_path, [command, "--load_model", weights, *rest])
    keys = "(model.embeddings / model.layers.N keys)"
    assert line == f"error: {weights} is the weights of a Hugging Face model folder {keys}: {fix}"
    assert sorted(os.listdir(hf)) == ["config.json", "model.safetensors"]
