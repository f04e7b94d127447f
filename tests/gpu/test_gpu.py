"""GPU checks (skipped without CUDA): the fla kernel against ours, the model on CUDA, training on a GPU."""

import csv
import importlib.util

import pytest
import torch

from rwkv_disha.cli import main
from rwkv_disha.kernels.wkv7 import wkv7_chunked

pytestmark = pytest.mark.gpu
needs_fla = pytest.mark.skipif(
    importlib.util.find_spec("fla") is None, reason="flash-linear-attention missing"
)


def inputs(B, T, H, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g) for _ in range(3))
    log_w = -0.6065 * torch.rand(B, T, H, N, generator=g)
    kk = torch.nn.functional.normalize(torch.randn(B, T, H, N, generator=g), dim=-1)
    a = torch.rand(B, T, H, N, generator=g)
    return [t.cuda() for t in (r, log_w, k, v, -kk, kk * a)]


@needs_fla
@pytest.mark.parametrize("T", [17, 256])
@pytest.mark.parametrize("with_state", [False, True])
def test_fla_equals_chunked_torch_forward_and_backward(T, with_state):
    from rwkv_disha.kernels.fla import wkv7_fla

    xs = inputs(2, T, 4, 64, seed=T)
    s0 = torch.randn(2, 4, 64, 64, device="cuda") * 0.5 if with_state else None
    results = []
    for fn in (wkv7_chunked, wkv7_fla):
        leaves = [x.clone().requires_grad_() for x in xs]
        y, sT = fn(*leaves, state=s0)
        (y * torch.cos(y.detach())).sum().backward()
        results.append((y.detach(), sT.detach(), [x.grad for x in leaves]))
    (y0, s0_, g0), (y1, s1, g1) = results
    rel = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()  # noqa: E731
    assert rel(y1, y0) < 5e-3 and rel(s1, s0_) < 5e-3  # fla's Triton dots may use tf32
    for a, b in zip(g1, g0):
        assert rel(a, b) < 2e-2


@needs_fla
def test_fla_takes_bf16_inputs_as_bf16_and_matches_fp32():
    """A bf16 run feeds fla bf16 tensors (no fp32 copies); fwd + grads stay within bf16 tolerance."""
    from rwkv_disha.kernels.fla import wkv7_fla

    xs = inputs(2, 200, 4, 64, seed=3)
    results = []
    for dt in (torch.float32, torch.bfloat16):
        leaves = [x.to(dt).requires_grad_() for x in xs]
        y, sT = wkv7_fla(*leaves)
        assert y.dtype == dt
        (y.float() * torch.cos(y.detach().float())).sum().backward()
        results.append((y.detach().float(), sT.detach().float(), [x.grad.float() for x in leaves]))
    (y0, s0, g0), (y1, s1, g1) = results
    rel = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()  # noqa: E731
    assert rel(y1, y0) < 3e-2 and rel(s1, s0) < 3e-2
    for a, b in zip(g1, g0):
        assert rel(a, b) < 6e-2


def test_model_on_cuda_matches_cpu(make_checkpoint):
    from rwkv_disha import load_model

    path = make_checkpoint(2, 128, 1000, seed=4)
    idx = torch.randint(0, 1000, (2, 100))
    with torch.no_grad():
        cpu = load_model(path, op="torch")(idx)
        for op in ["torch"] + (["fla"] if importlib.util.find_spec("fla") else []):
            gpu = load_model(path, op=op, device="cuda")(idx.cuda()).cpu()
            assert ((gpu - cpu).abs().max() / cpu.abs().max()) < 5e-3, op


def _train(tmp_path, base, data, *extra):
    argv = ["train", "--load_model", str(base), "--proj_dir", str(tmp_path), "--data_type", "dummy",
            "--ctx_len", "128", "--micro_bsz", "4", "--epoch_steps", "12", "--epoch_count", "1",
            "--lr_init", "1e-2", "--lr_final", "1e-2", "--accelerator", "gpu", "--progress_bar", "0",
            "--disha_config", '{"mode":"bone","load":"","r":16}', *extra]  # fmt: skip
    assert main(argv) == 0
    losses = [float(r["loss"]) for r in csv.DictReader((tmp_path / "metrics.csv").read_text().splitlines())]
    assert all(torch.isfinite(torch.tensor(losses)))
    return losses


@pytest.mark.parametrize(
    "extra",
    [
        ["--precision", "bf16"],
        ["--precision", "fp16"],
        ["--precision", "bf16", "--quant", "nf4"],
        ["--precision", "bf16", "--quant", "int8"],
        ["--precision", "bf16", "--grad_cp", "1"],
        ["--precision", "bf16", "--strategy", "deepspeed_stage_1"],
        ["--precision", "bf16", "--strategy", "deepspeed_stage_2"],
        ["--precision", "bf16", "--strategy", "ddp"],  # DDP on one GPU
        ["--precision", "bf16", "--strategy", "deepspeed_stage_2_offload"],
    ],  # fmt: skip
    ids=["bf16", "fp16", "nf4", "int8", "grad_cp", "ds1", "ds2", "ddp1", "ds2_offload"],
)
def test_train_on_gpu(tmp_path, make_checkpoint, extra):
    if "--quant" in extra:
        pytest.importorskip("bitsandbytes")
    if any(x.startswith("deepspeed") for x in extra):
        pytest.importorskip("deepspeed")
    base = make_checkpoint(2, 128, 512, style="pretrain", seed=2)
    losses = _train(tmp_path, base, None, *extra)
    assert len(losses) == 12
    assert (tmp_path / "rwkv-0.pth").is_file()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_resume_on_gpu_continues_the_run(tmp_path, make_checkpoint, precision):
    """resume.ckpt of a GPU run (fp16: with the loss scaler's state) passes the resume checks and continues
    the same run for a second epoch in the same folder."""
    base = make_checkpoint(2, 128, 512, style="pretrain", seed=2)
    _train(tmp_path, base, None, "--precision", precision)
    argv = ["train", "--resume", str(tmp_path), "--epoch_count", "2", "--progress_bar", "0"]
    assert main(argv) == 0
    rows = list(csv.DictReader((tmp_path / "metrics.csv").read_text().splitlines()))
    assert (tmp_path / "rwkv-1.pth").is_file() and len(rows) == 24
