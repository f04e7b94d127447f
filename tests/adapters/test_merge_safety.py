"""`merge` and adapter files against bad inputs and failing disks: one `error:` line, exit 2, nothing written.

Each case runs the real command (`rwkv_disha.cli.main`) and compares the folder before and after.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from adapter_helpers import adapted, config, logits, rel_err, tokens

from rwkv_disha import load_model
from rwkv_disha.adapters import inject_adapters, load_adapter_file, open_adapter_file, save_adapter_file
from rwkv_disha.adapters.adapter_file import sidecar_path
from rwkv_disha.cli import main
from rwkv_disha.errors import RWKVDishaError


@pytest.fixture(scope="module")
def base(make_checkpoint):
    return make_checkpoint(2, 128, 300)


@pytest.fixture
def work(base, tmp_path):
    """tmp_path holding a Bone adapter file (rwkv-0.pth + rwkv-0.json); returns (folder, adapter, model)."""
    cfg = config("bone", 64)
    model = adapted(base, cfg, seed=21)
    adapter = save_adapter_file(model, cfg, tmp_path / "rwkv-0.pth")
    return tmp_path, adapter, model


def snapshot(root: Path) -> dict[str, tuple]:
    """path -> ('dir',) or (size, mtime_ns, sha256) for everything under ``root``, hidden files too."""
    state: dict[str, tuple] = {}
    for p in sorted(root.rglob("*")):
        if p.is_dir():
            state[str(p)] = ("dir",)
        else:
            st = p.stat()
            state[str(p)] = (st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return state


def merge_refused(argv: list[str], capsys, root: Path, *messages: str) -> str:
    """Run `merge argv`: exit 2, one `error:` line holding every message, no traceback, ``root`` unchanged."""
    before = snapshot(root)
    assert main(["merge", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for m in messages:
        assert m in err, err
    assert snapshot(root) == before
    return err


def argv_for(base, adapter, output) -> list[str]:
    return ["--base_model", str(base), "--peft_checkpoint", str(adapter), "--output", str(output)]


# -- non-finite values ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_merge_refuses_a_non_finite_adapter_file(base, work, capsys, bad):
    root, adapter, _ = work
    tensors = torch.load(adapter, weights_only=True)
    tensors["blocks.1.att.value.disha"][3, 5] = bad  # one value of a diverged run is enough
    torch.save(tensors, adapter)
    merge_refused(
        argv_for(base, adapter, root / "merged.pth"),
        capsys,
        root,
        f"adapter file {adapter} holds non-finite weights (NaN/inf) in blocks.1.att.value.disha",
        "diverged run",
        "use an earlier rwkv-N.pth",
    )


def test_merge_refuses_an_adapter_with_integer_tensors(base, work, capsys):
    """Integer tensors are no trained weights (a damaged or foreign file): merge would have added them."""
    root, adapter, _ = work
    tensors = torch.load(adapter, weights_only=True)
    tensors["blocks.1.att.value.disha"] = tensors["blocks.1.att.value.disha"].to(torch.int32)
    torch.save(tensors, adapter)
    merge_refused(
        argv_for(base, adapter, root / "merged.pth"),
        capsys,
        root,
        f"adapter file {adapter} holds non-float tensors (blocks.1.att.value.disha (torch.int32))",
    )


def test_every_reader_refuses_a_non_finite_adapter(base, work):
    """generate, eval and train --load read through the same module, so they refuse the same file."""
    _, adapter, _ = work
    tensors = torch.load(adapter, weights_only=True)
    tensors["blocks.0.ln1.weight"][0] = float("nan")  # a --train_parts tensor counts too
    torch.save(tensors, adapter)
    with pytest.raises(RWKVDishaError, match=r"holds non-finite weights \(NaN/inf\) in blocks.0.ln1.weight"):
        open_adapter_file(adapter)
    model = load_model(base, op="torch")
    inject_adapters(model, config("bone", 64))
    with pytest.raises(RWKVDishaError, match="non-finite"):
        load_adapter_file(model, adapter, config("bone", 64))


def test_a_non_finite_adapter_is_never_saved(base, tmp_path):
    cfg = config("bat", 32)
    model = adapted(base, cfg, seed=23)
    with torch.no_grad():
        model.blocks[0].att.output.disha[1, 2, 3] = float("nan")
    with pytest.raises(
        RWKVDishaError, match=r"rwkv-2.pth holds non-finite weights \(NaN/inf\) in blocks.0.att"
    ):
        save_adapter_file(model, cfg, tmp_path / "rwkv-2.pth")
    assert list(tmp_path.iterdir()) == []


def test_merge_refuses_a_non_finite_result(make_checkpoint, tmp_path, capsys):
    """A finite adapter whose merged weights overflow the base's dtype (fp16: |w| > 65504) is not written."""
    base16 = make_checkpoint(2, 128, 300, dtype=torch.float16)
    cfg = config("bone", 64)
    model = adapted(base16, cfg, seed=22)
    with torch.no_grad():
        model.blocks[1].ffn.key.disha[0, 0] = 1e6  # finite in the fp32 adapter file
    adapter = save_adapter_file(model, cfg, tmp_path / "rwkv-0.pth")
    merge_refused(
        argv_for(base16, adapter, tmp_path / "m.pth"),
        capsys,
        tmp_path,
        "the merged model would hold NaN/inf values (blocks.1.ffn.key.weight)",
        f"so {tmp_path / 'm.pth'} was not written",
    )


