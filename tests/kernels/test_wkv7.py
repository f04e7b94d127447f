"""Chunked WKV-7 against the per-step reference loop: forward, state, every input gradient, gradcheck."""

import pytest
import torch

from rwkv_disha.errors import RWKVDishaError
from rwkv_disha.kernels import available_ops, get_wkv7, resolve_op
from rwkv_disha.kernels.wkv7 import wkv7_chunked, wkv7_loop

MAX_LOG_DECAY = 0.6065306597126334  # exp(-0.5): decay = exp(log_w) lies in (0.545, 1)


def make_inputs(B, T, H, N, decay="mixed", dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    r, k, v = rnd(B, T, H, N), rnd(B, T, H, N), rnd(B, T, H, N)
    u = torch.rand(B, T, H, N, generator=g, dtype=dtype)
    if decay == "slow":  # decay close to 1
        log_w = -1e-3 * u
    elif decay == "fast":  # decay close to its floor 0.545
        log_w = -MAX_LOG_DECAY * (1 - 1e-3 * u)
    else:
        log_w = -MAX_LOG_DECAY * u
    kk = torch.nn.functional.normalize(rnd(B, T, H, N), dim=-1)
    a_gate = torch.rand(B, T, H, N, generator=g, dtype=dtype)
    return [r, log_w, k, v, -kk, kk * a_gate]


@pytest.mark.parametrize("T", [1, 17, 64, 200])
@pytest.mark.parametrize("decay", ["slow", "fast", "mixed"])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_equals_loop_forward_and_backward(T, decay, with_state):
    B, H, N = 2, 2, 16
    xs = [t.requires_grad_() for t in make_inputs(B, T, H, N, decay, seed=T)]
    s0 = torch.randn(B, H, N, N, dtype=torch.float64, requires_grad=True) if with_state else None
    grads = []
    outs = []
    for fn in (wkv7_loop, lambda *a, state: wkv7_chunked(*a, state=state, chunk=16)):
        y, sT = fn(*xs, state=s0)
        gy = torch.cos(torch.arange(y.numel(), dtype=y.dtype)).view_as(y)
        loss = (y * gy).sum() + (sT * torch.sin(torch.arange(sT.numel(), dtype=sT.dtype)).view_as(sT)).sum()
        inputs = xs + ([s0] if with_state else [])
        grads.append(torch.autograd.grad(loss, inputs))
        outs.append((y.detach(), sT.detach()))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-11, rtol=1e-11)
    torch.testing.assert_close(outs[1][1], outs[0][1], atol=1e-11, rtol=1e-11)
    for g_chunk, g_loop in zip(grads[1], grads[0]):
        if T > 1:  # at T = 1 from a zero state, a and b cannot matter
            assert g_loop.abs().max() > 0
        torch.testing.assert_close(g_chunk, g_loop, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("decay", ["slow", "fast"])
def test_gradcheck_fp64(with_state, decay):
    xs = [t.requires_grad_() for t in make_inputs(1, 11, 1, 4, decay, seed=5)]
    s0 = torch.randn(1, 1, 4, 4, dtype=torch.float64, requires_grad=True)

    def f(*args):
        if with_state:
            *ins, s = args
        else:
            ins, s = args, None
        y, sT = wkv7_chunked(*ins, state=s, chunk=4)  # 11 = 2 full chunks + a padded one
        return y, sT

    assert torch.autograd.gradcheck(f, tuple(xs + ([s0] if with_state else [])), eps=1e-6, atol=1e-6)


def test_fp32_chunked_close_to_fp64_loop_at_default_chunk():
    xs = make_inputs(1, 256, 2, 64, "fast", seed=7)
    y64, s64 = wkv7_loop(*xs)
    y32, s32 = wkv7_chunked(*[t.float() for t in xs])
    assert y32.dtype == torch.float32
    assert ((y32.double() - y64).abs().max() / y64.abs().max()) < 1e-5
    assert ((s32.double() - s64).abs().max() / s64.abs().max()) < 1e-5


def test_bf16_inputs_run_the_recurrence_in_fp32():
    xs = make_inputs(1, 64, 2, 16, seed=8)
    y64, _ = wkv7_loop(*xs)
    y, sT = wkv7_chunked(*[t.bfloat16() for t in xs])
    assert y.dtype == torch.bfloat16 and sT.dtype == torch.float32
    assert ((y.double() - y64).abs().max() / y64.abs().max()) < 3e-2  # bf16 inputs, fp32 recurrence


def test_state_shape_is_checked():
    xs = make_inputs(1, 8, 2, 4)
    with pytest.raises(ValueError, match="state must be"):
        wkv7_chunked(*xs, state=torch.zeros(1, 2, 4, 3, dtype=torch.float64))


def test_registry_errors_name_what_is_available():
    assert get_wkv7("torch") is wkv7_chunked and get_wkv7("loop") is wkv7_loop
    with pytest.raises(RWKVDishaError, match="unknown --op 'bogus'; choose one of auto, torch"):
        resolve_op("bogus")
    if "fla" not in available_ops():
        for op in ("fla", "triton"):
            with pytest.raises(
                RWKVDishaError, match=f"--op {op} needs flash-linear-attention.*available here: torch, loop"
            ):
                resolve_op(op)
