"""`--op cuda` (our CUDA kernel, built at first use) against the reference loop on a GPU: forward, final
state, every input gradient and the initial state's; bf16; odd T; the state guard; a training run."""

import pytest
import torch

from rwkv_disha.kernels import cuda
from rwkv_disha.kernels.wkv7 import wkv7_loop
from rwkv_disha.train.modes import check_state_gradients
from tests.gpu.test_gpu import _train, inputs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(cuda.missing() is not None, reason=f"--op cuda needs {cuda.missing()}"),
]


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _run(fn, xs, s0, dtype):
    leaves = [x.to(dtype).requires_grad_() for x in xs]
    state = None if s0 is None else s0.clone().requires_grad_()
    y, sT = fn(*leaves, state=state)
    gy = torch.cos(torch.arange(y.numel(), device=y.device, dtype=torch.float32)).view_as(y)
    gs = torch.sin(torch.arange(sT.numel(), device=y.device, dtype=torch.float32)).view_as(sT)
    torch.autograd.backward([y.float(), sT.float()], [gy, gs])
    grads = [x.grad for x in leaves] + ([state.grad] if state is not None else [])
    return y.detach(), sT.detach(), grads


@pytest.mark.parametrize("T", [1, 16, 37, 512])
@pytest.mark.parametrize("with_state", [False, True])
def test_cuda_kernel_equals_loop_fp32(T, with_state):
    xs = inputs(2, T, 3, 64, seed=T)
    s0 = torch.randn(2, 3, 64, 64, device="cuda") * 0.5 if with_state else None
    s0_64 = None if s0 is None else s0.double()
    y0, s0_, g0 = _run(wkv7_loop, [x.double() for x in xs], s0_64, torch.float64)
    y1, s1, g1 = _run(cuda.wkv7_cuda, xs, s0, torch.float32)
    assert y1.dtype == torch.float32 and s1.shape == (2, 3, 64, 64)
    assert rel(y1, y0) < 1e-4 and rel(s1, s0_) < 1e-4
    for name, a, b in zip(["r", "w", "k", "v", "a", "b", "state"], g1, g0):
        assert rel(a, b) < 2e-4, name


def test_cuda_kernel_bf16_inputs_stay_bf16_and_match_fp32():
    xs = inputs(2, 200, 4, 64, seed=3)
    y0, s0, g0 = _run(wkv7_loop, xs, None, torch.float32)
    y1, s1, g1 = _run(cuda.wkv7_cuda, xs, None, torch.bfloat16)
    assert y1.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in g1)
    assert rel(y1, y0) < 3e-2 and rel(s1, s0) < 3e-2
    for name, a, b in zip("rwkvab", g1, g0):
        assert rel(a, b) < 6e-2, name


def test_cuda_kernel_passes_the_state_gradient_guard():
    check_state_gradients("cuda", torch.device("cuda"))


def test_train_with_op_cuda_matches_op_torch(tmp_path, make_checkpoint):
    base = make_checkpoint(2, 128, 512, style="pretrain", seed=2)
    a = _train(tmp_path / "cuda", base, None, "--precision", "fp32", "--op", "cuda")
    b = _train(tmp_path / "torch", base, None, "--precision", "fp32", "--op", "torch")
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-3 * max(b)


def test_cuda_kernel_without_grad_skips_the_saved_states_and_gives_the_same_output():
    xs = inputs(2, 64, 3, 64, seed=5)
    s0 = torch.randn(2, 3, 64, 64, device="cuda")
    with torch.no_grad():
        y0, st0 = cuda.wkv7_cuda(*xs, state=s0)
    y1, st1 = cuda.wkv7_cuda(*[x.clone().requires_grad_() for x in xs], state=s0)
    assert torch.equal(y0, y1.detach()) and torch.equal(st0, st1.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_custom_op_agrees_with_its_fake_and_autograd_registrations(dtype):
    """What --compile 1 traces: the fake outputs against the real kernel's, autograd, aot_autograd."""
    xs = [x.to(dtype).requires_grad_() for x in inputs(1, 32, 2, 64, seed=8)]
    s0 = torch.randn(1, 2, 64, 64, device="cuda", requires_grad=True)
    result = torch.library.opcheck(cuda._wkv7, (*xs, s0, True))
    assert set(result.values()) == {"SUCCESS"}, result


def test_the_kernel_compiles_into_one_graph_and_equals_eager():
    torch._dynamo.reset()
    compiled = torch.compile(cuda.wkv7_cuda, backend="aot_eager", fullgraph=True)
    xs, s0 = inputs(2, 37, 2, 64, seed=9), torch.randn(2, 2, 64, 64, device="cuda")
    eager, traced = _run(cuda.wkv7_cuda, xs, s0, torch.float32), _run(compiled, xs, s0, torch.float32)
    for a, b in zip([*eager[:2], *eager[2]], [*traced[:2], *traced[2]]):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)
