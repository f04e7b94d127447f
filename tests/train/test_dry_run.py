"""`train --dry_run 1`: the report (layers, trainable params, schedule, memory) and that nothing is written;
its memory estimate against the peak RSS of a real training step on the demo model."""

import json
import os
import re
import subprocess
import sys

import pytest

from rwkv_disha.cli import main
from rwkv_disha.demo import make_corpus


def _mib(text: str, label: str) -> float:
    """A memory line's amount in MiB (the report writes GiB from 1 GiB on)."""
    value, unit = re.search(rf"^  {label}\s+([\d.]+) (MiB|GiB)", text, re.M).groups()
    return float(value) * (1024 if unit == "GiB" else 1)


def test_report_and_nothing_written(base_path, count_data, train_args, tmp_path, capsys):
    proj = tmp_path / "new" / "proj"  # neither folder exists
    argv = train_args(base_path, count_data, proj, "--dry_run", "1", "--warmup_steps", "3", epochs=3, steps=8)
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert not (tmp_path / "new").exists()  # no proj_dir created, no lock, no log
    # Bone r=16, (r, out) per layer, 2 blocks 64 wide with ffn 256: 4 x 16 x 64 (att) + 16 x 256 (ffn.key)
    # + 16 x 64 (ffn.value) = 9,216 per block
    assert (
        "adapted 12 layers: att.receptance att.key att.value att.output ffn.key ffn.value in blocks 0-1"
        in out
    )
    assert re.search(r"adapters 18,432, train_parts [\d,]+", out)
    assert "3 epochs x 8 micro-batches = 24 optimizer steps (accumulate 1); 1,536 token positions" in out
    assert "warmup 3 steps" in out and "0.0001 at the first step, 0.01 after warmup" in out
    weights, optimizer, logits = _mib(out, "weights"), _mib(out, "optimizer"), _mib(out, "logits")
    assert logits == 0  # 2 x 32 x 256 x 4 bytes rounds to 0 MiB
    assert weights >= 0 and optimizer >= 0
    amount = r"[\d.]+ (MiB|GiB)"  # the runtime term is this pytest process: it may pass 1 GiB
    assert re.search(rf"total\s+{amount}  \(grad_cp 0\); grad_cp 0: {amount}, grad_cp 1: {amount}", out)
    assert re.search(r"throughput   [\d.e+-]+ s per micro-batch, [\d,]+ tokens/s", out)


def test_existing_folder_is_left_as_it_was(base_path, count_data, train_args, tmp_path, capsys):
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "notes.txt").write_text("mine")
    assert main(train_args(base_path, count_data, proj, "--dry_run", "1", epochs=1, steps=2)) == 0
    assert sorted(p.name for p in proj.iterdir()) == ["notes.txt"]  # no lock file, nothing else


# VmHWM, not getrusage's ru_maxrss: Linux carries the forking parent's peak (here pytest's, over 1 GiB in
# the full suite) into a child's ru_maxrss across exec, while VmHWM belongs to the child's own memory map.
_PEAK = (
    "import json, re, sys\n"
    "from rwkv_disha.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "hwm = int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
    "print(json.dumps({'rc': rc, 'peak_kib': hwm}))\n"
)


