"""What a run records when it starts (train_config.json "fingerprints": its data, its base) and what
--resume checks with it: data changed since the run started is refused; the base check reads this run's
own record, not an earlier run's sidecar left in the folder; --overwrite 1 sets the earlier run aside."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from run_helpers import one_error_line, snapshot

from rwkv_disha.adapters.fingerprint import base_fingerprint
from rwkv_disha.cli import main
from rwkv_disha.model.load import load_state_dict

FIX = "--resume continues the run's data position in the same data; restore it, or start a new run"


@pytest.fixture
def data(tmp_path, count_data) -> str:
    """A private copy of the counting corpus (tests change it)."""
    (tmp_path / "data").mkdir()
    for ext in (".bin", ".idx"):
        shutil.copy(count_data + ext, tmp_path / "data" / ("count" + ext))
    return str(tmp_path / "data" / "count")


def resume(run, *flags) -> list[str]:
    return ["train", "--resume", str(run), "--epoch_count", "2", "--progress_bar", "0", *flags]


# ---- the data ------------------------------------------------------------------------------------------
def _grow(path: Path) -> str:
    size = path.stat().st_size
    path.write_bytes(path.read_bytes() + b"\0\0\0\0")
    return f"has {size + 4:,} bytes, {size:,} when the run started"


def _edit(path: Path) -> str:
    raw = bytearray(path.read_bytes())
    raw[(len(raw) // 2) & ~3] ^= 1  # the low byte of an int32: one token id off by one, the size unchanged
    path.write_bytes(bytes(raw))
    return "has other content than when the run started"


def _remove(path: Path) -> str:
    path.unlink()
    return "is gone"


CHANGES = [(".bin", _grow), (".bin", _edit), (".idx", _edit)]


@pytest.mark.parametrize("suffix,change", CHANGES, ids=["bin-grown", "bin-edited", "idx-edited"])
def test_data_changed_since_the_run_started_is_refused(
    tmp_path, base_path, data, train_args, capsys, suffix, change
):
    run = tmp_path / "run"
    assert main(train_args(base_path, data, run, epochs=1, steps=2, ctx=16)) == 0
    record = json.loads((run / "train_config.json").read_text())["fingerprints"]
    assert sorted(record["data"]["files"]) == [".bin", ".idx"] and record["base"]["shape"]
    why = change(Path(data + suffix))
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert main(resume(run)) == 2
    line = one_error_line(capsys)
    assert line.startswith(
        f"--resume {run}: the training data changed since the run started ({data}{suffix} {why}): {FIX}"
    )
    assert snapshot(tmp_path) == before


def test_a_single_data_file_changed_is_refused(tmp_path, base_path, train_args, capsys):
    tokens = tmp_path / "tokens.u16"
    np.tile(np.array([17, 200, 3, 96, 45, 151, 230, 64, 0], np.uint16), 40).tofile(tokens)
    run = tmp_path / "run"
    argv = train_args(base_path, tokens, run, "--dataload", "get", epochs=1, steps=2, ctx=16)
    argv[argv.index("--data_type") + 1] = "uint16"
    assert main(argv) == 0
    why = _remove(tokens)
    capsys.readouterr()
    assert main(resume(run)) == 2
    assert one_error_line(capsys).startswith(
        f"--resume {run}: the training data changed since the run started ({tokens} {why}): {FIX}"
    )


def test_the_same_data_moved_resumes_and_other_data_does_not(
    tmp_path, base_path, data, unique_data, train_args, capsys
):
    run = tmp_path / "run"
    assert main(train_args(base_path, data, run, epochs=1, steps=2, ctx=16)) == 0
    moved = tmp_path / "moved"
    shutil.move(str(Path(data).parent), moved)
    assert main(resume(run, "--data_file", unique_data)) == 2
    assert "the training data changed since the run started" in one_error_line(capsys)
    assert main(resume(run, "--data_file", str(moved / "count.idx"))) == 0
    assert (run / "rwkv-1.pth").is_file()


def test_a_run_without_a_record_resumes_and_gets_one(tmp_path, base_path, data, train_args):
    """Runs of older versions recorded nothing: they resume unchecked, and are recorded from then on."""
    run = tmp_path / "run"
    assert main(train_args(base_path, data, run, epochs=1, steps=2, ctx=16)) == 0
    saved = json.loads((run / "train_config.json").read_text())
    del saved["fingerprints"]
    (run / "train_config.json").write_text(json.dumps(saved))
    _edit(Path(data + ".bin"))
    assert main(resume(run)) == 0
    record = json.loads((run / "train_config.json").read_text())["fingerprints"]
    assert sorted(record) == ["base", "data"]


# ---- the base: this run's own record, not an earlier run's sidecar -----------------------------------
@pytest.fixture
def other_base(make_checkpoint):
    """A base of the run's shape with other weights."""
    return make_checkpoint(2, 64, 256, style="random", seed=11)


