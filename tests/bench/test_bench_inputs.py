"""`rwkv-disha bench`'s own inputs: a --json that cannot be written is refused before the benchmark runs
(and an existing file is kept), an adapter rank the layers cannot take is worded with bench's --r and
refused before the model is built, a flag of the other --what is refused, not ignored, and --shape
cannot be silently dropped. Each refusal: exit 2, one `error:` line, nothing written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import rwkv_disha.bench as bench
from rwkv_disha.cli import main

STEP = ["bench", "--n_layer", "1", "--n_embd", "64", "--vocab_size", "64", "--ctx_len", "8", "--steps", "1"]
STEP += ["--warmup", "0", "--precision", "fp32", "--device", "cpu"]
KERNEL = ["bench", "--what", "kernel", "--T", "16", "--H", "1", "--N", "16", "--repeat", "1"]
MATMUL = ["bench", "--what", "matmul"]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(capsys, tmp_path: Path, argv: list[str], no_work: bool = True) -> str:
    """Run ``argv``: exit 2, one error line (returned), nothing under tmp_path created or changed, and
    (``no_work``) no benchmark run first."""
    before = _files(tmp_path)
    capsys.readouterr()
    rc = main(argv)
    cap = capsys.readouterr()
    lines = [line for line in cap.err.splitlines() if line.startswith("error: ")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in cap.err, cap.err[-2000:]
    assert _files(tmp_path) == before and sorted(os.listdir(tmp_path)) == sorted(Path(p).name for p in before)
    if no_work:
        assert cap.out == "", "the benchmark ran before the refusal"
    return lines[0]


@pytest.fixture
def no_timing(monkeypatch):
    """Fail the test if any benchmark starts: every check must come first."""

    def started(*args, **kw):
        raise AssertionError("the benchmark started before the options were checked")

    for name in ("run_kernel", "run_step", "matmul_peak_flops", "random_base"):
        monkeypatch.setattr(bench, name, started)


# --- B: --json


def test_json_in_proc_is_refused_before_the_run_for_the_real_reason(capsys, tmp_path, no_timing):
    """/proc exists and root passes os.access there; only creating a file shows it takes none."""
    line = refused(capsys, tmp_path, [*MATMUL, "--json", "/proc/r.json"])
    assert line == "error: --json /proc/r.json: no file can be created in /proc; choose another folder"


@pytest.mark.skipif(os.geteuid() != 0, reason="root passes os.access on a read-only folder")
def test_json_in_an_unwritable_folder_is_found_by_a_real_write(capsys, tmp_path, no_timing, monkeypatch):
    import tempfile

    def read_only(*args, **kw):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    line = refused(capsys, tmp_path, [*MATMUL, "--json", str(tmp_path / "r.json")])
    assert "no file can be created in" in line and "permission denied" in line


def test_json_with_a_trailing_slash_is_refused_not_written_as_a_file(capsys, tmp_path, no_timing):
    line = refused(capsys, tmp_path, [*MATMUL, "--json", f"{tmp_path}/newdir/"])
    assert line == f"error: --json {tmp_path}/newdir/ ends with a slash, as a folder does: give a file name"
    assert refused(capsys, tmp_path, [*MATMUL, "--json", f"{tmp_path}/"]).endswith(
        "is a directory: give a file name"
    )


def test_json_in_a_missing_folder_is_refused(capsys, tmp_path, no_timing):
    line = refused(capsys, tmp_path, [*MATMUL, "--json", str(tmp_path / "nodir" / "r.json")])
    assert line == (
        f"error: --json {tmp_path}/nodir/r.json: the folder {tmp_path}/nodir does not exist; "
        "create it or choose another"
    )


def test_an_existing_json_is_kept_unless_overwrite(capsys, tmp_path, no_timing):
    mine = tmp_path / "mine.json"
    mine.write_text('{"my": "results"}\n')
    line = refused(capsys, tmp_path, [*KERNEL, "--json", str(mine)])
    assert line == f"error: --json {mine} already exists: choose another name or pass --overwrite 1"


def test_overwrite_replaces_the_json_atomically(capsys, tmp_path):
    out = tmp_path / "r.json"
    out.write_text("old\n")
    assert main([*MATMUL, "--json", str(out), "--overwrite", "1"]) == 0
    assert json.loads(out.read_text())["what"] == "matmul"
    assert sorted(os.listdir(tmp_path)) == ["r.json"]  # no temporary left behind


def test_a_json_that_appears_during_the_run_is_not_clobbered(capsys, tmp_path, monkeypatch):
    """The file is checked before the run and created exclusively after it: another's file wins."""
    out = tmp_path / "r.json"

    def peak(*args, **kw):
        out.write_text("written meanwhile\n")
        return 1e9

    monkeypatch.setattr(bench, "matmul_peak_flops", peak)
    assert main([*MATMUL, "--json", str(out)]) == 2
    assert (
        capsys.readouterr().err.strip().endswith("already exists: choose another name or pass --overwrite 1")
    )
    assert out.read_text() == "written meanwhile\n" and sorted(os.listdir(tmp_path)) == ["r.json"]


# --- C: the adapter rank, with bench's flag, before the build


