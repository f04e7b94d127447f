"""`rwkv-disha bench`: the training step on a tiny shape (JSON fields, FLOP count, sweep), the kernel
timing with paired ratios, and the CPU bf16 fallback (detection monkeypatched). Timing values are never
asserted: only that they exist and are positive."""

from __future__ import annotations

import json

import pytest
import torch

import rwkv_disha.hardware as hardware
from rwkv_disha.bench import Config, TrainStep, flops_per_token, interleaved_times, paired_median_ratio
from rwkv_disha.cli import main
from rwkv_disha.errors import RWKVDishaError

TINY = ["--n_layer", "1", "--n_embd", "64", "--vocab_size", "64", "--ctx_len", "16", "--device", "cpu"]
TINY += ["--steps", "2", "--warmup", "1", "--precision", "fp32", "--r", "16"]


def test_step_prints_and_writes_the_result(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["bench", *TINY, "--json", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    written = json.loads(out.read_text())
    assert printed == written
    for key in ("tokens_per_s", "mfu", "peak_mem_bytes", "flops_per_token", "matmul_peak_flops"):
        assert written[key] > 0, key
    assert written["what"] == "step" and written["adapter"] == "bone r16" and len(written["step_s"]) == 2
    assert written["peak_mem_kind"].startswith("peak RSS")


def test_sweep_tries_doubling_micro_bsz_and_names_the_fastest(capsys):
    assert main(["bench", *TINY, "--steps", "1", "--sweep", "micro_bsz", "--sweep_max", "2"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["micro_bsz"] for r in res["runs"]] == [1, 2]
    assert res["best_micro_bsz"] in (1, 2) and res["stopped"] == "reached --sweep_max"


def _step(adapter: str, **kw) -> TrainStep:
    cfg = Config(
        n_layer=2, n_embd=64, vocab_size=64, ctx_len=8, precision="fp32", adapter=adapter, r=16, **kw
    )
    return TrainStep(cfg, torch.device("cpu"), "fp32")


def test_flops_count_adapters_honestly():
    C, F, L, r, tokens = 64, 256, 2, 16, 8
    frozen = flops_per_token(_step("none").model, tokens)
    bone = flops_per_token(_step("bone").model, tokens)
    bat = flops_per_token(_step("bat").model, tokens)
    lora = flops_per_token(_step("lora").model, tokens)
    full = flops_per_token(_step("full").model, tokens)
    layers = [(C, C)] * 4 + [(C, F), (F, C)]  # (in, out) of the adapted Linears of one block
    assert frozen["adapter"] == 0 and bone["base"] == frozen["base"]
    assert bone["adapter"] == L * sum(6 * r * o + i for i, o in layers)
    assert lora["adapter"] == L * sum(6 * r * (i + o) for i, o in layers)
    assert bat["adapter"] == L * sum(2 * i * o + 4 * r * i * o / tokens for i, o in layers)
    assert full["base"] == frozen["base"] * 6 / 4  # every matmul weight also gets its own gradient
    assert frozen["total"] < bone["total"] < bat["total"]


def test_frozen_baseline_trains_only_train_parts():
    step = _step("none")
    names = [n for n, p in step.model.named_parameters() if p.requires_grad]
    assert names and all(".ln" in n or n.startswith("ln_out") for n in names)


def test_kernel_rounds_are_interleaved_and_ratios_paired(capsys):
    calls = []
    steps = {name: (lambda n=name: calls.append(n)) for name in "abc"}
    times = interleaved_times(steps, rounds=4, device="cpu")
    timed = calls[3:]  # after one warm-up call each
    firsts = [timed[i * 3] for i in range(4)]
    assert len(set(firsts)) >= 2  # not always the same variant first
    assert all(len(t) == 4 for t in times.values())
    assert paired_median_ratio({"x": [2.0, 4.0, 9.0], "y": [1.0, 2.0, 3.0]}, "x", "y") == 2.0
    assert main(["bench", "--what", "kernel", "--T", "16", "--H", "1", "--N", "16", "--repeat", "2"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["speedup_of_torch"]["loop"] > 0 and res["rounds"] == 2 and res["dtype"] == "fp32"


def test_kernel_bench_feeds_bf16_inputs_when_asked(monkeypatch, capsys):
    """--kernel_dtype bf16 hands the kernels bf16 tensors (what a bf16 run gives them) and says so."""
    from rwkv_disha import kernels

    seen = []
    chunked = kernels._WKV7["torch"]

    def spy(*xs, **kw):
        seen.append(xs[0].dtype)
        return chunked(*xs, **kw)

    monkeypatch.setitem(kernels._WKV7, "torch", spy)
    argv = ["bench", "--what", "kernel", "--ops", "torch", "--T", "16", "--H", "1", "--N", "16"]
    assert main([*argv, "--repeat", "1", "--kernel_dtype", "bf16"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["dtype"] == "bf16"
    assert seen and set(seen) == {torch.bfloat16}


@pytest.mark.parametrize("version", ["x060", "x052"])
def test_kernel_bench_times_the_wkv6_kernels_for_rwkv6_and_5(monkeypatch, capsys, version):
    """--version x060 / x052 times the WKV-6 kernels (with the bonus u), not RWKV-7's."""
    from rwkv_disha import kernels

    seen = []
    chunked = kernels._WKV6["torch"]

    def spy(*xs, **kw):
        seen.append([tuple(x.shape) for x in xs])
        return chunked(*xs, **kw)

    monkeypatch.setitem(kernels._WKV6, "torch", spy)
    argv = ["bench", "--what", "kernel", "--ops", "torch,loop", "--T", "16", "--H", "2", "--N", "16"]
    assert main([*argv, "--repeat", "1", "--version", version]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["version"] == version and res["speedup_of_torch"]["loop"] > 0
    assert seen and seen[0] == [(1, 16, 2, 16)] * 4 + [(2, 16)]


def test_cpu_without_native_bf16_trains_fp32_with_a_notice(monkeypatch, capsys):
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: False)
    assert hardware.cpu_precision("bf16")[0] == "fp32" and hardware.cpu_precision("fp32") == ("fp32", None)
    assert main(["bench", *TINY, "--precision", "bf16", "--steps", "1", "--warmup", "0"]) == 0
    cap = capsys.readouterr()
    res = json.loads(cap.out.strip().splitlines()[-1])
    assert (res["precision"], res["precision_asked"], res["matmul_dtype"]) == ("fp32", "bf16", "float32")
    assert cap.err.count("notice: this CPU has no native bf16") == 1


def test_cpu_with_native_bf16_keeps_bf16(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: True)
    assert hardware.cpu_precision("bf16") == ("bf16", None)


def test_train_on_a_cpu_without_bf16_runs_fp32(monkeypatch, capsys, tmp_path, make_checkpoint):
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: False)
    base = make_checkpoint(1, 64, 64, style="pretrain", seed=3)
    argv = [
        "train", "--load_model", str(base), "--proj_dir", str(tmp_path / "p"), "--data_type", "dummy",
        "--ctx_len", "16", "--micro_bsz", "1", "--epoch_steps", "2", "--epoch_count", "1",
        "--accelerator", "cpu", "--precision", "bf16", "--progress_bar", "0",
        "--disha_config", '{"mode":"bone","load":"","r":16}',
    ]  # fmt: skip
    assert main(argv) == 0
    assert capsys.readouterr().err.count("notice: this CPU has no native bf16") == 1
    saved = json.loads((tmp_path / "p" / "train_config.json").read_text())
    assert saved["engine"]["precision"] == "fp32"


@pytest.mark.parametrize("argv", [["--adapter", "bat"], ["--adapter", "lora", "--grad_cp", "1"]])
def test_other_adapters_and_grad_cp_run(argv, capsys):
    assert main(["bench", *TINY, "--steps", "1", "--warmup", "0", *argv]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tokens_per_s"] > 0


def test_a_cgroup_limit_bounds_the_memory_a_run_is_told_it_has(tmp_path, monkeypatch):
    """A container's RAM cap (cgroup v2 memory.max) is not in /proc/meminfo: the memory checks read it."""
    assert hardware.cgroup_room_bytes(tmp_path) is None  # no cgroup files
    (tmp_path / "memory.max").write_text("max\n")
    assert hardware.cgroup_room_bytes(tmp_path) is None  # "max": no limit
    (tmp_path / "memory.max").write_text("1000000\n")
    (tmp_path / "memory.current").write_text("400000\n")
    assert hardware.cgroup_room_bytes(tmp_path) == 600000
    monkeypatch.setattr(hardware, "CGROUP", tmp_path)
    assert hardware.memory_bytes(False) == 1000000 and hardware.available_bytes() == 600000


def test_activations_beyond_memory_are_refused_and_real_runs_are_not(monkeypatch):
    """The floor (2 bytes x C x (L + 4) per token) is far below what a step keeps, so a 0.1B step at
    ctx 4096 passes on a 24 GB machine, and the same step over 10M tokens does not."""
    assert hardware.activation_floor_bytes(1, 512, 768, 12) == 512 * 768 * 16 * 2
    monkeypatch.setattr(hardware, "memory_bytes", lambda on_gpu: 24 * 2**30)
    hardware.check_activations_fit(16, 4096, 768, 12, False)
    with pytest.raises(RWKVDishaError, match=r"--ctx_len 10000000 x --micro_bsz 1 needs more than 229 GiB"):
        hardware.check_activations_fit(1, 10_000_000, 768, 12, False)
