"""Chunked WKV-6 against the per-step reference loop: forward, state, every input gradient, gradcheck;
and the loop against the recurrence written out by hand."""

import pytest
import torch

from rwkv_disha.kernels import get_wkv6
from rwkv_disha.kernels.wkv6 import wkv6_chunked, wkv6_loop


def make_inputs(B, T, H, N, decay="mixed", dtype=torch.float64, seed=0):
    """r, log-decay, k, v (B, T, H, N) and the bonus u (H, N)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    r, k, v = rnd(B, T, H, N), rnd(B, T, H, N), rnd(B, T, H, N)
    spread = {"slow": -6.0, "fast": 2.0, "mixed": 0.0}[decay]  # log-decay = -exp(spread + noise)
    log_w = -torch.exp(spread + 1.5 * rnd(B, T, H, N))  # mixed: per-step decays from ~0.99 to ~1e-9
    return [r, log_w, k, v, rnd(H, N)]


def test_loop_is_the_recurrence():
    """One head, written out with explicit (value, key) indices."""
    r, log_w, k, v, u = make_inputs(1, 5, 1, 3, seed=7)
    y, s = wkv6_loop(r, log_w, k, v, u)
    S = torch.zeros(3, 3, dtype=torch.float64)
    for t in range(5):
        kv = torch.outer(v[0, t, 0], k[0, t, 0])
        want = (S + kv * u[0]) @ r[0, t, 0]
        torch.testing.assert_close(y[0, t, 0], want, rtol=1e-12, atol=1e-12)
        S = S * torch.exp(log_w[0, t, 0]) + kv
    torch.testing.assert_close(s[0, 0], S, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("T", [1, 9, 64, 150])
@pytest.mark.parametrize("decay", ["slow", "fast", "mixed"])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("path", ["auto", "exact"])  # exact: every channel through the two-level form
def test_chunked_equals_loop_forward_and_backward(T, decay, with_state, path):
    B, H, N = 2, 2, 8
    xs = [t.requires_grad_() for t in make_inputs(B, T, H, N, decay, seed=T)]
    s0 = torch.randn(B, H, N, N, dtype=torch.float64, requires_grad=True) if with_state else None
    limit = 0.0 if path == "exact" else None
    results = []
    for fn in (wkv6_loop, lambda *a, state: wkv6_chunked(*a, state=state, chunk=32, sub=8, limit=limit)):
        y, sT = fn(*xs, state=s0)
        gy = torch.cos(torch.arange(y.numel(), dtype=y.dtype)).view_as(y)
        gs = torch.sin(torch.arange(sT.numel(), dtype=y.dtype)).view_as(sT)
        inputs = xs + ([s0] if with_state else [])
        grads = torch.autograd.grad((y * gy).sum() + (sT * gs).sum(), inputs)
        results.append((y, sT, grads))
    (y0, s0_, g0), (y1, s1, g1) = results
    torch.testing.assert_close(y1, y0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s1, s0_, rtol=1e-10, atol=1e-10)
    for name, a, b in zip(("r", "w", "k", "v", "u", "state"), g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=f"d{name}")


@pytest.mark.parametrize("decay", ["slow", "fast", "mixed"])
def test_fp32_stays_close_to_the_fp64_loop_at_any_decay(decay):
    """Per-step decays down to exp(-e^9) ~ 0: nothing overflows (the matrix-product form alone gives
    inf / NaN there), and no exponent loses digits to cancellation (one huge step next to tiny ones)."""
    xs = make_inputs(1, 96, 2, 16, decay, seed=3)
    xs[1][:, ::7] *= 50  # every 7th step 50x stronger: log-decays below -1000 among small ones
    ref, ref_s = wkv6_loop(*xs)
    y, s = wkv6_chunked(*(t.float() for t in xs))
    assert torch.isfinite(y).all() and torch.isfinite(s).all()
    assert (y.double() - ref).abs().max() / ref.abs().max() < 2e-6
    assert (s.double() - ref_s).abs().max() / ref_s.abs().max() < 2e-6


def test_chunk_sizes_and_padding_agree():
    xs = make_inputs(1, 45, 3, 4, seed=5)
    want, want_s = wkv6_loop(*xs)
    for chunk, sub, limit in ((16, 4, None), (32, 8, 0.0), (64, 16, 0.0), (45, 8, 0.0)):  # 45/8: one level
        y, s = wkv6_chunked(*xs, chunk=chunk, sub=sub, limit=limit)
        torch.testing.assert_close(y, want, rtol=1e-11, atol=1e-11)
        torch.testing.assert_close(s, want_s, rtol=1e-11, atol=1e-11)


def test_gradcheck_chunked():
    xs = [t.requires_grad_() for t in make_inputs(1, 11, 1, 3, seed=9)]
    s0 = torch.randn(1, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    for limit in (None, 0.0):
        fn = lambda *a, lim=limit: wkv6_chunked(*a[:5], state=a[5], chunk=8, sub=4, limit=lim)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (*xs, s0))


def test_bf16_inputs_run_in_fp32_and_return_bf16():
    xs = make_inputs(1, 40, 2, 8, dtype=torch.float32, seed=2)
    ref, _ = wkv6_loop(*xs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, s = get_wkv6("torch")(*(t.bfloat16() for t in xs))
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert (y.float() - ref).abs().max() / ref.abs().max() < 0.02  # bf16 inputs, fp32 recurrence


def test_empty_sequence_keeps_state():
    xs = make_inputs(2, 0, 2, 4)
    s0 = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    for fn in (wkv6_loop, wkv6_chunked):
        y, s = fn(*xs, state=s0)
        assert y.shape == (2, 0, 2, 4)
        torch.testing.assert_close(s, s0)


@pytest.mark.gpu
def test_fla_matches_loop_on_cuda():
    pytest.importorskip("fla")
    xs = [t.float().cuda() for t in make_inputs(2, 100, 2, 64, seed=4)]
    s0 = torch.randn(2, 2, 64, 64, device="cuda")
    want, want_s = wkv6_loop(*xs, state=s0)
    y, s = get_wkv6("fla")(*xs, state=s0)
    assert (y - want).abs().max() / want.abs().max() < 1e-3
    assert (s - want_s).abs().max() / want_s.abs().max() < 1e-3