@pytest.mark.parametrize(
    "adapter,r,want",
    [
        ("bone", 128, "--adapter bone --r 128 exceeds the input width 64 of blocks.0.att.receptance; "
         "the largest --r that fits is 64"),
        ("lora", 100000, "--adapter lora --r 100000 exceeds the smaller side 64 of blocks.0.att.receptance "
         "(64x64); the largest --r that fits is 64"),
        ("bat", 48, "the largest --r that fits is 32"),
    ],
)  # fmt: skip
def test_a_rank_the_layers_cannot_take_names_bench_flag(capsys, tmp_path, no_timing, adapter, r, want):
    line = refused(capsys, tmp_path, [*STEP, "--adapter", adapter, "--r", str(r)])
    assert want in line and "disha_config" not in line and "lora_r" not in line


def test_adapter_options_are_refused_before_lightning_loads(capsys, tmp_path, monkeypatch):
    """Importing Lightning (train.build) takes seconds: the adapter checks run without it."""
    import sys

    for name in [
        m for m in sys.modules if m == "lightning" or m.startswith(("lightning.", "rwkv_disha.train.build"))
    ]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lightning", None)  # importing it now fails loudly
    refused(capsys, tmp_path, [*STEP, "--r", "128"])
    refused(capsys, tmp_path, [*STEP, "--train_parts", "bogus"])
    line = refused(capsys, tmp_path, [*STEP, "--adapter", "none", "--train_parts"])
    assert "nothing trains" in line and "--train_parts" in line


@pytest.mark.parametrize("adapter", ["none", "bone", "bat", "lora", "state", "full"])
def test_the_checked_adapter_config_is_the_one_train_builds(adapter):
    import torch

    from rwkv_disha.train.build import build_adapter_config

    cfg = bench.Config(adapter=adapter, r=16)
    cpu = torch.device("cpu")
    want = build_adapter_config(bench.train_config(cfg, "fp32", cpu)).to_dict()
    assert bench.adapter_config(cfg, cpu).to_dict() == want


# --- D: flags of the other --what, and --shape


def test_op_given_to_kernel_mode_is_refused_naming_ops(capsys, tmp_path, no_timing):
    line = refused(capsys, tmp_path, [*KERNEL, "--op", "cpp"])
    assert line == "error: --op is a flag of --what step; --what kernel takes --ops"
    step_flags = ["--op", "cpp", "--precision", "fp16", "--r", "-5", "--ctx_len", "0", "--sweep", "micro_bsz"]
    line = refused(capsys, tmp_path, [*KERNEL, *step_flags])
    assert line == (
        "error: --r, --ctx_len, --precision, --op, --sweep are flags of --what step; "
        "--what kernel takes --ops (drop the others)"
    )


def test_every_flag_of_the_other_mode_is_refused(capsys, tmp_path, no_timing):
    assert refused(capsys, tmp_path, [*STEP, "--ops", "cpp"]) == (
        "error: --ops is a flag of --what kernel; --what step takes --op"
    )
    assert refused(capsys, tmp_path, [*STEP, "--T", "8"]) == (
        "error: --T is a flag of --what kernel; --what step does not read it: drop it"
    )
    assert refused(capsys, tmp_path, [*KERNEL, "--shape", "7B"]) == (
        "error: --shape is a flag of --what step; --what kernel does not read it: drop it"
    )
    assert refused(capsys, tmp_path, [*MATMUL, "--version", "x060", "--N", "8"]) == (
        "error: --what matmul does not read --version, --N: drop them"
    )


def test_the_default_values_of_the_other_mode_are_not_refused(capsys, tmp_path):
    """Only a flag given explicitly is refused; a YAML key counts as given (as on the command line)."""
    cfg = tmp_path / "b.yaml"
    cfg.write_text("what: kernel\nT: 16\nH: 1\nN: 16\nrepeat: 1\n")
    assert main(["bench", "--config", str(cfg)]) == 0
    cfg.write_text("what: kernel\nT: 16\nH: 1\nN: 16\nrepeat: 1\nop: cpp\n")
    assert main(["bench", "--config", str(cfg)]) == 2
    assert "--op is a flag of --what step" in capsys.readouterr().err


def test_shape_with_both_dimensions_given_is_refused(capsys, tmp_path, no_timing):
    line = refused(capsys, tmp_path, ["bench", "--shape", "7B", "--n_layer", "2", "--n_embd", "64"])
    assert line.startswith(
        "error: --shape 7B is unused when both --n_layer and --n_embd are given: drop --shape"
    )


def test_a_partial_override_of_shape_runs_and_says_what_ran(capsys, tmp_path):
    out = tmp_path / "r.json"
    argv = [*STEP[:1], "--shape", "0.1B", *STEP[1:3], "--n_embd", "0", *STEP[5:], "--json", str(out)]
    assert main(argv) == 0
    res = json.loads(out.read_text())
    assert res["shape"] == "0.1B, n_layer 1" and (res["n_layer"], res["n_embd"]) == (1, 768)
    assert main([*STEP, "--json", str(tmp_path / "both.json")]) == 0
    res = json.loads((tmp_path / "both.json").read_text())
    assert res["shape"] is None and (res["n_layer"], res["n_embd"]) == (1, 64)
