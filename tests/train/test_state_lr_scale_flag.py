"""--state_lr_scale given where no state trains next to an adapter is refused before any work: it sets the
second optimizer group's learning rate, which only --train_state 1 beside an adapter creates (it was
silently ignored without --train_state 1 and under --peft state)."""

import pytest

from rwkv_disha.cli import main


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--state_lr_scale", "5"],
            "error: --state_lr_scale sets the initial states' learning rate, and no state trains: add "
            "--train_state 1, or drop --state_lr_scale",
        ),
        (
            ["--peft", "state", "--state_lr_scale", "5"],
            "error: --state_lr_scale applies with --train_state 1 next to an adapter; with --peft state only "
            "the states train, at --lr_init: drop --state_lr_scale and set --lr_init (e.g. 0.1)",
        ),
    ],
    ids=["no-train_state", "peft-state"],
)
def test_state_lr_scale_where_it_cannot_apply_is_refused(
    flags, message, base_path, count_data, train_args, tmp_path, capsys
):
    proj = tmp_path / "never"
    assert main(train_args(base_path, count_data, proj, *flags)) == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [message]
    assert "Traceback" not in err and not proj.exists()


def test_state_lr_scale_with_train_state_is_accepted(base_path, count_data, train_args, tmp_path):
    argv = train_args(base_path, count_data, tmp_path / "run", "--train_state", "1", "--state_lr_scale", "5")
    assert main([*argv, "--dry_run", "1"]) == 0
