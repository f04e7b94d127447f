"""Bad `train` inputs: one-line errors, before any model is loaded, with nothing written."""

import pytest

from rwkv_disha.cli import main


def flags(argv, **changes):
    out = list(argv)
    for k, v in changes.items():
        i = out.index(f"--{k}")
        out[i + 1] = str(v)
    return out


CASES = [
    ("missing model", {"load_model": "{tmp}/nope.pth"}, [], "--load_model {tmp}/nope.pth: file not found"),
    ("missing data", {"data_file": "{tmp}/nodata"}, [], "data file not found: {tmp}/nodata.idx"),
    (
        "wrong n_layer",
        {},
        ["--n_layer", "24"],
        "--n_layer 24 disagrees with the checkpoint, which has n_layer = 2",
    ),
    (
        "wrong n_embd",
        {},
        ["--n_embd", "1024"],
        "--n_embd 1024 disagrees with the checkpoint, which has n_embd = 64",
    ),
    (
        "deepspeed on cpu",
        {},
        ["--strategy", "deepspeed_stage_1"],
        "--strategy deepspeed_stage_1 needs CUDA GPUs",
    ),
    ("fsdp on cpu", {}, ["--strategy", "fsdp"], "--strategy fsdp needs CUDA GPUs"),
    (
        "only with bsz>1",
        {},
        ["--dataload", "only"],
        "--dataload only takes one document per step: use --micro_bsz 1",
    ),
    ("ctx_len 0", {"ctx_len": 0}, [], "--ctx_len must be positive, got 0"),
    ("ctx_len negative", {"ctx_len": -5}, [], "--ctx_len must be positive, got -5"),
    ("bad disha json", {}, ["--disha_config", "{mode:bone}"], "--disha_config"),
    ("unknown mode", {}, ["--disha_config", '{"mode":"bane","r":8}'], "mode 'bane' is unknown"),
    ("fp16 on cpu", {}, ["--precision", "fp16"], "--precision fp16 is GPU-only"),
    ("wds_img", {}, ["--data_type", "wds_img"], "image data is not supported"),
    ("resume without ckpt", {}, ["--resume", "{tmp}"], "no resume.ckpt there"),
    ("model is a folder", {"load_model": "{tmp}"}, [], "--load_model {tmp} is a directory"),
    ("beta1 1", {}, ["--beta1", "1"], "--beta1 must be in [0, 1), got 1.0"),
    ("beta2 negative", {}, ["--beta2", "-0.1"], "--beta2 must be in [0, 1), got -0.1"),
    ("adam_eps 0", {}, ["--adam_eps", "0"], "--adam_eps must be > 0, got 0.0"),
    ("num_workers negative", {}, ["--num_workers", "-1"], "--num_workers must be >= 0, got -1"),
    ("warmup negative", {}, ["--warmup_steps", "-2"], "--warmup_steps must be >= 0, got -2"),
    ("wsd frac > 1", {}, ["--wsd_decay_frac", "1.5"], "--wsd_decay_frac must be in [0, 1], got 1.5"),
    ("grad_clip negative", {}, ["--grad_clip", "-1"], "--grad_clip must be >= 0 (0: off), got -1.0"),
    ("weight_decay negative", {}, ["--weight_decay", "-1"], "--weight_decay must be >= 0, got -1.0"),
    ("lr inf", {"lr_init": "inf"}, [], "--lr_init must be a finite number, got inf"),
    ("lr nan", {"lr_final": "nan"}, [], "--lr_final must be a finite number, got nan"),
    ("beta nan", {}, ["--beta1", "nan"], "--beta1 must be a finite number, got nan"),
    ("seed too big", {}, ["--random_seed", str(2**32)], "--random_seed must be -1 (the default seed) or in"),
    ("seed -2", {"random_seed": -2}, [], "--random_seed must be -1 (the default seed) or in 0 .. 4294967295"),
    ("epoch_save 0", {"epoch_save": 0}, [], "--epoch_save must be positive, got 0"),
    ("accumulate 0", {}, ["--accumulate_grad_batches", "0"], "--accumulate_grad_batches must be positive"),
]


@pytest.mark.parametrize("name,changes,extra,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_before_model_load(
    tmp_path, base_path, count_data, train_args, no_model_load, capsys, name, changes, extra, message
):
    proj = tmp_path / "proj"
    argv = train_args(base_path, count_data, proj)
    fill = lambda v: v.replace("{tmp}", str(tmp_path)) if isinstance(v, str) else v  # noqa: E731
    argv = flags(argv, **{k: fill(v) for k, v in changes.items()})
    argv += [fill(e) for e in extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert fill(message) in err
    assert not proj.exists()  # nothing written


def test_nan_in_yaml_is_refused_too(tmp_path, base_path, count_data, no_model_load, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"load_model: {base_path}\ndata_file: {count_data}\nproj_dir: {tmp_path / 'y'}\nlr_init: .nan\n"
    )
    assert main(["train", "--config", str(cfg)]) == 2
    assert "--lr_init must be a finite number, got nan" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def test_unwritable_proj_dir(tmp_path, base_path, count_data, train_args, no_model_load, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")
    assert main(train_args(base_path, count_data, blocker / "out")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --proj_dir {blocker / 'out'} is not writable") and "\n" not in err
    assert blocker.read_text() == "a file, not a folder"


def test_missing_load_model_flag(tmp_path, count_data, capsys):
    assert main(["train", "--data_file", count_data, "--proj_dir", str(tmp_path / "p")]) == 2
    assert "--load_model is required" in capsys.readouterr().err


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    flags = [
        "--load_model",
        "--proj_dir",
        "--data_file",
        "--data_type",
        "--vocab_size",
        "--n_layer",
        "--n_embd",
        "--ctx_len",
        "--micro_bsz",
        "--epoch_steps",
        "--epoch_count",
        "--epoch_begin",
        "--epoch_save",
        "--lr_init",
        "--lr_final",
        "--warmup_steps",
        "--beta1",
        "--beta2",
        "--adam_eps",
        "--accelerator",
        "--devices",
        "--num_nodes",
        "--precision",
        "--strategy",
        "--grad_cp",
        "--my_testing",
        "--dataload",
        "--loss_mask",
        "--peft",
        "--disha_config",
        "--lora_config",
        "--train_parts",
        "--op",
        "--quant",
        "--wandb",
        "--lr_schedule",
        "--random_seed",
        "--accumulate_grad_batches",
        "--weight_decay",
        "--resume",
        "--config",
    ]
    for flag in flags:
        assert flag in out, flag


def test_yaml_config_file(tmp_path, base_path, count_data, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"load_model: {base_path}\ndata_file: {count_data}\nproj_dir: {tmp_path / 'y'}\nctx_len: 0\n"
    )
    assert main(["train", "--config", str(cfg)]) == 2
    assert "--ctx_len must be positive, got 0" in capsys.readouterr().err
    cfg.write_text("bogus_option: 1\n")
    assert main(["train", "--config", str(cfg)]) == 2
    assert "unknown option(s) for `train`: bogus_option" in capsys.readouterr().err
