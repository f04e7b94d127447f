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


def test_wandb_without_login_is_one_error_line(tmp_path, base_path, count_data, train_args):
    """--wandb online with no API key and no terminal to ask on: wandb's UsageError becomes one `error:`
    line naming `wandb login` and WANDB_MODE=offline (it was a traceback, exit 1). A subprocess: wandb
    keeps its settings (offline, from the test above) for the life of a process."""
    import os
    import subprocess
    import sys

    pytest.importorskip("wandb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "NETRC"}
    env.update(HOME=str(tmp_path), WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"), WANDB_SILENT="true")
    argv = train_args(base_path, count_data, tmp_path / "p", "--wandb", "p", epochs=1, steps=2)
    r = subprocess.run(
        [sys.executable, "-m", "rwkv_disha.cli", *argv],
        capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=600,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    line = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and "--wandb p: W&B could not start" in line[0]
    assert "wandb login" in line[0] and "WANDB_MODE=offline" in line[0]
    assert not list((tmp_path / "p").glob("rwkv-*.pth"))
