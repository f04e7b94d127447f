"""`import` / `export`: a damaged or lying input, or an output that would replace a file the user keeps,
is one `error:` line (exit 2) and nothing is written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from rwkv_disha import load_model
from rwkv_disha.adapters import AdapterConfig, inject_adapters, save_adapter_file
from rwkv_disha.cli import main

R_PROJ = "model.layers.0.attn.r_proj.weight"


@pytest.fixture(scope="module")
def hf(make_checkpoint, tmp_path_factory):
    """A good HF folder (2 layers, C 64, vocab 256, head size 32)."""
    base = make_checkpoint(2, 64, 256, head_size=32)
    out = tmp_path_factory.mktemp("hf") / "hf"
    assert main(["export", "--format", "hf", "--load_model", str(base), "--output", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def adapter(make_checkpoint, tmp_path_factory):
    model = load_model(make_checkpoint(2, 64, 256, head_size=32))
    cfg = AdapterConfig.from_cli("disha", '{"mode":"bone","r":16}', "", [])
    inject_adapters(model, cfg)
    return save_adapter_file(model, cfg, tmp_path_factory.mktemp("adapter") / "rwkv-0.pth")


def refused(capsys, args, *words):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for w in words:
        assert w in err, err
    return err


def copy_hf(hf, tmp_path, edit_tensors=None, edit_config=None):
    folder = tmp_path / "in"
    shutil.copytree(hf, folder)
    if edit_tensors:
        t = load_file(str(folder / "model.safetensors"))
        edit_tensors(t)
        save_file(t, str(folder / "model.safetensors"))
    if edit_config:
        conf = json.loads((folder / "config.json").read_text())
        edit_config(conf)
        (folder / "config.json").write_text(json.dumps(conf))
    return folder


def _set(key, value):
    def edit(d):
        d[key] = value

    return edit


def _extra(t):
    t["model.layers.5.ffn.x_k"] = t["model.layers.1.ffn.x_k"].clone()


def _nan(t):
    t[R_PROJ][0, 0] = float("nan")


BAD_TENSORS = {
    "no-tensors": (lambda t: t.clear(), "not an RWKV checkpoint"),
    "missing": (lambda t: t.pop(R_PROJ), "missing"),
    "misshaped": (lambda t: t.update({R_PROJ: t[R_PROJ][:32].contiguous()}), "blocks.0.att.receptance"),
    "int32": (lambda t: t.update({R_PROJ: t[R_PROJ].to(torch.int32)}), "non-floating"),
    "int8": (lambda t: t.update({R_PROJ: t[R_PROJ].to(torch.int8)}), "non-floating"),
    "nan": (_nan, "NaN"),
    "extra-layer": (_extra, "missing"),
}


@pytest.mark.parametrize("case", BAD_TENSORS)
def test_import_refuses_a_model_that_is_not_official(hf, tmp_path, capsys, case):
    edit, word = BAD_TENSORS[case]
    folder = copy_hf(hf, tmp_path, edit_tensors=edit)
    refused(capsys, ["import", "--hf_model", str(folder), "--output", str(tmp_path / "o.pth")], word)
    assert not (tmp_path / "o.pth").exists()


BAD_CONFIG = {
    "hidden_size": 128,
    "num_hidden_layers": 3,
    "vocab_size": 300,
    "num_heads": 4,
    "head_dim": 64,
}


@pytest.mark.parametrize(
    "field,value",
    [
        *BAD_CONFIG.items(),
        ("num_hidden_layers", 1),
        ("num_hidden_layers", -1),
        ("num_hidden_layers", 1e12),
        ("hidden_size", "64"),
        ("hidden_size", 64.0),
        ("num_hidden_layers", True),
    ],
)
def test_import_refuses_a_config_that_disagrees_with_the_tensors(hf, tmp_path, capsys, field, value):
    folder = copy_hf(hf, tmp_path, edit_config=_set(field, value))
    refused(capsys, ["import", "--hf_model", str(folder), "--output", str(tmp_path / "o.pth")], field)
    assert not (tmp_path / "o.pth").exists()


def _shard(folder, weight_map):
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_import_refuses_both_a_model_and_an_index(hf, tmp_path, capsys):
    folder = copy_hf(hf, tmp_path)
    shutil.copy(folder / "model.safetensors", folder / "model-00001-of-00001.safetensors")
    _shard(folder, {R_PROJ: "model-00001-of-00001.safetensors"})
    refused(capsys, ["import", "--hf_model", str(folder), "--output", str(tmp_path / "o.pth")], "stale")
    assert not (tmp_path / "o.pth").exists()


@pytest.mark.parametrize("name", ["/etc/x.safetensors", "../ok/model.safetensors", "sub/m.safetensors", 5])
def test_import_refuses_a_shard_outside_the_folder(hf, tmp_path, capsys, name):
    folder = copy_hf(hf, tmp_path)
    for where in (tmp_path / "ok" / "model.safetensors", folder / "sub" / "m.safetensors"):
        where.parent.mkdir()  # a good model there: only its path is wrong
        shutil.copy(folder / "model.safetensors", where)
    (folder / "model.safetensors").unlink()
    _shard(folder, {"model.embeddings.weight": name})
    refused(capsys, ["import", "--hf_model", str(folder), "--output", str(tmp_path / "o.pth")], "shard")
    assert not (tmp_path / "o.pth").exists()


def test_import_refuses_to_overwrite_its_input(hf, tmp_path, capsys):
    folder = copy_hf(hf, tmp_path)
    before = (folder / "model.safetensors").read_bytes()
    args = ["import", "--hf_model", str(folder), "--output", str(folder / "model.safetensors")]
    refused(capsys, [*args, "--overwrite", "1"], "input")
    assert (folder / "model.safetensors").read_bytes() == before


def test_export_hf_overwrite_removes_a_stale_sharded_model(make_checkpoint, hf, tmp_path, capsys):
    folder = copy_hf(hf, tmp_path)
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    _shard(folder, {R_PROJ: "model-00001-of-00001.safetensors"})
    (folder / "README.md").write_text("mine")
    base = make_checkpoint(2, 64, 256, head_size=32)
    args = [
        "export",
        "--format",
        "hf",
        "--load_model",
        str(base),
        "--output",
        str(folder),
        "--overwrite",
        "1",
    ]
    assert main(args) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert main(["import", "--hf_model", str(folder), "--output", str(tmp_path / "o.pth")]) == 0


def test_export_hf_refuses_to_overwrite_its_input(hf, tmp_path, capsys):
    folder = copy_hf(hf, tmp_path)
    args = ["export", "--format", "hf", "--load_model", str(folder / "model.safetensors")]
    refused(capsys, [*args, "--output", str(folder), "--overwrite", "1"], "input")


def test_export_pth_keeps_an_existing_sidecar(adapter, tmp_path, capsys):
    (tmp_path / "victim.json").write_text('{"mine":1}')
    args = ["export", "--peft_checkpoint", str(adapter), "--format", "pth"]
    refused(capsys, [*args, "--output", str(tmp_path / "victim.pth")], "victim.json", "--overwrite 1")
    assert (tmp_path / "victim.json").read_text() == '{"mine":1}'
    assert not (tmp_path / "victim.pth").exists()
    assert main([*args, "--output", str(tmp_path / "victim.pth"), "--overwrite", "1"]) == 0


def test_export_pth_refuses_an_output_that_its_sidecar_would_replace(adapter, tmp_path, capsys):
    args = ["export", "--peft_checkpoint", str(adapter), "--format", "pth"]
    refused(capsys, [*args, "--output", str(tmp_path / "same.json")], "sidecar")
    assert not (tmp_path / "same.json").exists()


def test_export_pth_refuses_a_trailing_slash(adapter, tmp_path, capsys):
    args = ["export", "--peft_checkpoint", str(adapter), "--format", "pth"]
    refused(capsys, [*args, "--output", str(tmp_path / "newpth") + "/"], "slash")
    assert not (tmp_path / "newpth").exists()


def test_a_peft_folders_weights_file_is_read_with_its_config(adapter, tmp_path, capsys):
    """Given as a file, peft's adapter_model.safetensors is read as its folder: the kind comes from
    adapter_config.json, not guessed from shapes (a Bone r16 guessed from shapes reads as MiSS mini)."""
    folder = tmp_path / "peft"
    assert main(["export", "--peft_checkpoint", str(adapter), "--output", str(folder)]) == 0
    back = tmp_path / "back.pth"
    args = ["export", "--peft_checkpoint", str(folder / "adapter_model.safetensors"), "--format", "pth"]
    capsys.readouterr()
    assert main([*args, "--output", str(back)]) == 0
    assert "exported Bone r=16 -> Bone r=16" in capsys.readouterr().out
    assert json.loads(back.with_suffix(".json").read_text())["adapter"]["mode"] == "bone"


def test_export_peft_refuses_to_overwrite_its_input(adapter, tmp_path, capsys):
    folder = tmp_path / "peft"
    assert main(["export", "--peft_checkpoint", str(adapter), "--output", str(folder)]) == 0
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    src = folder / "adapter_model.safetensors"
    refused(
        capsys,
        ["export", "--peft_checkpoint", str(src), "--output", str(folder), "--overwrite", "1"],
        "input",
    )
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


DEEP = "[" * 100_000 + "]" * 100_000
HUGE_INT = "7" * 5000  # Python refuses to read an integer of more than 4300 digits


BAD_CONFIG = '{"model_type": "rwkv7", "n": ' + HUGE_INT + "}"


@pytest.mark.parametrize("text", [DEEP, BAD_CONFIG], ids=["deep", "int"])
def test_import_refuses_a_config_json_python_cannot_read(hf, tmp_path, capsys, text):
    """Used to be a RecursionError / ValueError traceback (exit 1)."""
    folder = copy_hf(hf, tmp_path)
    (folder / "config.json").write_text(text)
    argv = ["import", "--hf_model", str(folder), "--output", str(tmp_path / "o.pth")]
    refused(capsys, argv, "not valid JSON")
    assert not (tmp_path / "o.pth").exists()


@pytest.mark.parametrize("text", [DEEP, '{"weight_map": {}, "n": ' + HUGE_INT + "}"], ids=["deep", "int"])
def test_import_refuses_an_index_python_cannot_read(hf, tmp_path, capsys, text):
    folder = copy_hf(hf, tmp_path)
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(text)
    refused(capsys, ["import", "--hf_model", str(folder), "--output", str(tmp_path / "o.pth")], "index")
    assert not (tmp_path / "o.pth").exists()


@pytest.mark.parametrize("which", ["config.json", "shard"])
def test_import_refuses_a_fifo_instead_of_waiting_on_it(hf, tmp_path, capsys, which, main_beside_fifo):
    """Reading a FIFO blocks until something writes to it: import used to wait forever."""
    import os

    folder = copy_hf(hf, tmp_path)
    if which == "shard":
        (folder / "model.safetensors").unlink()
        _shard(folder, {R_PROJ: "s.safetensors"})
        fifo = folder / "s.safetensors"
    else:
        fifo = folder / "config.json"
        fifo.unlink()
    os.mkfifo(fifo)
    argv = ["import", "--hf_model", str(folder), "--output", str(tmp_path / "o.pth")]
    out = [main_beside_fifo(argv, fifo)]
    err = capsys.readouterr().err
    assert out == [2] and err.startswith("error: ") and err.count("\n") == 1, err
    assert "not a regular file (a FIFO" in err
    assert not (tmp_path / "o.pth").exists()
