"""--resume continues the run as it was: a flag that changes which samples the rest of the run sees or how
a step is formed is refused (one line, nothing written); the same value, or a flag that may change (more
epochs, learning rate, logging), is accepted."""

import json
from pathlib import Path

import pytest
from run_helpers import copy_run, one_error_line, snapshot

from rwkv_disha.cli import main


def fix(run: Path) -> str:
    return (
        f"--resume continues the run as it was; to change it, start a new run from its last adapter "
        f'({run}/rwkv-N.pth as "load" in --disha_config) with a new --proj_dir'
    )


CHANGED = [
    (["--micro_bsz", "4"], "--micro_bsz 4 differs from the run's 2"),
    (["--ctx_len", "32"], "--ctx_len 32 differs from the run's 16"),
    (["--accumulate_grad_batches", "2"], "--accumulate_grad_batches 2 differs from the run's 1"),
    (["--epoch_steps", "4"], "--epoch_steps 4 differs from the run's 2"),
    (["--data_type", "dummy"], "--data_type dummy differs from the run's binidx"),
    (["--dataload", "get"], "--dataload get differs from the run's pad"),
    (["--random_seed", "-1"], "--random_seed -1 differs from the run's 1"),
    (["--epoch_begin", "3"], "--epoch_begin 3 differs from the run's 0"),
    (["--data_shuffle", "0"], "--data_shuffle False differs from the run's True"),
    (["--devices", "2"], "--devices 2 differs from the run's 1"),
    (["--quant", "nf4"], "--quant nf4 differs from the run's none"),
]


@pytest.mark.parametrize("flags,message", CHANGED, ids=[c[0][0][2:] for c in CHANGED])
def test_a_flag_that_changes_the_samples_or_the_step_is_refused(
    tmp_path, done, no_model_load, capsys, flags, message
):
    run = copy_run(done, tmp_path / "run")
    before = snapshot(tmp_path)
    assert main(["train", "--resume", str(run), "--epoch_count", "2", *flags]) == 2
    assert one_error_line(capsys) == f"--resume {run}: {message}: {fix(run)}"
    assert snapshot(tmp_path) == before


def test_two_flags_at_once(tmp_path, done, no_model_load, capsys):
    run = copy_run(done, tmp_path / "run")
    assert main(["train", "--resume", str(run), "--ctx_len", "64", "--micro_bsz", "3"]) == 2
    assert one_error_line(capsys).startswith(
        f"--resume {run}: --ctx_len 64, --micro_bsz 3 differ from the run's 16, 2: "
        "--resume continues the run as it was; to change them, start a new run"
    )


def test_another_data_file_of_a_run_that_recorded_no_fingerprint(
    tmp_path, done, unique_data, no_model_load, capsys
):
    """A run of an older version recorded no data fingerprint: another --data_file, while the run's own is
    still there, is refused by its path (with a fingerprint, its files decide: test_resume_records.py)."""
    run = copy_run(done, tmp_path / "run")
    saved = json.loads((run / "train_config.json").read_text())
    saved.pop("fingerprints", None)
    (run / "train_config.json").write_text(json.dumps(saved))
    stored = saved["data"]["data_file"]
    assert main(["train", "--resume", str(run), "--data_file", unique_data]) == 2
    assert (
        one_error_line(capsys)
        == f"--resume {run}: --data_file {unique_data} differs from the run's {stored}: {fix(run)}"
    )


def test_a_yaml_config_is_held_to_the_same_rule(tmp_path, done, no_model_load, capsys):
    run = copy_run(done, tmp_path / "run")
    (tmp_path / "more.yaml").write_text("epoch_count: 2\nctx_len: 64\n")
    assert main(["train", "--resume", str(run), "--config", str(tmp_path / "more.yaml")]) == 2
    assert one_error_line(capsys) == f"--resume {run}: --ctx_len 64 differs from the run's 16: {fix(run)}"


def test_the_same_values_and_changeable_flags_are_accepted(tmp_path, done, count_data, monkeypatch):
    """The run's own values (the data as prefix.bin from another folder), and what may change at resume:
    more epochs, learning rate, clipping, logging."""
    run = copy_run(done, tmp_path / "run")
    monkeypatch.chdir(Path(count_data).parent)
    argv = ["train", "--resume", str(run), "--epoch_count", "2", "--micro_bsz", "2", "--ctx_len", "16"]
    argv += ["--random_seed", "1", "--data_file", Path(count_data).name + ".bin", "--data_type", "binidx"]
    argv += ["--lr_init", "5e-3", "--lr_final", "1e-3", "--grad_clip", "0.5", "--log_every_n_steps", "2"]
    assert main([*argv, "--progress_bar", "0", "--epoch_save", "1", "--num_workers", "0"]) == 0
    assert (run / "rwkv-1.pth").is_file()
    saved = json.loads((run / "train_config.json").read_text())
    assert saved["optim"]["lr_init"] == 5e-3 and saved["data"]["micro_bsz"] == 2
