"""Training never saves a non-finite adapter, reads resume.ckpt safely, and does not clobber other runs."""

import errno
import json
import os
import re
import subprocess
import sys
import time

import lightning as L
import pytest
import torch

from rwkv_disha.cli import main, parse_config
from rwkv_disha.model.load import load_state_dict
from rwkv_disha.train.run import setup


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def adapter_files(proj):
    return sorted(p.name for p in proj.glob("rwkv-*.pth"))


def test_divergence_stops_with_one_line_and_saves_nothing(
    tmp_path, base_path, count_data, train_args, capsys
):
    proj = tmp_path / "p"
    argv = train_args(base_path, count_data, proj, "--grad_clip", "0", lr="1e3", epochs=2, steps=8)
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert line.startswith("error: training diverged at step ")
    assert "the loss is nan" in line and "last finite loss " in line
    assert "a lower --lr_init (now 1000)" in line and "--grad_clip 1" in line
    assert adapter_files(proj) == [] and not (proj / "resume.ckpt").exists()
    assert "training finished" not in capsys.readouterr().out


class PoisonAt(L.Callback):
    """Turns an adapter tensor into NaN after the given (epoch, batch): a base or update gone bad."""

    def __init__(self, epoch: int, batch: int):
        self.epoch, self.batch = epoch, batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (trainer.current_epoch, batch_idx) == (self.epoch, self.batch):
            with torch.no_grad():
                next(p for n, p in pl_module.model.named_parameters() if n.endswith(".disha")).fill_(
                    float("nan")
                )


@pytest.mark.parametrize("batch", [1, 3], ids=["mid-epoch", "last-step-of-epoch"])
def test_nan_in_epoch_1_keeps_epoch_0_as_the_newest(tmp_path, base_path, count_data, train_args, batch):
    proj = tmp_path / "p"
    _, cfg = parse_config("train", train_args(base_path, count_data, proj, epochs=3, steps=4)[1:])
    with pytest.raises(Exception, match="training diverged at step") as info:
        setup(cfg, extra_callbacks=[PoisonAt(epoch=1, batch=batch)])
    # batch 3 is the epoch's last: the loss was finite, the tensors were not -> refused at save time
    assert ("no longer finite" in str(info.value)) == (batch == 3)
    assert adapter_files(proj) == ["rwkv-0.pth"]
    assert all(torch.isfinite(t).all() for t in load_state_dict(proj / "rwkv-0.pth").values())
    ckpt = torch.load(proj / "resume.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4 and ckpt["rwkv_disha"]["epoch_batches"] == 0  # epoch 0's end
    assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values())
    assert not list(proj.glob(".*.tmp"))


