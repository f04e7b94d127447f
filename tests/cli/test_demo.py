"""The README's first command, shrunk: every step runs and every promised file exists."""

from rwkv_disha.cli import main


def test_demo_pipeline_small(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--n_embd", "64", "--epochs", "2", "--epoch_steps", "3"]) == 0
    report = capsys.readouterr().out
    assert "rwkv-disha demo finished" in report and "answer-token loss" in report
    for rel in ("corpus.jsonl", "base.pth", "data/demo.bin", "data/demo.idx", "data/demo.mask.bin",
                "data/demo.mask.idx", "train/rwkv-0.pth", "train/rwkv-1.pth", "train/rwkv-1.json",
                "train/train_log.txt", "train/metrics.csv", "merged.pth"):  # fmt: skip
        assert (out / rel).is_file(), rel
    base = float(report.split("base ")[1].split()[0])
    tuned = float(report.split("Bone-tuned ")[1].split()[0])
    assert tuned < base  # even 6 steps move the answer-token loss down
