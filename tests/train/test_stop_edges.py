"""Stopping at the edges: a signal on an epoch's last step, while the run sets up, to the whole process
group (DataLoader workers too), an --overwrite run that crashes early, a proj_dir with spaces."""

import os
import shlex
import signal
import subprocess
import sys
import time

import lightning as L
import pytest
import torch

from rwkv_disha.cli import main, parse_config
from rwkv_disha.model.load import load_state_dict
from rwkv_disha.train import callbacks
from rwkv_disha.train.callbacks import Interrupted
from rwkv_disha.train.run import setup

EXTRA = ["--warmup_steps", "3", "--lr_final", "1e-3"]  # a schedule that moves, so the position matters


class SignalAt(L.Callback):
    """Sends this process SIGTERM as micro-batch (epoch, batch) starts."""

    def __init__(self, epoch: int, batch: int):
        self.at = (epoch, batch)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if (trainer.current_epoch, batch_idx) == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


class CrashAt(SignalAt):
    """Fails as micro-batch (epoch, batch) starts: a run that dies without saving (OOM-killed, power)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if (trainer.current_epoch, batch_idx) == self.at:
            raise RuntimeError("killed")


def _setup(argv, *extra_callbacks):
    return setup(parse_config("train", argv[1:])[1], extra_callbacks=list(extra_callbacks))


def _error_lines(err: str) -> list[str]:
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("epoch", [0, 1], ids=["first-epoch", "last-epoch"])
def test_signal_on_an_epochs_last_step_writes_that_epochs_adapter(
    tmp_path, base_path, count_data, train_args, capsys, epoch
):
    proj = tmp_path / "cut"
    argv = train_args(base_path, count_data, proj, *EXTRA, epochs=2, steps=4)
    if epoch == 0:  # the epoch's end is saved (adapter and resume.ckpt), then the run stops
        with pytest.raises(Interrupted, match=r"^stopped by SIGTERM after step 4; "):
            _setup(argv, SignalAt(0, 3))
        assert (proj / "rwkv-0.pth").is_file() and not (proj / "rwkv-1.pth").exists()
        assert torch.load(proj / "resume.ckpt", weights_only=True)["rwkv_disha"]["epoch_batches"] == 0
        assert main(["train", "--resume", str(proj)]) == 0
    else:  # the run is complete: it finishes as one
        assert _setup(argv, SignalAt(1, 3)) == 0
    assert "training finished" in capsys.readouterr().out
    assert main(train_args(base_path, count_data, tmp_path / "full", *EXTRA, epochs=2, steps=4)) == 0
    for name in ("rwkv-0.pth", "rwkv-1.pth"):
        cut, full = load_state_dict(proj / name), load_state_dict(tmp_path / "full" / name)
        assert cut.keys() == full.keys()
        for k in full:
            torch.testing.assert_close(cut[k], full[k], atol=0, rtol=0)
    epochs = [line for line in (proj / "train_log.txt").read_text().splitlines() if line.startswith("epoch ")]
    times = [float(line.rsplit(" ", 1)[1].rstrip("s")) for line in epochs]  # a resumed epoch's time too
    assert len(times) == 2 and all(0 <= t < 3600 for t in times)


def test_sigterm_while_the_run_sets_up_stops_after_the_first_step(
    tmp_path, base_path, count_data, train_args, capsys, monkeypatch
):
    """Lightning's own handler catches a SIGTERM before ours is installed; its flag alone would end the run
    after one micro-batch with exit status 0, nothing saved and nothing said."""
    write_config = callbacks.SaveAdapters.on_train_start

    def then_sigterm(self, trainer, pl_module):
        write_config(self, trainer, pl_module)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(callbacks.SaveAdapters, "on_train_start", then_sigterm)
    proj = tmp_path / "p"
    argv = train_args(base_path, count_data, proj, "--accumulate_grad_batches", "2", epochs=2, steps=4)
    assert main(argv) == 2
    [line] = _error_lines(capsys.readouterr().err)
    assert line.startswith("error: stopped by SIGTERM after step 1; ")
    ckpt = torch.load(proj / "resume.ckpt", weights_only=True)
    assert ckpt["global_step"] == 1 and ckpt["rwkv_disha"]["epoch_batches"] == 2
    monkeypatch.undo()
    assert main(["train", "--resume", str(proj)]) == 0
    assert (proj / "rwkv-1.pth").is_file()


def test_overwrite_run_that_dies_early_is_not_resumed_as_the_earlier_run(
    tmp_path, base_path, count_data, train_args, capsys
):
    proj = tmp_path / "p"
    assert main(train_args(base_path, count_data, proj, epochs=2, steps=2)) == 0
    earlier = (proj / "rwkv-1.pth").read_bytes()
    argv = train_args(base_path, count_data, proj, "--overwrite", "1", epochs=4, steps=2, lr="1e-3")
    with pytest.raises(RuntimeError, match="killed"):
        _setup(argv, CrashAt(0, 1))
    # the earlier run's resume.ckpt would have been continued under the new run's train_config.json
    assert not (proj / "resume.ckpt").exists()
    [aside] = proj.glob("previous-*")  # the earlier run is set aside whole, never deleted
    assert (aside / "rwkv-1.pth").read_bytes() == earlier and (aside / "resume.ckpt").is_file()
    assert not list(proj.glob("rwkv-*"))
    capsys.readouterr()
    assert main(["train", "--resume", str(proj)]) == 2
    [line] = _error_lines(capsys.readouterr().err)
    assert line == f"error: --resume {proj}: no resume.ckpt there (it is written at each epoch end)"


def test_sigterm_to_the_process_group_with_workers_and_a_spaced_proj_dir(
    tmp_path, base_path, count_data, train_args, capsys
):
    """A cluster's SIGTERM (or Ctrl-C's SIGINT) reaches DataLoader workers too: they must not die of it and
    fail the run before resume.ckpt is saved. The printed command must paste as is."""
    proj = tmp_path / "run ü 1"
    argv = train_args(base_path, count_data, proj, "--num_workers", "2", epochs=2, steps=40)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    proc = subprocess.Popen([sys.executable, "-m", "rwkv_disha.cli", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    metrics, deadline = proj / "metrics.csv", time.time() + 120
    while proc.poll() is None and not (metrics.exists() and len(metrics.read_text().splitlines()) > 3):
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err[-2000:]
    [line] = _error_lines(err)
    assert line.startswith("error: stopped by SIGTERM after step ")
    command = line.split("continue with `", 1)[1].rstrip("`")
    assert shlex.split(command) == ["rwkv-disha", "train", "--resume", str(proj)]
    assert (proj / "resume.ckpt").is_file() and not list(proj.glob(".*.tmp"))
