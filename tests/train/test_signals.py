"""SIGTERM / SIGINT during training: the step finishes, resume.ckpt is written, --resume continues exactly."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from rwkv_disha.cli import main
from rwkv_disha.model.load import load_state_dict

EXTRA = ["--warmup_steps", "3", "--lr_final", "1e-3"]  # a schedule that moves, so the position matters


def _steps_logged(proj) -> int:
    path = proj / "metrics.csv"
    return max(len(path.read_text().splitlines()) - 1, 0) if path.exists() else 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_resume_ckpt_and_resume_continues(
    tmp_path, base_path, count_data, train_args, capsys, signum
):
    proj = tmp_path / "cut"
    argv = train_args(base_path, count_data, proj, *EXTRA, epochs=3, steps=12)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    proc = subprocess.Popen([sys.executable, "-m", "rwkv_disha.cli", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 120
    while _steps_logged(proj) < 2 and proc.poll() is None:  # training runs, our handlers are installed
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err[-2000:]
    assert "Traceback" not in err and "training finished" not in out
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    name = signal.Signals(signum).name
    assert len(errors) == 1 and errors[0].startswith(f"error: stopped by {name} after step ")
    assert errors[0].endswith(f"is saved: continue with `rwkv-disha train --resume {proj}`")
    assert not list(proj.glob(".*.tmp"))

    ckpt = torch.load(proj / "resume.ckpt", weights_only=True)
    done = ckpt["global_step"]
    assert 2 <= done < 36 and ckpt["rwkv_disha"]["epoch_batches"] == done % 12
    assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values())

    assert main(["train", "--resume", str(proj)]) == 0
    assert "training finished" in capsys.readouterr().out
    resumed = load_state_dict(proj / "rwkv-2.pth")
    if signum != signal.SIGTERM:
        return
    # the resumed run ends exactly where an uninterrupted one does
    assert main(train_args(base_path, count_data, tmp_path / "full", *EXTRA, epochs=3, steps=12)) == 0
    full = load_state_dict(tmp_path / "full" / "rwkv-2.pth")
    assert full.keys() == resumed.keys()
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], atol=0, rtol=0)
