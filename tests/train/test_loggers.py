"""--wandb (offline) and --tensorboard write their logs (skipped when the packages are not installed)."""

import pytest

from rwkv_disha.cli import main


def test_wandb_offline(tmp_path, base_path, count_data, train_args, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    proj = tmp_path / "w"
    assert main(train_args(base_path, count_data, proj, "--wandb", "rwkv-disha-test", epochs=1, steps=3)) == 0
    runs = list((proj / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


def test_tensorboard(tmp_path, base_path, count_data, train_args):
    pytest.importorskip("tensorboard")
    proj = tmp_path / "t"
    assert main(train_args(base_path, count_data, proj, "--tensorboard", "1", epochs=1, steps=3)) == 0
    events = list((proj / "tb").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_missing_logger_package_is_a_clear_error(
    tmp_path, base_path, count_data, train_args, monkeypatch, capsys
):
    import importlib.util

    real = importlib.util.find_spec
    fake = lambda name, *a: None if name == "wandb" else real(name, *a)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", fake)
    assert main(train_args(base_path, count_data, tmp_path / "x", "--wandb", "p", epochs=1, steps=2)) == 2
    assert "--wandb needs the wandb package: pip install wandb" in capsys.readouterr().err
