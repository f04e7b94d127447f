"""`rwkv-disha eval --compare`: base, base + adapter and merged model side by side on demo-style data."""

import json
import math

import pytest
import torch

from rwkv_disha.adapters import AdapterConfig
from rwkv_disha.cli import main
from rwkv_disha.data.dataset import make_dataset
from rwkv_disha.demo import make_corpus
from rwkv_disha.generate import load_for_inference


@pytest.fixture(scope="module")
def demo_setup(make_checkpoint, tmp_path_factory, random_adapter):
    """A World-vocabulary base, a Bone adapter with random weights, its merge, and demo chat data."""
    d = tmp_path_factory.mktemp("evalcmp")
    base = make_checkpoint(2, 64, 65536, seed=5)
    cfg = AdapterConfig.from_cli("disha", '{"mode":"bone","r":16}', "", ["time", "ln"])
    adapter = random_adapter(base, cfg, d / "rwkv-0.pth")  # non-zero: merged == base would be trivial
    merged = d / "merged.pth"
    assert (
        main(["merge", "--base_model", str(base), "--peft_checkpoint", str(adapter), "--output", str(merged)])
        == 0
    )
    corpus = d / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in make_corpus(8, seed=0)))
    data = d / "data"
    assert (
        main(["prepare", "--input", str(corpus), "--output", str(data), "--workers", "1", "--progress", "0"])
        == 0
    )
    return base, adapter, merged, data


def reference_loss(model_path, adapter, data, n):
    """Token-weighted CE and accuracy, one sample at a time (no batching, no padding)."""
    model = load_for_inference(str(model_path), str(adapter) if adapter else "")
    ds = make_dataset(str(data), "binidx", "pad", 64, 4, 0, "qa", 0, 65536, shuffle=False)
    total = correct = count = 0.0
    with torch.no_grad():
        for i in range(n):
            item = ds[i]
            logits = model(item["input_ids"][None])[0].float()
            ce = torch.nn.functional.cross_entropy(logits, item["labels"], reduction="none")
            total += float((ce * item["mask"]).sum())
            correct += float(((logits.argmax(-1) == item["labels"]).float() * item["mask"]).sum())
            count += float(item["mask"].sum())
    return total / count, correct / count, int(count)


def test_base_adapter_merged_side_by_side(demo_setup, tmp_path, capsys):
    base, adapter, merged, data = demo_setup
    out = tmp_path / "res.json"
    capsys.readouterr()
    argv = ["eval", "--load_model", base, "--compare", adapter, merged, "--data_file", data,
            "--ctx_len", 64, "--loss_mask", "qa", "--max_samples", 12, "--micro_bsz", 4,
            "--json", out]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    table = capsys.readouterr().out
    rows = json.loads(out.read_text())
    assert [r["kind"] for r in rows] == ["base", "adapter", "merged"]
    assert [r["model"] for r in rows] == [str(base), str(adapter), str(merged)]
    b, a, m = rows
    assert b["tokens"] == a["tokens"] == m["tokens"] > 0 and b["samples"] == 12
    assert a["loss"] == pytest.approx(m["loss"], abs=1e-4)  # on the fly == merged
    assert a["acc"] == pytest.approx(m["acc"], abs=1e-6)
    assert abs(a["loss"] - b["loss"]) > 0.05  # the adapter changes the model
    for r in rows:
        assert r["ppl"] == pytest.approx(math.exp(r["loss"]))
        assert 0 <= r["acc"] <= 1
    ref_loss, ref_acc, ref_count = reference_loss(base, None, data, 12)
    assert b["loss"] == pytest.approx(ref_loss, rel=1e-5) and b["acc"] == pytest.approx(ref_acc)
    assert b["tokens"] == ref_count
    ref_loss, ref_acc, _ = reference_loss(base, adapter, data, 12)
    assert a["loss"] == pytest.approx(ref_loss, rel=1e-5) and a["acc"] == pytest.approx(ref_acc)
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["model", "kind", "loss"] and len(lines) == 5
    assert f"{a['loss']:.4f}" in lines[3] and "adapter" in lines[3] and "merged" in lines[4]


def test_one_model_prints_one_json_line_with_accuracy(demo_setup, capsys):
    base, _, _, data = demo_setup
    capsys.readouterr()
    argv = ["eval", "--load_model", base, "--data_file", data, "--ctx_len", 64, "--max_samples", 4]
    assert main([str(a) for a in argv]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res) == {"loss", "ppl", "acc", "tokens", "samples"} and res["samples"] == 4
