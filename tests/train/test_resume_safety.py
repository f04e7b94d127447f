"""--resume continues in its own folder from any working directory, refuses a damaged resume.ckpt or
train_config.json before any work, and a bad "load" adapter leaves no proj_dir behind."""

import json
import math
import shutil

import pytest
import torch
from run_helpers import copy_run, one_error_line, snapshot

import rwkv_disha.model.load as load_mod
from rwkv_disha.adapters import AdapterConfig, inject_adapters, save_adapter_file
from rwkv_disha.cli import main
from rwkv_disha.model.load import load_state_dict


# ---- defect 1: the folder a resumed run writes into ---------------------------------------------------
def test_resumed_copy_writes_into_itself_not_the_original(tmp_path, done, monkeypatch):
    original = copy_run(done, tmp_path / "a" / "run")
    shutil.copytree(original, tmp_path / "b" / "run_copy")
    before = snapshot(original)
    monkeypatch.chdir(tmp_path / "b")
    assert main(["train", "--resume", "run_copy", "--epoch_count", "2", "--progress_bar", "0"]) == 0
    assert (tmp_path / "b" / "run_copy" / "rwkv-1.pth").is_file()
    assert snapshot(original) == before  # the run it was copied from is untouched
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["run_copy"]
    saved = json.loads((tmp_path / "b" / "run_copy" / "train_config.json").read_text())
    assert saved["proj_dir"] == str(tmp_path / "b" / "run_copy")


def test_proj_dir_other_than_the_resumed_folder_is_refused(tmp_path, done, no_model_load, capsys):
    run = copy_run(done, tmp_path / "run")
    other = copy_run(done, tmp_path / "lorarun")
    before = snapshot(tmp_path)
    argv = ["train", "--resume", str(run), "--proj_dir", str(other), "--epoch_count", "2"]
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert f"--proj_dir {other} is not the folder being resumed ({run})" in line
    assert snapshot(tmp_path) == before
    # the same folder, spelled another way, is fine up to the next check
    assert main(["train", "--resume", str(run), "--proj_dir", f"{run}/", "--lr_init", "nan"]) == 2
    assert "--lr_init must be a finite number" in one_error_line(capsys)


def test_new_runs_store_absolute_paths_and_resume_from_anywhere(
    tmp_path, base_path, count_data, train_args, done, monkeypatch
):
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(base_path, work / "base7.pth")
    for ext in (".bin", ".idx"):
        shutil.copy(count_data + ext, work / ("data" + ext))
    for ext in (".pth", ".json"):  # an adapter to start from, named relative too
        shutil.copy(done / ("rwkv-0" + ext), work / ("start" + ext))
    monkeypatch.chdir(work)
    argv = train_args("base7.pth", "data", "runs/bone", epochs=1, steps=2, ctx=16)
    argv += ["--disha_config", '{"mode":"bone","load":"start.pth","r":16}']
    assert main(argv) == 0
    saved = json.loads((work / "runs/bone/train_config.json").read_text())
    assert saved["load_model"] == str(work / "base7.pth")
    assert saved["data"]["data_file"] == str(work / "data")
    assert saved["proj_dir"] == str(work / "runs/bone")
    assert json.loads(saved["adapter"]["disha_config"])["load"] == str(work / "start.pth")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    resume = ["train", "--resume", "../work/runs/bone", "--epoch_count", "2", "--progress_bar", "0"]
    assert main(resume) == 0
    assert (work / "runs/bone/rwkv-1.pth").is_file() and not list(elsewhere.iterdir())