@pytest.mark.slow
def test_memory_estimate_is_within_25_percent_of_a_real_step(make_checkpoint, tmp_path):
    """The demo's model and data (2 x 128, World vocabulary, chat corpus, ctx 64, micro_bsz 8, qa mask)."""
    base = make_checkpoint(2, 128, 65536, seed=0)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in make_corpus(seed=0)))
    data = tmp_path / "data"
    assert (
        main(["prepare", "--input", str(corpus), "--output", str(data), "--workers", "1", "--progress", "0"])
        == 0
    )
    common = [
        "train", "--load_model", str(base), "--data_file", str(data), "--loss_mask", "qa", "--ctx_len", "64",
        "--micro_bsz", "8", "--epoch_steps", "1", "--epoch_count", "1", "--lr_init", "1e-3",
        "--lr_final", "1e-3", "--accelerator", "cpu", "--precision", "fp32", "--progress_bar", "0",
        "--disha_config", '{"mode":"bone","load":"","r":32}',
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    real = subprocess.Popen(  # each in its own process: RSS includes the runtime, as for a user
        [sys.executable, "-c", _PEAK, *common, "--proj_dir", str(tmp_path / "real")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    dry = subprocess.run(
        [sys.executable, "-m", "rwkv_disha.cli", *common, "--proj_dir", str(tmp_path / "dry"),
         "--dry_run", "1"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    out, err = real.communicate(timeout=600)
    assert dry.returncode == 0, dry.stderr[-2000:]
    res = json.loads(out.strip().splitlines()[-1])
    assert res["rc"] == 0, err[-2000:]
    measured = res["peak_kib"] / 1024
    estimate = _mib(dry.stdout, "total")
    assert abs(estimate - measured) <= 0.25 * measured, (estimate, measured, dry.stdout)
    assert not (tmp_path / "dry").exists()
    # the parts add up, and the logits term is one chunk of the loss: 256 of the 8 x 64 rows x V fp32
    parts = sum(_mib(dry.stdout, k) for k in ("runtime", "weights", "optimizer", "activations", "logits"))
    assert parts == pytest.approx(estimate, abs=3)
    assert _mib(dry.stdout, "logits") == 256 * 65536 * 4 / 2**20
    assert "256 of 8 x 64 rows x 65536 at a time" in dry.stdout


def _lrs(text: str) -> list[str]:
    """The lr line's values: at the first step, [after warmup,] at the last."""
    line = re.search(r"^ +lr \(cos_decay\) (.*)$", text, re.M).group(1)
    return re.findall(r"([\d.e+-]+) (?:at the first step|after warmup|at the last)", line)


def test_schedule_matches_the_real_run_fresh_and_resumed(base_path, count_data, train_args, tmp_path, capsys):
    """The schedule line against metrics.csv: steps, token positions and the lr at the first, warmup-end
    and last steps, for a fresh run and for its --resume with a longer --epoch_count (which continues at
    step 8: the steps, tokens and lr are those still to come, not the whole run's from step 0)."""
    proj = tmp_path / "run"
    # accumulate 2: the metrics.csv row of each epoch's batch 0 carries the lr of the step it accumulates for
    args = train_args(base_path, count_data, proj, "--lr_final", "1e-3", "--warmup_steps", "2",
                      "--accumulate_grad_batches", "2", epochs=2, steps=8, ctx=16)  # fmt: skip
    step_lr = {}  # optimizer step (0-based) -> lr, from the rows that start an optimizer step

    def rows() -> list[dict]:
        import csv

        with open(proj / "metrics.csv") as f:
            got = list(csv.DictReader(f))
        for r in got:
            if int(r["batch"]) % 2 == 0:
                step_lr[int(r["global_step"])] = f"{float(r['lr']):.3g}"
        return got

    capsys.readouterr()
    assert main([*args, "--dry_run", "1"]) == 0
    dry = capsys.readouterr().out
    assert main(args) == 0
    first = rows()
    assert "= 8 optimizer steps (accumulate 2); 512 token positions at most" in dry
    assert int(first[-1]["global_step"]) == 8 and int(first[-1]["tokens"]) == 512
    assert _lrs(dry) == [step_lr[0], step_lr[2], step_lr[7]]

    resume = ["train", "--resume", str(proj), "--epoch_count", "4", "--progress_bar", "0"]
    capsys.readouterr()
    assert main([*resume, "--dry_run", "1"]) == 0
    dry = capsys.readouterr().out
    assert main(resume) == 0
    step_lr.clear()
    new = rows()[len(first) :]
    done = int(new[-1]["global_step"]) - int(first[-1]["global_step"])
    tokens = int(new[-1]["tokens"]) - int(first[-1]["tokens"])
    assert (done, tokens) == (8, 512)
    assert (
        f"= 16 optimizer steps (accumulate 2); resumed after step 8: {done} left; "
        f"{tokens} token positions left at most" in dry
    )
    assert _lrs(dry) == [step_lr[8], step_lr[15]]  # warmup (steps 0-1) is behind it
    assert "the rest of the run: about" in dry


def test_token_positions_against_the_real_run(base_path, count_data, train_args, tmp_path, capsys):
    """--dataload pad at a ctx_len longer than every document (21-61 tokens here): training trims each
    batch to its longest document, so the report's count is a bound the real run stays under, and says so;
    --dataload get trains full ctx_len windows: the count is exact."""
    import csv

    for dataload, ctx in (("pad", 128), ("get", 32)):
        proj = tmp_path / dataload
        args = train_args(base_path, count_data, proj, "--dataload", dataload, epochs=1, steps=4, ctx=ctx)
        capsys.readouterr()
        assert main([*args, "--dry_run", "1"]) == 0
        dry = capsys.readouterr().out
        assert main(args) == 0
        with open(proj / "metrics.csv") as f:
            real = int(list(csv.DictReader(f))[-1]["tokens"])
        reported = int(re.search(r"; ([\d,]+) token positions", dry).group(1).replace(",", ""))
        assert reported == 4 * 2 * ctx
        if dataload == "pad":
            assert real < reported and "token positions at most (--dataload pad" in dry
        else:
            assert real == reported and "at most" not in dry


def test_throughput_counts_the_positions_its_timed_steps_compute(base_path, count_data, train_args, tmp_path):
    """The timed steps run on trimmed batches (as training does): tokens/s counts those positions, not
    micro_bsz x ctx_len; the memory estimate keeps the untrimmed width, the widest a batch can be."""
    from rwkv_disha.cli import parse_config
    from rwkv_disha.data.dataset import trim_padding
    from rwkv_disha.train import dry_run as dr
    from rwkv_disha.train.build import build_adapter_config, build_dataset
    from rwkv_disha.train.checks import check_model_shape

    args = train_args(base_path, count_data, tmp_path / "p", "--dataload", "pad", epochs=1, steps=4, ctx=128)
    _, cfg = parse_config("train", args[1:])
    mcfg, acfg = check_model_shape(cfg), build_adapter_config(cfg)
    ds = build_dataset(cfg, mcfg.vocab_size)
    widths = [trim_padding(b)["input_ids"].shape[1] for b in dr._batches(cfg, ds, 1 + dr.TIMED_STEPS, "cpu")]
    p = dr.plan(cfg, mcfg, acfg, ds)
    per_step = p["tokens_per_second"] * p["seconds_per_step"]
    assert per_step == pytest.approx(2 * sum(widths[1:]) / dr.TIMED_STEPS) and per_step < 2 * 128
    assert p["T"] == 128  # memory: the untrimmed width
