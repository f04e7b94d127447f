"""--resume with a new learning rate or Adam setting trains with it: Lightning restores the optimizer and
the LR scheduler from resume.ckpt, their settings included, which silently kept the earlier values."""

import csv

import pytest
import torch

from rwkv_disha.cli import main


def test_learning_rate_and_adam_flags_given_at_resume_are_used(tmp_path, base_path, count_data, train_args):
    proj = tmp_path / "run"
    argv = train_args(
        base_path, count_data, proj, "--train_state", "1", "--state_lr_scale", "10", epochs=1, steps=4
    )
    assert main(argv) == 0
    given = ["--lr_init", "1e-3", "--lr_final", "1e-3", "--state_lr_scale", "100", "--adam_eps", "1e-6"]
    given += ["--weight_decay", "0.5", "--beta1", "0.5", "--beta2", "0.9"]
    assert main(["train", "--resume", str(proj), "--epoch_count", "2", *given]) == 0

    ckpt = torch.load(proj / "resume.ckpt", weights_only=True)
    adapter, states = ckpt["optimizer_states"][0]["param_groups"]
    assert (adapter["lr"], adapter["initial_lr"], adapter["weight_decay"]) == (1e-3, 1e-3, 0.5)
    assert (states["lr"], states["initial_lr"], states["weight_decay"]) == (1e-1, 1e-1, 0.0)
    for group in (adapter, states):
        assert group["eps"] == 1e-6 and tuple(group["betas"]) == (0.5, 0.9)
    assert ckpt["lr_schedulers"][0]["base_lrs"] == [1e-3, 1e-1]
    with open(proj / "metrics.csv") as f:
        lrs = {int(row["global_step"]): float(row["lr"]) for row in csv.DictReader(f)}
    assert [lrs[s] for s in (1, 4)] == [1e-2, 1e-2] and [lrs[s] for s in (5, 8)] == [1e-3, 1e-3]


@pytest.mark.parametrize("had, given", [("1", "0"), ("0", "1")])
def test_resume_with_the_other_train_state_names_the_flag(
    tmp_path, base_path, count_data, train_args, capsys, had, given
):
    proj = tmp_path / "run"
    assert main(train_args(base_path, count_data, proj, "--train_state", had, epochs=1, steps=2)) == 0
    before = (proj / "resume.ckpt").read_bytes()
    capsys.readouterr()
    assert main(["train", "--resume", str(proj), "--epoch_count", "2", "--train_state", given]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    trained = "initial states: --train_state 1" if had == "1" else "no initial states: --train_state 0"
    assert len(errors) == 1 and errors[0].endswith(f"and --train_parts (it trained {trained})")
    assert (proj / "resume.ckpt").read_bytes() == before and not (proj / "rwkv-1.pth").exists()