@pytest.mark.parametrize("flag,key", [("load_model", ("load_model",)), ("data_file", ("data", "data_file"))])
def test_old_relative_path_not_found_names_the_flag(
    tmp_path, done, monkeypatch, no_model_load, capsys, flag, key
):
    run = copy_run(done, tmp_path / "run")
    saved = json.loads((run / "train_config.json").read_text())
    *groups, last = key
    target = saved
    for g in groups:
        target = target[g]
    target[last] = "relative/nowhere"  # how older versions stored what was typed
    (run / "train_config.json").write_text(json.dumps(saved))
    before = snapshot(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--resume", "run", "--progress_bar", "0"]) == 2
    line = one_error_line(capsys)
    assert f"run/train_config.json stores {flag} relative/nowhere" in line
    assert f"pass --{flag}" in line
    assert snapshot(tmp_path) == before


# ---- defect 4: train_config.json missing or empty -----------------------------------------------------
@pytest.mark.parametrize(
    "content,message", [(None, "no train_config.json there"), ("{}", "does not describe")]
)
def test_missing_or_empty_train_config(tmp_path, done, no_model_load, capsys, content, message):
    run = copy_run(done, tmp_path / "run")
    if content is None:
        (run / "train_config.json").unlink()
    else:
        (run / "train_config.json").write_text(content)
    before = snapshot(tmp_path)
    assert main(["train", "--resume", str(run)]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"--resume {run}: ") and message in line
    assert snapshot(tmp_path) == before


# ---- defects 2 and 3: a damaged resume.ckpt -----------------------------------------------------------
def _opt(c):
    return c["optimizer_states"][0]


def _first_state(c):
    state = _opt(c)["state"]
    return state[next(iter(state))]


def _set(path, value):
    def damage(c):
        target = c
        for k in path[:-1]:
            target = target[k]
        target[path[-1]] = value

    return damage


def _wrong_moments(c):
    _first_state(c)["exp_avg"] = torch.zeros(3, 3)
    _first_state(c)["exp_avg_sq"] = torch.zeros(3, 3)


def _nan_moment(c):
    _first_state(c)["exp_avg"][0] = float("nan")


DAMAGE = [
    ("moments-shape", _wrong_moments, "optimizer state of blocks."),
    ("moments-nan", _nan_moment, "non-finite"),
    ("moments-dtype", lambda c: _first_state(c).update(exp_avg_sq=_first_state(c)["exp_avg_sq"].double()),
     "optimizer state of blocks."),
    ("moments-missing", lambda c: _first_state(c).pop("exp_avg"), "optimizer state of blocks."),
    ("lr-nan", lambda c: _opt(c)["param_groups"][0].update(lr=math.nan), "param_groups"),
    ("betas-bad", lambda c: _opt(c)["param_groups"][0].update(betas=(0.9, "x")), "param_groups"),
    ("params-0", lambda c: _opt(c)["param_groups"][0].update(params=[0]), "param_groups"),
    ("state-empty", lambda c: _opt(c).update(state={}), "no optimizer moments"),
    ("optimizer-empty", _set(["optimizer_states"], []), "optimizer_states"),
    ("optimizer-str", _set(["optimizer_states"], "x"), "optimizer_states"),
    ("loops-empty", _set(["loops"], {}), "loops"),
    ("loops-str", _set(["loops"], "nope"), "loops"),
    ("loops-negative", _set(["loops", "fit_loop", "epoch_progress", "total", "ready"], -1), "loops"),
    ("sched-empty", _set(["lr_schedulers"], [{}]), "lr_schedulers"),
    ("sched-str", _set(["lr_schedulers"], "x"), "lr_schedulers"),
    ("sched-nan", lambda c: c["lr_schedulers"][0].update(base_lrs=[math.nan]), "lr_schedulers"),
    ("callbacks-str", _set(["callbacks"], "x"), "callbacks"),
    ("version", _set(["pytorch-lightning_version"], "banana"), "pytorch-lightning_version"),
    ("progress", _set(["rwkv_disha"], {"tokens_seen": -1}), "bad progress record"),
]  # fmt: skip


@pytest.mark.parametrize("name,damage,message", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_damaged_resume_ckpt_is_one_line_before_any_work(
    tmp_path, done, no_model_load, capsys, name, damage, message
):
    run = copy_run(done, tmp_path / "run")
    ckpt = torch.load(run / "resume.ckpt", weights_only=True)
    damage(ckpt)
    torch.save(ckpt, run / "resume.ckpt")
    before = snapshot(tmp_path)
    assert main(["train", "--resume", str(run), "--epoch_count", "2", "--progress_bar", "0"]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"--resume: {run / 'resume.ckpt'} ") and message in line
    assert snapshot(tmp_path) == before


def test_undamaged_resume_ckpt_passes_the_checks(tmp_path, done):
    run = copy_run(done, tmp_path / "run")
    assert main(["train", "--resume", str(run), "--epoch_count", "2", "--progress_bar", "0"]) == 0
    assert (run / "rwkv-1.pth").is_file()


# ---- defect 5: a "load" adapter that does not fit is refused before proj_dir exists ------------------
@pytest.fixture(scope="module")
def adapters(tmp_path_factory, base_path, make_checkpoint, done):
    """Adapter files of other kinds / bases than a Bone r=16 run on ``base_path``."""
    out = tmp_path_factory.mktemp("adapters")

    def save(base, cfg, name):
        model = load_mod.load_model(base)
        inject_adapters(model, cfg)
        return str(save_adapter_file(model, cfg, out / name))

    lora = AdapterConfig.from_cli("lora", "", '{"lora_load":"","lora_r":16,"lora_alpha":32,"lora_dropout":0}')
    bone = AdapterConfig.from_cli("disha", '{"mode":"bone","load":"","r":16}')
    x060 = make_checkpoint(2, 64, 256, version="x060", head_size=32, seed=5)
    extra = load_state_dict(done / "rwkv-0.pth")
    extra["blocks.0.att.gate.disha"] = torch.zeros(16, 64)
    torch.save(extra, out / "extra.pth")
    return {
        "bone": str(done / "rwkv-0.pth"),
        "lora": save(base_path, lora, "lora.pth"),
        "state": save(base_path, AdapterConfig(peft="state"), "state.pth"),
        "x060": save(x060, bone, "x060.pth"),
        "extra": str(out / "extra.pth"),
    }


LOADS = [
    ("bone-r8", "bone", "disha", '{{"mode":"bone","load":"{}","r":8}}', "but the config asks for"),
    ("lora-into-bone", "lora", "disha", '{{"mode":"bone","load":"{}","r":16}}', "but the config asks for"),
    ("bone-into-bat", "bone", "disha", '{{"mode":"bat","load":"{}","r":16}}', "but the config asks for"),
    ("bone-into-lora", "bone", "lora", '{{"lora_load":"{}","lora_r":16,"lora_alpha":32}}', "asks for"),
    ("state-into-bone", "state", "disha", '{{"mode":"bone","load":"{}","r":16}}', "but the config asks for"),
    ("x060-onto-x070", "x060", "disha", '{{"mode":"bone","load":"{}","r":16}}', "was trained on"),
    ("extra-targets", "extra", "disha", '{{"mode":"bone","load":"{}","r":16}}', "unexpected tensors"),
]  # fmt: skip


@pytest.mark.parametrize("name,file,peft,config,message", LOADS, ids=[c[0] for c in LOADS])
def test_load_that_does_not_fit_leaves_no_proj_dir(
    tmp_path,
    base_path,
    count_data,
    train_args,
    adapters,
    no_model_load,
    capsys,
    name,
    file,
    peft,
    config,
    message,
):
    proj = tmp_path / "P"
    argv = train_args(base_path, count_data, proj, epochs=1, steps=2, ctx=16)
    flag = "--disha_config" if peft == "disha" else "--lora_config"
    argv += ["--peft", peft, flag, config.format(adapters[file])]
    assert main(argv) == 2
    assert message in one_error_line(capsys)
    assert not proj.exists()


def test_resume_with_two_optimizer_groups(tmp_path, base_path, count_data, train_args):
    """--train_state next to an adapter: the states are a second param group, checked as such."""
    proj = tmp_path / "p"
    assert main(train_args(base_path, count_data, proj, "--train_state", "1", epochs=1, steps=2, ctx=16)) == 0
    assert (
        len(torch.load(proj / "resume.ckpt", weights_only=True)["optimizer_states"][0]["param_groups"]) == 2
    )
    assert main(["train", "--resume", str(proj), "--epoch_count", "2", "--progress_bar", "0"]) == 0
    assert (proj / "rwkv-1.pth").is_file()
