"""rwkv-N.pth and its .json sidecar are written as one pair: a failed write never leaves a new adapter
beside an old sidecar, which merge would trust (here: another lora_alpha for tensors of the same shapes)."""

import errno
import os

import pytest
import torch

import rwkv_disha.fsio as fsio
from rwkv_disha.adapters import AdapterConfig
from rwkv_disha.adapters.adapter_file import open_adapter_file, read_sidecar, write_adapter_file
from rwkv_disha.errors import RWKVDishaError
from rwkv_disha.model.load import load_state_dict


def lora(alpha: int) -> AdapterConfig:
    return AdapterConfig.from_cli(
        "lora", "", f'{{"lora_load":"","lora_r":8,"lora_alpha":{alpha},"lora_dropout":0}}'
    )


@pytest.fixture
def pair(tmp_path, make_checkpoint, random_adapter):
    """An earlier adapter (lora_alpha 16) at out/rwkv-1.pth, and what a new run (lora_alpha 64, same
    shapes, other values) writes over it: (path, tensors, sidecar)."""
    base = make_checkpoint(2, 64, 256, seed=3)
    path = random_adapter(base, lora(16), tmp_path / "out" / "rwkv-1.pth", seed=1)
    new = random_adapter(base, lora(64), tmp_path / "new" / "rwkv-1.pth", seed=2)
    sidecar = {k: v for k, v in read_sidecar(new).items() if k not in ("format", "format_version", "tensors")}
    return path, load_state_dict(new), sidecar


def files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_sidecar_that_cannot_be_written_leaves_the_old_pair(pair, monkeypatch):
    path, tensors, sidecar = pair
    before = files(path.parent)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)  # the sidecar's write syncs; torch.save does not
    with pytest.raises(RWKVDishaError) as e:
        write_adapter_file(path, tensors, sidecar)
    assert str(e.value) == (
        f"cannot write adapter sidecar {path.with_suffix('.json')}: no space left on the device"
    )
    assert files(path.parent) == before  # no new adapter beside the old sidecar, no temporary file
    assert open_adapter_file(path).cfg.lora_alpha == 16


def test_a_sidecar_that_cannot_be_moved_into_place_leaves_no_old_sidecar(pair, monkeypatch):
    path, tensors, sidecar = pair
    replace = os.replace

    def fail_on_sidecar(src, dst):
        if str(dst).endswith(".json"):
            raise OSError(errno.EIO, "Input/output error")
        return replace(src, dst)

    monkeypatch.setattr(fsio.os, "replace", fail_on_sidecar)
    with pytest.raises(
        RWKVDishaError, match=r"cannot write adapter sidecar .*rwkv-1\.json: input/output error"
    ):
        write_adapter_file(path, tensors, sidecar)
    monkeypatch.undo()
    # the new adapter stands alone: its settings come from its tensors (and the lora_alpha given), never
    # from the earlier run's sidecar
    assert sorted(p.name for p in path.parent.iterdir()) == ["rwkv-1.pth"]
    assert read_sidecar(path) is None
    opened = open_adapter_file(path, lora_alpha=64)
    assert opened.cfg.lora_alpha == 64
    for k, v in tensors.items():
        torch.testing.assert_close(opened.tensors[k], v, atol=0, rtol=0)


def test_a_good_write_replaces_both(pair):
    path, tensors, sidecar = pair
    write_adapter_file(path, tensors, sidecar)
    assert sorted(p.name for p in path.parent.iterdir()) == ["rwkv-1.json", "rwkv-1.pth"]
    assert open_adapter_file(path).cfg.lora_alpha == 64
