"""Our fla wrappers against the loops, with fla's Triton kernels run on this CPU by Triton's interpreter.

Opt-in (`make test-fla-cpu`: a side venv with triton and fla-core; Triton is ~1 GB, so the default test venv
leaves it out and these tests skip there). It checks, before any GPU run, what the wrappers decide: the
argument names, the log-decay convention, scale 1, the transposed state in and out, and every gradient.
The interpreter stores bf16 as raw 16-bit integers and computes on them, so only fp32 can be checked here;
bf16 is `tests/gpu`'s job.
"""

import builtins
import importlib.util
import os
import sys

import pytest
import torch

from rwkv_disha.kernels.wkv6 import wkv6_loop
from rwkv_disha.kernels.wkv7 import wkv7_loop

if importlib.util.find_spec("triton") is None or importlib.util.find_spec("fla") is None:
    pytest.skip("needs triton and fla-core: make test-fla-cpu", allow_module_level=True)
if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton was imported before its interpreter could be chosen", allow_module_level=True)
# Triton picks the interpreter when a function is decorated (its own at import, fla's when fla is imported).
os.environ["TRITON_INTERPRET"] = "1"
np = pytest.importorskip("numpy")
tl = pytest.importorskip("triton.language")
autotuner = pytest.importorskip("triton.runtime.autotuner")
interpreter = pytest.importorskip("triton.runtime.interpreter")


def _bench_nothing(self, *args, config=None, **kwargs):
    return [1.0, 1.0, 1.0]  # the autotuner times configs on a GPU driver; any config is exact here


def _value(x) -> int:
    return int(np.asarray(x.handle.data).reshape(-1)[0]) if isinstance(x, tl.tensor) else int(x)


def _tensor_range(*bounds):
    """fla calls `.to()` on its loop counters: tensors when compiled, ints in the interpreter."""
    for i in builtins.range(*(_value(b) for b in bounds)):
        yield interpreter._implicit_cvt(i)


def _import_fla_interpreted():
    autotuner.Autotuner._bench = _bench_nothing
    # fla aliases tl.gather at import, which the interpreter cannot patch; without it fla takes another path.
    gather = tl.__dict__.pop("gather", None)
    try:
        rwkv6 = pytest.importorskip("fla.ops.rwkv6")
        rwkv7 = pytest.importorskip("fla.ops.rwkv7")
    finally:
        if gather is not None:
            tl.gather = gather
    for name, module in list(sys.modules.items()):
        if name.startswith("fla.ops"):
            module.range = _tensor_range
    return rwkv6, rwkv7


_import_fla_interpreted()
from rwkv_disha.kernels.fla import wkv6_fla, wkv7_fla  # noqa: E402


def _rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _run(fn, leaves, gy, gs):
    """Forward, then one backward of a random linear function of y and the final state."""
    y, s = fn(*leaves[:-1], state=leaves[-1])
    ((y.float() * gy).sum() + (s.float() * gs).sum()).backward()
    out = [y.detach().float(), s.detach().float(), *(t.grad.float() for t in leaves)]
    for t in leaves:
        t.grad = None
    return out


def _fp64(loop):
    return lambda *xs, state: loop(*(x.double() for x in xs), state=state.double())


@pytest.mark.slow
@pytest.mark.parametrize("T", [1, 37])
def test_wkv7_fla_equals_the_loop_with_state_and_gradients(T):
    g = torch.Generator().manual_seed(T)
    B, H, N = 2, 2, 64
    r, k, v = (torch.randn(B, T, H, N, generator=g) for _ in range(3))
    log_w = -0.6065 * torch.rand(B, T, H, N, generator=g)  # RWKV-7's decay range, exp(-0.6065) = 0.545
    kk = torch.nn.functional.normalize(torch.randn(B, T, H, N, generator=g), dim=-1)
    a, b = -kk, kk * torch.rand(B, T, H, N, generator=g)
    s0 = 0.3 * torch.randn(B, H, N, N, generator=g)
    leaves = [t.requires_grad_() for t in (r, log_w, k, v, a, b, s0)]
    gy, gs = torch.randn(B, T, H, N, generator=g), torch.randn(B, H, N, N, generator=g)
    want = _run(_fp64(wkv7_loop), leaves, gy, gs)
    got = _run(wkv7_fla, leaves, gy, gs)
    names = ["y", "state", "dr", "dw", "dk", "dv", "da", "db", "dstate0"]
    errors = {n: _rel(x, w) for n, x, w in zip(names, got, want)}
    assert max(errors.values()) < 1e-4, errors


@pytest.mark.slow
def test_wkv6_fla_equals_the_loop_with_state_and_gradients():
    g = torch.Generator().manual_seed(6)
    B, T, H, N = 2, 37, 2, 64
    r, k, v = (torch.randn(B, T, H, N, generator=g) for _ in range(3))
    log_w = -torch.exp(0.3 * torch.randn(B, T, H, N, generator=g) - 0.6)
    u = 0.3 * torch.randn(H, N, generator=g)
    s0 = 0.3 * torch.randn(B, H, N, N, generator=g)
    leaves = [t.requires_grad_() for t in (r, log_w, k, v, u, s0)]
    gy, gs = torch.randn(B, T, H, N, generator=g), torch.randn(B, H, N, N, generator=g)
    want = _run(_fp64(wkv6_loop), leaves, gy, gs)
    got = _run(wkv6_fla, leaves, gy, gs)
    names = ["y", "state", "dr", "dw", "dk", "dv", "du", "dstate0"]
    errors = {n: _rel(x, w) for n, x, w in zip(names, got, want)}
    assert max(errors.values()) < 1e-4, errors
