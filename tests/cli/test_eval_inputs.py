"""`rwkv-disha eval`'s inputs: a --json that cannot be written is refused before the first model loads
(an existing file kept unless --overwrite 1), and a --ctx_len far beyond the documents costs nothing:
a batch is padded to its longest sample, with the loss and accuracy unchanged."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import rwkv_disha.generate as generate
from rwkv_disha.cli import main
from rwkv_disha.data.binidx import write_binidx
from rwkv_disha.data.dataset import collate, make_dataset
from rwkv_disha.evaluate import evaluate_loss
from rwkv_disha.model.load import load_model


@pytest.fixture(scope="module")
def setup(make_checkpoint, tmp_path_factory):
    """A tiny pretrained-style base and binidx data of short documents (21 .. 50 tokens)."""
    d = tmp_path_factory.mktemp("evalin")
    rng = np.random.default_rng(0)
    docs = [np.append(rng.integers(1, 255, int(rng.integers(20, 50))), 0).astype(np.int32) for _ in range(9)]
    write_binidx(d / "data", docs)
    return make_checkpoint(2, 64, 256, style="pretrain", seed=3), d / "data"


def _eval(setup, *extra) -> list[str]:
    base, data = setup
    return ["eval", "--load_model", str(base), "--data_file", str(data), "--max_samples", "0", *extra]


def refused(capsys, tmp_path: Path, argv: list[str], monkeypatch) -> str:
    """Exit 2, one error line (returned), nothing under tmp_path created or changed, no model loaded."""

    def loaded(*args, **kw):
        raise AssertionError("a model loaded before the options were checked")

    monkeypatch.setattr(generate, "load_for_inference", loaded)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    return lines[0]


def test_json_in_proc_is_refused_before_any_model_loads(setup, capsys, tmp_path, monkeypatch):
    line = refused(capsys, tmp_path, [*_eval(setup), "--json", "/proc/x.json"], monkeypatch)
    assert line == "error: --json /proc/x.json: no file can be created in /proc; choose another folder"


def test_json_with_a_trailing_slash_or_a_missing_folder_is_refused(setup, capsys, tmp_path, monkeypatch):
    line = refused(capsys, tmp_path, [*_eval(setup), "--json", f"{tmp_path}/newdir/"], monkeypatch)
    assert line.endswith("ends with a slash, as a folder does: give a file name")
    line = refused(capsys, tmp_path, [*_eval(setup), "--json", f"{tmp_path}/no/x.json"], monkeypatch)
    assert line.endswith(f"the folder {tmp_path}/no does not exist; create it or choose another")
    assert os.listdir(tmp_path) == []


def test_an_existing_json_is_kept_unless_overwrite(setup, capsys, tmp_path, monkeypatch):
    mine = tmp_path / "results.json"
    mine.write_text("my earlier results\n")
    with monkeypatch.context() as m:
        line = refused(capsys, tmp_path, [*_eval(setup), "--json", str(mine)], m)
    assert line == f"error: --json {mine} already exists: choose another name or pass --overwrite 1"
    assert main([*_eval(setup), "--json", str(mine), "--overwrite", "1"]) == 0
    assert json.loads(mine.read_text())["tokens"] > 0 and os.listdir(tmp_path) == ["results.json"]


def test_a_huge_ctx_len_on_short_documents_gives_the_same_result(setup, capsys, tmp_path):
    """Documents under 60 tokens: --ctx_len 100000000 used to pad every sample to 10^8 positions (50 GB)."""
    results = []
    for ctx in ("64", "100000000"):
        out = tmp_path / f"{ctx}.json"
        assert main([*_eval(setup), "--ctx_len", ctx, "--micro_bsz", "4", "--json", str(out)]) == 0
        results.append(json.loads(out.read_text()))
    assert results[0] == results[1] and results[0]["samples"] == 9


@pytest.mark.parametrize("loss_mask", ["pad", "none"])
def test_batches_are_padded_to_their_longest_sample_with_the_same_metrics(setup, loss_mask):
    """Against the earlier way (every sample padded to ctx_len, one forward per batch)."""
    base, data = setup
    model = load_model(base, dtype=torch.float32, op="torch").eval()
    ds = make_dataset(str(data), "binidx", "pad", 128, 4, 0, loss_mask, 0, 256, shuffle=False)
    widths = []
    forward = model.forward

    def spy(idx, *args, **kw):
        widths.append(idx.shape[1])
        return forward(idx, *args, **kw)

    model.forward = spy
    got = evaluate_loss(model, ds, 4, 0)
    assert max(widths) <= 50 and len(widths) == 3  # the longest document, not ctx_len 128
    total = correct = count = 0.0
    with torch.no_grad():
        for start in range(0, 9, 4):
            batch = collate([ds[i] for i in range(start, min(start + 4, 9))])
            logits = forward(batch["input_ids"]).float().flatten(0, 1)
            labels, mask = batch["labels"].flatten(), batch["mask"].flatten()
            total += float((torch.nn.functional.cross_entropy(logits, labels, reduction="none") * mask).sum())
            correct += float(((logits.argmax(-1) == labels).float() * mask).sum())
            count += float(mask.sum())
    assert got["tokens"] == int(count) and got["acc"] == correct / count
    assert got["loss"] == pytest.approx(total / count, rel=1e-6)
