"""A run killed while safetensors writes leaves only temporaries the next command recognises and removes.

``safetensors.torch.save_file`` writes its own ``.tmpXXXXXX`` beside its target before renaming it. The kill
is simulated deterministically: in a subprocess ``serialize_file`` writes such a file where safetensors
would, then SIGKILLs its own process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rwkv_disha import load_model
from rwkv_disha.adapters import AdapterConfig, inject_adapters, save_adapter_file
from rwkv_disha.cli import main
from rwkv_disha.fsio import atomic_write_safetensors, clean_stale_temps

DEAD = 999999999  # above any pid_max: no process has this pid
KILL_MID_WRITE = """
import os, signal, sys
import safetensors.torch

def killed(tensors, filename, metadata=None):
    # what safetensors does first: its own temporary file beside the target; then the process dies
    with open(os.path.join(os.path.dirname(filename), ".tmpabc123"), "wb") as f:
        f.write(b"half a model")
    os.kill(os.getpid(), signal.SIGKILL)

safetensors.torch.serialize_file = killed
from rwkv_disha.cli import main
main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def base(make_checkpoint):
    return make_checkpoint(2, 64, 256, head_size=32)


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory):
    model = load_model(base)
    cfg = AdapterConfig.from_cli("disha", '{"mode":"bone","r":16}', "", [])
    inject_adapters(model, cfg)
    return save_adapter_file(model, cfg, tmp_path_factory.mktemp("adapter") / "rwkv-0.pth")


def _command(kind: str, base: Path, adapter: Path, folder: Path) -> tuple[list[str], Path, set[str]]:
    """The command line, the safetensors file it writes and the names its folder holds afterwards."""
    if kind == "init":
        out = folder / "m.safetensors"
        args = ["init", "--n_layer", "1", "--n_embd", "64", "--head_size", "32", "--vocab_size", "256"]
        return [*args, "--output", str(out)], out, {"m.safetensors"}
    if kind == "hf":
        args = ["export", "--format", "hf", "--load_model", str(base), "--output", str(folder)]
        return args, folder / "model.safetensors", {"config.json", "model.safetensors"}
    args = ["export", "--format", "peft", "--peft_checkpoint", str(adapter), "--output", str(folder)]
    return args, folder / "adapter_model.safetensors", {"adapter_config.json", "adapter_model.safetensors"}


@pytest.mark.parametrize("kind", ["init", "hf", "peft"])
def test_killed_write_is_cleaned_by_next_run(kind, base, adapter, tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    args, written, names = _command(kind, base, adapter, folder)
    mine = {".tmpfoo"} if kind == "init" else set()  # an export needs an empty folder (see the last test)
    for name in mine:
        (folder / name).write_text("the user's")
    killed = subprocess.run([sys.executable, "-c", KILL_MID_WRITE, *args], capture_output=True)
    assert killed.returncode == -9, killed.stderr.decode()
    left = {p.name for p in folder.iterdir()} - mine
    assert left and not any(n.startswith(".tmp") for n in left), left  # only our own temporaries

    assert main(args) == 0  # no --overwrite: the folder holds only dead leftovers (and the user's file)
    assert {p.name for p in folder.iterdir()} == names | mine
    assert all((folder / name).read_text() == "the user's" for name in mine)
    assert load_file(str(written))  # complete and loadable


def test_dead_temp_folder_removed_user_files_kept(tmp_path):
    stale = tmp_path / f".m.safetensors.{DEAD}.abcd1234.tmp"
    stale.mkdir()
    (stale / ".tmpabc123").write_bytes(b"half a model")
    (tmp_path / f".m.safetensors.{DEAD}.efgh5678.tmp").write_bytes(b"")
    (tmp_path / ".tmpfoo").write_text("the user's")
    (tmp_path / ".tmpbar").mkdir()
    atomic_write_safetensors(tmp_path / "m.safetensors", {"w": torch.arange(6.0)}, {"format": "pt"})
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmpbar", ".tmpfoo", "m.safetensors"]
    assert torch.equal(load_file(str(tmp_path / "m.safetensors"))["w"], torch.arange(6.0))
    assert oct(os.stat(tmp_path / "m.safetensors").st_mode & 0o777) != oct(0o600)  # umask mode, not 0600


def test_folder_of_our_name_with_a_subfolder_is_kept(tmp_path):
    # our temp folders hold files only: one with a subfolder is a user's that happens to match the name
    odd = tmp_path / f".data.{DEAD}.abcd1234.tmp"
    (odd / "sub").mkdir(parents=True)
    assert clean_stale_temps(tmp_path) == []
    assert (odd / "sub").is_dir()


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def fail(tensors, filename, metadata=None):
        Path(filename).with_name(".tmpabc123").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.serialize_file", fail)
    with pytest.raises(Exception, match="no space left"):
        atomic_write_safetensors(tmp_path / "m.safetensors", {"w": torch.ones(2)}, what="model")
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_folder_with_user_tmp_file(base, tmp_path, capsys):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / ".tmpfoo").write_text("the user's")
    (folder / f".model.safetensors.{DEAD}.abcd1234.tmp").mkdir()
    assert main(["export", "--format", "hf", "--load_model", str(base), "--output", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not empty" in err and err.count("\n") == 1, err
    assert [p.name for p in folder.iterdir()] == [".tmpfoo"]
