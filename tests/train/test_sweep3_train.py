"""train: float options torch computes in float32, --resume with an --epoch_count already reached, and
--resume with a base of another shape (one error line each, before Lightning starts, nothing written)."""

import shutil

import pytest

from rwkv_disha.cli import main
from rwkv_disha.errors import RWKVDishaError
from rwkv_disha.train.config import load_saved_config


def one_error_line(capsys, rc: int) -> str:
    """The whole of stderr: one line, ``error: ...``, with exit status 2; returned without its prefix."""
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err.removeprefix("error: ").rstrip("\n")


F32_MAX = "give at most 3.4e+38"
F32_MIN = "give at least 1.2e-38"


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--lr_init", "1e300", "--lr_final", "1e300"],
            f"--lr_init 1e+300 does not fit float32, which torch computes it in: {F32_MAX}",
        ),
        (
            ["--lr_final", "1e39"],
            f"--lr_final 1e+39 does not fit float32, which torch computes it in: {F32_MAX}",
        ),
        (
            ["--weight_decay", "1e300"],
            f"--weight_decay 1e+300 does not fit float32, which torch computes it in: {F32_MAX}",
        ),
        (
            ["--grad_clip", "1e39"],
            f"--grad_clip 1e+39 does not fit float32, which torch computes it in: {F32_MAX}",
        ),
        (
            ["--lr_init", "1e-300", "--lr_final", "0"],
            "--lr_init 1e-300 is below float32's smallest normal number, which torch computes it in: "
            f"{F32_MIN}",
        ),
        (
            ["--adam_eps", "1e-40"],
            "--adam_eps 1e-40 is below float32's smallest normal number, which torch computes it in: "
            f"{F32_MIN}",
        ),
        (
            ["--train_state", "1", "--lr_init", "1e37", "--lr_final", "1e37", "--state_lr_scale", "1000"],
            "--lr_init 1e+37 x --state_lr_scale 1000 (the initial states' learning rate) does not fit "
            "float32, which torch computes it in: lower --state_lr_scale",
        ),
    ],
)
def test_float_options_that_do_not_fit_float32_are_refused(
    tmp_path, base_path, count_data, train_args, capsys, flags, message
):
    """Before: torch's "value cannot be converted to type float without overflow" traceback (even in a
    dry run), or a run that ends as "diverged"."""
    argv = train_args(base_path, count_data, tmp_path / "run", "--dry_run", "1", *flags)
    assert one_error_line(capsys, main(argv)) == message
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, base_path, count_data, train_args):
    """A run that finished its 2 epochs (rwkv-0, rwkv-1, resume.ckpt, train_config.json)."""
    proj = tmp_path_factory.mktemp("sweep3") / "run"
    assert main(train_args(base_path, count_data, proj, epochs=2, steps=2)) == 0
    assert (proj / "rwkv-1.pth").is_file()
    return proj


def _copy(run, dst):
    shutil.copytree(run, dst)
    return dst


def _snapshot(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


@pytest.mark.parametrize("given", [["--epoch_count", "1"], ["--epoch_count", "2"], []])
def test_resume_with_an_epoch_count_already_reached(tmp_path, finished_run, capsys, given):
    """Before: --epoch_count 1 was Lightning's MisconfigurationException traceback; 2 (and the stored 2)
    exited 0 having trained nothing, silently."""
    run = _copy(finished_run, tmp_path / "run")
    before = _snapshot(run)
    rc = main(["train", "--resume", str(run), *given, "--progress_bar", "0"])
    n = given[1] if given else "2"
    assert one_error_line(capsys, rc) == (
        f"--resume {run}: the run has finished 2 epochs; --epoch_count {n} trains nothing more: "
        "give --epoch_count 3 or more"
    )
    assert _snapshot(run) == before


def test_resume_with_more_epochs_still_trains(tmp_path, finished_run, base_path):
    """The check refuses only what trains nothing: one more epoch runs and writes rwkv-2.pth; a copy of the
    run's base under another name is the same base."""
    run = _copy(finished_run, tmp_path / "run")
    same_base = shutil.copy(base_path, tmp_path / "copy.pth")
    argv = ["train", "--resume", str(run), "--epoch_count", "3", "--load_model", str(same_base)]
    assert main([*argv, "--progress_bar", "0"]) == 0
    assert (run / "rwkv-2.pth").is_file()


def _ckpt(processed: int, started: int) -> dict:
    progress = {"ready": started, "started": started, "processed": processed, "completed": processed}
    return {"loops": {"fit_loop": {"epoch_progress": {"current": progress}}}}


def test_a_run_stopped_mid_epoch_continues_that_epoch():
    """Stopped by a signal in its second epoch: one epoch is finished, --epoch_count 2 ends the second."""
    from rwkv_disha.train.resume import check_resume_epochs

    check_resume_epochs(_ckpt(processed=1, started=2), 2, "run")
    with pytest.raises(RWKVDishaError) as e:
        check_resume_epochs(_ckpt(processed=1, started=2), 1, "run")
    assert str(e.value) == (
        "--resume run: the run has finished 1 epoch; --epoch_count 1 trains nothing more: "
        "give --epoch_count 2 or more"
    )


def test_resume_on_a_base_of_another_width_names_the_base(tmp_path, finished_run, make_checkpoint, capsys):
    """Before: "--resume: .../resume.ckpt has blocks.0.ln0.weight of shape (64,), this run needs (128,): the
    adapter settings (r, mode, lora_r) differ ...", blaming settings the user never changed."""
    run = _copy(finished_run, tmp_path / "run")
    wide = make_checkpoint(2, 128, 256, style="pretrain", seed=3)
    before = _snapshot(run)
    rc = main(["train", "--resume", str(run), "--load_model", str(wide), "--epoch_count", "3"])
    recorded = load_saved_config(run / "train_config.json")["load_model"]
    assert one_error_line(capsys, rc) == (
        f"--load_model {wide} is a RWKV-7 L2 C128 model but {run} was trained on RWKV-7 L2 C64: resume "
        f"with the run's base (--load_model {recorded})"
    )
    assert _snapshot(run) == before


def test_without_a_sidecar_the_recorded_base_file_is_compared(
    tmp_path, finished_run, make_checkpoint, capsys
):
    """A run stopped in its first epoch has no rwkv-N.json yet: train_config.json's base tells the shape."""
    run = _copy(finished_run, tmp_path / "run")
    for side in run.glob("rwkv-*.json"):
        side.unlink()
    deep = make_checkpoint(3, 64, 256, style="pretrain", seed=3)
    rc = main(["train", "--resume", str(run), "--load_model", str(deep), "--epoch_count", "3"])
    recorded = load_saved_config(run / "train_config.json")["load_model"]
    assert one_error_line(capsys, rc) == (
        f"--load_model {deep} is a RWKV-7 L3 C64 model but {run} was trained on RWKV-7 L2 C64: resume "
        f"with the run's base (--load_model {recorded})"
    )


def test_resume_on_another_base_of_the_same_shape_is_refused(tmp_path, finished_run, make_checkpoint, capsys):
    """Same shape, other weights: the newest sidecar's base fingerprint tells them apart before any work."""
    run = _copy(finished_run, tmp_path / "run")
    other = make_checkpoint(2, 64, 256, style="random", seed=11)
    before = _snapshot(run)
    rc = main(["train", "--resume", str(run), "--load_model", str(other), "--epoch_count", "3"])
    line = one_error_line(capsys, rc)
    assert line.startswith(f"--resume {run}: the run (--load_model ")
    assert "was trained on a different base model of the same shape" in line
    assert _snapshot(run) == before