def _plant_stale_sidecar(run: Path, other_base, epoch: int = 5, step: int = 100) -> None:
    """rwkv-{epoch}.pth / .json of an earlier run on ``other_base``, as an older version's --overwrite 1
    left them."""
    side = json.loads((run / "rwkv-0.json").read_text())
    side["base"] = base_fingerprint(load_state_dict(other_base))
    side["trained"] = {**side["trained"], "epoch": epoch, "global_step": step}
    (run / f"rwkv-{epoch}.json").write_text(json.dumps(side))
    shutil.copy(run / "rwkv-0.pth", run / f"rwkv-{epoch}.pth")


@pytest.mark.parametrize("recorded", [True, False], ids=["recorded", "older-run"])
def test_resume_base_check_ignores_an_earlier_runs_sidecar(
    tmp_path, base_path, other_base, data, train_args, capsys, recorded
):
    run = tmp_path / "run"
    assert main(train_args(base_path, data, run, epochs=1, steps=2, ctx=16)) == 0
    _plant_stale_sidecar(run, other_base)
    if not recorded:  # an older version's run: its own sidecar (of the epoch resume.ckpt has reached) tells
        saved = json.loads((run / "train_config.json").read_text())
        saved.pop("fingerprints", None)
        (run / "train_config.json").write_text(json.dumps(saved))
    before = snapshot(tmp_path)
    assert main(resume(run, "--load_model", str(other_base))) == 2  # the stale sidecar's base: refused
    assert one_error_line(capsys).startswith(f"--resume {run}: the run (--load_model {base_path})")
    assert snapshot(tmp_path) == before
    same = shutil.copy(base_path, tmp_path / "same.pth")
    assert main(resume(run, "--load_model", str(same))) == 0  # the run's own base: accepted
    assert (run / "rwkv-1.pth").is_file()


# ---- --overwrite 1 -------------------------------------------------------------------------------------
def test_overwrite_sets_the_earlier_run_aside(tmp_path, base_path, other_base, data, train_args, capsys):
    proj = tmp_path / "p"
    assert main(train_args(base_path, data, proj, epochs=3, steps=2, ctx=16)) == 0
    earlier = {p.name: p.read_bytes() for p in proj.iterdir() if p.is_file() and p.name != ".rwkv-disha.lock"}
    assert {"rwkv-2.pth", "rwkv-2.json", "resume.ckpt", "metrics.csv"} <= set(earlier)
    capsys.readouterr()
    argv = train_args(other_base, data, proj, "--overwrite", "1", epochs=1, steps=2, ctx=16)
    assert main(argv) == 0
    out = capsys.readouterr().out
    [aside] = [p for p in proj.iterdir() if p.is_dir()]
    assert aside.name.startswith("previous-")
    assert f"the earlier run's files in {proj} are moved to {aside}" in out
    assert {p.name: p.read_bytes() for p in aside.iterdir()} == earlier  # all of it, unchanged
    mine = sorted(p.name for p in proj.iterdir() if p.is_file() and p.name != ".rwkv-disha.lock")
    assert [n for n in mine if n.startswith("rwkv-")] == ["rwkv-0.json", "rwkv-0.pth"]
    assert f"checkpoint   {proj / 'rwkv-0.pth'}" in out
    assert len((proj / "metrics.csv").read_text().splitlines()) == 1 + 2  # this run's two micro-batches
    # the set-aside run is whole: it resumes in its new folder
    assert main(["train", "--resume", str(aside), "--epoch_count", "4", "--progress_bar", "0"]) == 0
    assert (aside / "rwkv-3.pth").is_file()