# -- the output path ----------------------------------------------------------------------------------------
def test_output_that_is_a_directory_is_refused_before_loading(base, work, capsys, monkeypatch):
    root, adapter, _ = work
    (root / "out").mkdir()

    def never(*args, **kwargs):
        raise AssertionError("merge loaded a file before checking --output")

    monkeypatch.setattr("rwkv_disha.model.load.load_state_dict", never)
    merge_refused(
        argv_for(base, adapter, root / "out"), capsys, root, f"--output {root / 'out'} is a directory"
    )


def test_existing_output_needs_overwrite(base, work, capsys):
    root, adapter, model = work
    out = root / "merged.pth"
    out.write_bytes(b"an earlier merge")
    merge_refused(
        argv_for(base, adapter, out), capsys, root, f"--output {out} already exists", "--overwrite 1"
    )
    assert out.read_bytes() == b"an earlier merge"
    assert main(["merge", *argv_for(base, adapter, out), "--overwrite", "1"]) == 0
    idx = tokens(300)
    assert rel_err(logits(load_model(out, op="torch"), idx), logits(model, idx)) <= 1e-5


@pytest.mark.parametrize("alpha", ["-2", "nan", "inf"])
def test_bad_lora_alpha(base, work, capsys, alpha):
    root, adapter, _ = work
    merge_refused(
        [*argv_for(base, adapter, root / "m.pth"), "--lora_alpha", alpha], capsys, root, "lora_alpha"
    )


def test_output_onto_the_sidecar_is_refused(base, work, capsys):
    root, adapter, _ = work
    merge_refused(
        argv_for(base, adapter, sidecar_path(adapter)), capsys, root, "would overwrite an input", "--output"
    )


def _save_failing_with(exc: BaseException):
    def save(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"half a model")  # what a full disk leaves behind
        raise exc

    return save