class Payload:
    """Unpickling this creates a file: the proof that code from the checkpoint ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _resumable_folder(tmp_path, base_path, count_data):
    proj = tmp_path / "run"
    proj.mkdir()
    saved = {"load_model": str(base_path), "proj_dir": str(proj), "data": {"data_file": count_data}}
    (proj / "train_config.json").write_text(json.dumps(saved))
    return proj


def test_pickle_payload_in_resume_ckpt_is_refused(tmp_path, base_path, count_data, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # would make torch's default unpickle
    proj = _resumable_folder(tmp_path, base_path, count_data)
    marker = tmp_path / "marker"
    torch.save({"state_dict": {}, "evil": Payload(marker)}, proj / "resume.ckpt")
    before = sorted(p.name for p in proj.iterdir())
    assert main(["train", "--resume", str(proj), "--progress_bar", "0", "--accelerator", "cpu"]) == 2
    line = one_error_line(capsys)
    assert f"--resume: {proj / 'resume.ckpt'} is not an rwkv-disha resume checkpoint" in line
    assert not marker.exists()
    assert sorted(p.name for p in proj.iterdir()) == before  # nothing written


@pytest.mark.parametrize(
    "what,content,message",
    [
        ("resume.ckpt", b"not a zip at all", "is not an rwkv-disha resume checkpoint"),
        ("resume.ckpt", {"a": torch.zeros(2)}, "missing its training state"),
        ("train_config.json", b"{ nope", "is not a readable train_config.json"),
        ("train_config.json", b'{"colour": "red"}', "unknown options: colour"),
        ("train_config.json", b'{"optim": {"lr_init": "fast"}}', "option lr_init has the wrong type"),
    ],
    ids=["ckpt-garbage", "ckpt-foreign", "json-garbage", "json-foreign", "json-types"],
)
def test_corrupt_resume_files_are_one_line(tmp_path, base_path, count_data, capsys, what, content, message):
    proj = _resumable_folder(tmp_path, base_path, count_data)
    torch.save({"state_dict": {}}, proj / "resume.ckpt")
    if isinstance(content, bytes):
        (proj / what).write_bytes(content)
    else:
        torch.save(content, proj / what)
    assert main(["train", "--resume", str(proj), "--accelerator", "cpu"]) == 2
    assert message in one_error_line(capsys)


def test_resume_with_other_adapter_shapes_is_one_line(tmp_path, base_path, count_data, train_args, capsys):
    proj = tmp_path / "p"
    assert main(train_args(base_path, count_data, proj, epochs=1, steps=2)) == 0
    capsys.readouterr()
    other = ["train", "--resume", str(proj), "--disha_config", '{"mode":"bone","load":"","r":32}']
    assert main(other) == 2
    line = one_error_line(capsys)
    assert re.search(r"has blocks\.0\.att\.\w+\.disha of shape \(16, 64\), this run needs \(32, 64\)", line)


def test_fresh_run_into_a_used_folder(tmp_path, base_path, count_data, train_args, capsys):
    proj = tmp_path / "p"
    assert main(train_args(base_path, count_data, proj, epochs=1, steps=2)) == 0
    stale = proj / ".resume.ckpt.999999999.abc.tmp"  # a killed run's temporary file (no such pid)
    stale.write_bytes(b"half")
    before = {p.name: p.stat().st_mtime_ns for p in proj.iterdir()}
    capsys.readouterr()
    assert main(train_args(base_path, count_data, proj, epochs=1, steps=2)) == 2
    line = one_error_line(capsys)
    assert f"--proj_dir {proj} holds an earlier run (rwkv-0.pth, resume.ckpt)" in line
    assert f"--resume {proj}" in line and "--overwrite 1" in line
    after = {p.name: p.stat().st_mtime_ns for p in proj.iterdir()}
    assert {k: v for k, v in after.items() if k != ".rwkv-disha.lock"} == {
        k: v for k, v in before.items() if k != ".rwkv-disha.lock"
    }
    assert main(train_args(base_path, count_data, proj, "--overwrite", "1", epochs=1, steps=2)) == 0
    assert not stale.exists()  # cleaned by the next run in that folder


def test_full_disk_while_saving_resume_ckpt(tmp_path, base_path, count_data, train_args, monkeypatch, capsys):
    def full(self, filepath, *a, **k):
        with open(filepath, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(filepath))

    monkeypatch.setattr(L.Trainer, "save_checkpoint", full)
    proj = tmp_path / "p"
    assert main(train_args(base_path, count_data, proj, epochs=1, steps=2)) == 2
    line = one_error_line(capsys)
    assert (
        line == f"error: cannot write resume checkpoint {proj / 'resume.ckpt'}: no space left on the device"
    )
    assert not (proj / "resume.ckpt").exists() and not list(proj.glob(".*.tmp"))


def test_second_concurrent_run_is_refused(tmp_path, base_path, count_data, train_args, capsys):
    proj = tmp_path / "p"
    argv = train_args(base_path, count_data, proj, epochs=3, steps=12)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    first = subprocess.Popen([sys.executable, "-m", "rwkv_disha.cli", *argv], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    lock = proj / ".rwkv-disha.lock"
    deadline = time.time() + 120
    while not (lock.exists() and f"pid {first.pid}" in lock.read_text()) and first.poll() is None:
        assert time.time() < deadline
        time.sleep(0.2)
    assert first.poll() is None, first.communicate()
    assert main(train_args(base_path, count_data, proj, "--overwrite", "1", epochs=1, steps=2)) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: {proj} is in use by rwkv-disha train (pid {first.pid})")
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    assert "training finished" in out and adapter_files(proj) == ["rwkv-0.pth", "rwkv-1.pth", "rwkv-2.pth"]
