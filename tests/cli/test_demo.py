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


def test_demo_runs_again_into_its_own_folder(tmp_path, capsys):
    """The demo owns --out: a second run replaces its files (init / prepare / train / merge are told
    --overwrite 1) instead of stopping at the first step that refuses to replace an output."""
    argv = ["demo", "--out", str(tmp_path / "demo"), "--n_embd", "64", "--epochs", "1", "--epoch_steps", "1"]
    assert main(argv) == 0
    first = (tmp_path / "demo" / "merged.pth").stat().st_mtime_ns
    assert main(argv) == 0, capsys.readouterr().err[-2000:]
    assert "rwkv-disha demo finished" in capsys.readouterr().out
    assert (tmp_path / "demo" / "merged.pth").stat().st_mtime_ns > first


def one_error_line(capsys, rc: int) -> str:
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_an_empty_out_is_refused_and_nothing_is_written(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["demo", "--out", "", "--epochs", "1", "--epoch_steps", "1", "--n_embd", "64"]
    assert "--out is required" in one_error_line(capsys, main(argv))
    assert list(tmp_path.iterdir()) == []


def test_an_absurd_shape_is_refused_before_the_corpus_is_written(tmp_path, capsys):
    argv = ["demo", "--out", str(tmp_path / "dm2"), "--n_layer", "100000000"]
    assert "choose a smaller --n_layer" in one_error_line(capsys, main(argv))
    assert list(tmp_path.iterdir()) == []