@pytest.mark.parametrize(
    "exc,cause",
    [
        (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"), "no space left"),
        (OSError(errno.ENOSPC, "No space left on device"), "no space left on the device"),
        (OSError(errno.EROFS, "Read-only file system"), "not writable (read-only file system)"),
        (OSError(errno.EACCES, "Permission denied"), "not writable (permission denied)"),
    ],
    ids=["torch-zip-writer", "ENOSPC", "EROFS", "EACCES"],
)
def test_write_errors_are_one_line_and_leave_no_temp_file(base, work, capsys, monkeypatch, exc, cause):
    root, adapter, _ = work
    out = root / "merged.pth"
    monkeypatch.setattr(torch, "save", _save_failing_with(exc))
    merge_refused(argv_for(base, adapter, out), capsys, root, f"cannot write merged model {out}: {cause}")


@pytest.mark.parametrize(
    "read_only,message",
    [(False, "no space left on the device"), (True, "is not writable")],
    ids=["full", "read-only"],
)
def test_small_or_read_only_disk_for_real(base, work, capsys, small_fs, read_only, message):
    """On a 1 MB tmpfs (where this machine lets us mount one; root is refused by a read-only mount too):
    one line, and the disk is left empty."""
    root, adapter, _ = work
    disk = small_fs("1m", read_only=read_only)
    merge_refused(argv_for(base, adapter, disk / "m.pth"), capsys, root, str(disk), message)
    assert list(disk.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder(base, work, capsys):
    root, adapter, _ = work
    ro = root / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        merge_refused(argv_for(base, adapter, ro / "m.pth"), capsys, root, "not writable")
    finally:
        ro.chmod(0o755)


# -- the sidecar ------------------------------------------------------------------------------------------
BAD_SIDECARS = [
    ("r-not-int", lambda m: m["adapter"].update(r="abc"), "has a bad 'r' ('abc')"),
    ("r-bool", lambda m: m["adapter"].update(r=True), "has a bad 'r' (True)"),
    ("adapter-list", lambda m: m.update(adapter=[]), "has no 'adapter' settings object (got [])"),
    ("adapter-missing", lambda m: m.pop("adapter"), "has no 'adapter' settings object (got None)"),
    ("peft-number", lambda m: m["adapter"].update(peft=3), "has a bad 'peft' (3)"),
    ("targets-string", lambda m: m["adapter"].update(targets="att.key"), "has a bad 'targets' ('att.key')"),
    ("train_parts-ints", lambda m: m["adapter"].update(train_parts=[1]), "has a bad 'train_parts' ([1])"),
    ("alpha-string", lambda m: m["adapter"].update(lora_alpha="x"), "has a bad 'lora_alpha' ('x')"),
    ("quant-null", lambda m: m["adapter"].update(quant=None), "has a bad 'quant' (None)"),
    ("mode-unknown", lambda m: m["adapter"].update(mode="bott"), "holds bad settings (--disha_config mode"),
    ("r-negative", lambda m: m["adapter"].update(r=-4), "holds bad settings (--disha_config r must be a pos"),
    ("base-not-object", lambda m: m.update(base={"shape": "L2"}), "has a malformed 'base' fingerprint"),
    ("checksums-bad", lambda m: m["base"].update(checksums={"x": "y"}), "has a malformed 'base' fingerprint"),
    ("weight_dtype-number", lambda m: m.update(weight_dtype=16), "has a bad 'weight_dtype' (16)"),
    ("wrong-format", lambda m: m.update(format="something-else"), "is not an rwkv-disha adapter sidecar"),
    ("other-rank", lambda m: m["adapter"].update(r=32), "holds Bone r=64 tensors but its .json sidecar says"),
]


@pytest.mark.parametrize("name,damage,message", BAD_SIDECARS, ids=[c[0] for c in BAD_SIDECARS])
def test_bad_sidecar_is_one_line(base, work, capsys, name, damage, message):
    root, adapter, _ = work
    side = sidecar_path(adapter)
    meta = json.loads(side.read_text())
    damage(meta)
    side.write_text(json.dumps(meta))
    err = merge_refused(argv_for(base, adapter, root / "m.pth"), capsys, root, message)
    assert str(side) in err or str(adapter) in err


@pytest.mark.parametrize(
    "text", ["{oops", "[1, 2]", '"a string"', "\udcff".encode("utf-8", "surrogateescape")]
)
def test_unreadable_sidecar_is_one_line(base, work, capsys, text):
    root, adapter, _ = work
    side = sidecar_path(adapter)
    side.write_bytes(text if isinstance(text, bytes) else text.encode())
    merge_refused(argv_for(base, adapter, root / "m.pth"), capsys, root, str(side))


def test_sidecar_has_the_same_mode_as_the_tensors(base, tmp_path):
    cfg = config("lora", 8)
    path = save_adapter_file(adapted(base, cfg), cfg, tmp_path / "rwkv-4.pth")
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"rwkv-4.pth": 0o666 & ~umask, "rwkv-4.json": 0o666 & ~umask}
    assert sorted(os.listdir(tmp_path)) == ["rwkv-4.json", path.name]  # no temp files left
