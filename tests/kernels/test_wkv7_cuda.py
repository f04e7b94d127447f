"""`--op cuda` on a machine without a GPU: the kernel's algorithm, its build, and the registry's errors.

The GPU comparison against the reference loop is tests/gpu/test_gpu_cuda_kernel.py. Here:
- ``walk`` mirrors wkv7.cu step by step (forward saving S every chunk steps and sa every step; backward
  reloading S at chunk ends and stepping back by division, dS kept per column and per row), vectorised
  over batch, head and the thread index; its gradients must equal autograd through the reference loop.
- wkv7.cu compiles for sm_90 with nvcc, the binding compiles against this torch, and the module refuses
  CPU tensors with its message.
"""

import re
import shutil
import subprocess

import pytest
import torch

from rwkv_disha.errors import RWKVDishaError
from rwkv_disha.kernels import check_op_fits, cuda, get_wkv6, get_wkv7, resolve_op
from rwkv_disha.kernels.wkv7 import wkv7_loop
from tests.kernels.test_wkv7 import make_inputs


def walk(r, w, k, v, a, b, s0, dy, ds_last, chunk):
    """wkv7.cu's forward + backward in torch: (B, T, H, N) inputs, T % chunk == 0 -> y, s_T, grads."""
    B, T, H, N = r.shape
    d = torch.exp(w)
    S = s0.clone()  # (B, H, N, N): (value i, key j)
    saved, sas, ys = [], [], []
    for t in range(T):
        sa = torch.einsum("bhij,bhj->bhi", S, a[:, t])
        S = S * d[:, t, :, None, :] + sa[..., :, None] * b[:, t, :, None, :]
        S = S + v[:, t, :, :, None] * k[:, t, :, None, :]
        ys.append(torch.einsum("bhij,bhj->bhi", S, r[:, t]))
        sas.append(sa)
        if (t + 1) % chunk == 0:
            saved.append(S.clone())
    y, s_last = torch.stack(ys, 1), S

    ds_col = ds_last.clone()  # the kernel's per-column copy: thread j holds ds_col[..., :, j]
    ds_row = ds_last.clone()  # its per-row copy: thread i holds ds_row[..., i, :]
    grads = {n: torch.zeros_like(r) for n in "rwkvab"}
    for t in range(T - 1, -1, -1):
        if (t + 1) % chunk == 0:
            S = saved[t // chunk].clone()
        rt, dt, kt, vt, at, bt, sa, dyt = (x[:, t] for x in (r, d, k, v, a, b, torch.stack(sas, 1), dy))
        grads["r"][:, t] = torch.einsum("bhij,bhi->bhj", S, dyt)
        ds_col = ds_col + dyt[..., :, None] * rt[..., None, :]
        S = (S - sa[..., :, None] * bt[..., None, :] - vt[..., :, None] * kt[..., None, :]) / dt[..., None, :]
        grads["w"][:, t] = (ds_col * S).sum(-2) * dt
        grads["k"][:, t] = torch.einsum("bhij,bhi->bhj", ds_col, vt)
        grads["b"][:, t] = torch.einsum("bhij,bhi->bhj", ds_col, sa)
        ds_row = ds_row + dyt[..., :, None] * rt[..., None, :]
        grads["v"][:, t] = torch.einsum("bhij,bhj->bhi", ds_row, kt)
        dsa = torch.einsum("bhij,bhj->bhi", ds_row, bt)
        grads["a"][:, t] = torch.einsum("bhi,bhij->bhj", dsa, S)
        ds_col = ds_col * dt[..., None, :] + dsa[..., :, None] * at[..., None, :]
        ds_row = ds_row * dt[..., None, :] + dsa[..., :, None] * at[..., None, :]
    assert torch.equal(ds_col, ds_row)  # the two copies are the same matrix
    return y, s_last, [grads[n] for n in "rwkvab"], ds_row


@pytest.mark.parametrize(
    "dtype, chunk, tol",
    # fp32 inputs walk chunks of 8 (wkv7.cu), bf16 of 16; fp64 checks the algebra itself
    [(torch.float64, 16, 1e-9), (torch.float32, 8, 2e-5)],
)
@pytest.mark.parametrize("decay", ["fast", "mixed"])
def test_kernel_walk_equals_autograd_through_the_loop(dtype, chunk, tol, decay):
    B, T, H, N = 2, 48, 2, 16
    xs = [x.to(dtype).requires_grad_() for x in make_inputs(B, T, H, N, decay, seed=5)]
    s0 = torch.randn(B, H, N, N, dtype=dtype, requires_grad=True)
    g = torch.Generator().manual_seed(1)
    dy = torch.randn(B, T, H, N, generator=g).to(dtype)
    ds_last = torch.randn(B, H, N, N, generator=g).to(dtype)

    y, sT = wkv7_loop(*xs, state=s0)
    torch.autograd.backward([y, sT], [dy, ds_last])
    y2, sT2, grads, ds0 = walk(*(x.detach() for x in xs), s0.detach(), dy, ds_last, chunk=chunk)

    rel = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()  # noqa: E731
    assert rel(y2, y.detach()) < tol and rel(sT2, sT.detach()) < tol
    for name, got, x in zip("rwkvab", grads, xs):
        assert rel(got, x.grad) < tol, name
    assert rel(ds0, s0.grad) < tol


def test_padding_to_a_chunk_multiple_is_exact():
    """wkv7_cuda pads T up to CHUNK with w = k = v = a = b = 0: the state and y over the real steps are
    unchanged (the loop stands in for the kernel here)."""
    xs = make_inputs(1, 21, 2, 8, seed=2)
    pad = (-21) % cuda.T_MULTIPLE
    padded = [torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)) for x in xs]
    y, s = wkv7_loop(*xs)
    y_p, s_p = wkv7_loop(*padded)
    assert torch.equal(y_p[:, :21], y) and torch.equal(s_p, s)


def test_head_size_other_than_64_is_refused_before_any_gpu_work():
    xs = make_inputs(1, 16, 2, 32, dtype=torch.float32)
    with pytest.raises(ValueError, match="--op cuda runs head size 64 only, got 32"):
        cuda.wkv7_cuda(*xs)


def test_model_heads_other_than_64_are_refused_up_front(monkeypatch):
    monkeypatch.setattr(cuda, "missing", lambda: None)  # as on a GPU machine with nvcc,
    monkeypatch.setattr(cuda, "extension", lambda: None)  # where the kernel is built
    msg = "--op cuda runs RWKV-7 heads of size 64 only; this model's are 32"
    with pytest.raises(RWKVDishaError, match=msg):
        check_op_fits("cuda", "x070", 32)
    check_op_fits("cuda", "x070", 64)
    check_op_fits("cuda", "x060", 32)  # cuda is fla for RWKV-6
    check_op_fits("torch", "x070", 32)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_op_cuda_without_a_gpu_names_what_runs():
    with pytest.raises(RWKVDishaError, match="--op cuda needs a CUDA GPU; available here: torch, loop"):
        resolve_op("cuda")
    with pytest.raises(RWKVDishaError, match="--op cuda needs a CUDA GPU"):
        get_wkv7("cuda")
    with pytest.raises(RWKVDishaError, match="--op cuda needs a CUDA GPU"):
        get_wkv6("cuda")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """wkv7.cu through nvcc (sm_90, as on an H100/H200) + the binding through cpp_extension, linked here
    without a GPU; skipped where nvcc or ninja is missing."""
    from torch.utils.cpp_extension import CUDA_HOME, is_ninja_available, load

    nvcc = shutil.which("nvcc") or (CUDA_HOME and shutil.which(f"{CUDA_HOME}/bin/nvcc"))
    if not nvcc or not is_ninja_available():
        pytest.skip("needs nvcc and ninja")
    out = tmp_path_factory.mktemp("wkv7_build")
    obj = out / "wkv7.o"
    cmd = [nvcc, "-c", *cuda.CUDA_FLAGS, "-Xcompiler", "-fPIC", "-gencode", "arch=compute_90,code=sm_90"]
    cmd += [str(cuda.SOURCES / "wkv7.cu"), "-o", str(obj)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    # where nvcc's own toolkit keeps libcudart (nvcc may be a wrapper script): its dry run says
    dry = subprocess.run([nvcc, "--dryrun", "-c", "x.cu"], capture_output=True, text=True).stderr
    lib_dirs = re.findall(r'"-L([^"]+)"', next((ln for ln in dry.splitlines() if "LIBRARIES=" in ln), ""))
    return load(
        name="rwkv_disha_wkv7_build_check",
        sources=[str(cuda.SOURCES / "wkv7_bind.cpp")],
        extra_ldflags=[str(obj), *(f"-L{d}" for d in lib_dirs if not d.endswith("stubs")), "-lcudart"],
        with_cuda=False,
        build_directory=str(out),
    )


@pytest.mark.slow
def test_kernel_and_binding_build_and_check_their_inputs(built):
    x = torch.zeros(1, 16, 1, 64)
    s = torch.zeros(1, 1, 64, 64)
    with pytest.raises(RuntimeError, match="wkv7 cuda: r must be a CUDA tensor"):
        built.forward(x, x, x, x, x, x, s, True, 0)
    with pytest.raises(RuntimeError, match="wkv7 cuda: r must be a CUDA tensor"):
        built.backward(x, x, x, x, x, x, x, torch.zeros(1, 1, 1, 64, 64), x, s, 0)


class _MirrorExtension:
    """Stands in for the compiled module: forward by the loop, backward by ``walk`` (chunks of 8, as the
    kernel takes for fp32). It hands the start state through as its "saved states" to get it back."""

    def forward(self, r, w, k, v, a, b, s0, save, stream):
        assert all(x.is_contiguous() for x in (r, w, k, v, a, b, s0)) and r.shape[1] % 16 == 0
        assert len({x.dtype for x in (r, w, k, v, a, b)}) == 1 and s0.dtype == torch.float32
        y, s = wkv7_loop(r, w, k, v, a, b, state=s0)
        return y.to(r.dtype), s, s0.clone(), torch.zeros(1)

    def backward(self, r, w, k, v, a, b, sa, s0, dy, ds_last, stream):
        assert dy.dtype == r.dtype and dy.is_contiguous() and ds_last.dtype == torch.float32
        f = torch.Tensor.double
        _, _, grads, ds0 = walk(*map(f, (r, w, k, v, a, b)), f(s0), f(dy), f(ds_last), chunk=8)
        return [g.to(r.dtype) for g in grads] + [ds0.float()]


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_wrapper_pads_casts_and_gives_the_loops_gradients(monkeypatch, dtype, tol):
    """wkv7_cuda's Python side on a CPU: T = 21 padded to 32, the dtypes in and out, an expanded (non-
    contiguous) start state, the autograd Function with both outputs used, and with y alone (a None
    state gradient), against autograd through the fp64 loop."""
    from types import SimpleNamespace

    monkeypatch.setattr(cuda, "extension", lambda: _MirrorExtension())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: SimpleNamespace(cuda_stream=0))
    xs = [x.to(dtype) for x in make_inputs(2, 21, 2, 64, dtype=torch.float32, seed=4)]
    st = torch.randn(1, 2, 64, 64).expand(2, 2, 64, 64)
    leaves = [x.clone().requires_grad_() for x in xs]
    s0 = st.clone().requires_grad_()
    y, s = cuda.wkv7_cuda(*leaves, state=s0)
    assert y.dtype == dtype and y.shape == (2, 21, 2, 64) and s.dtype == torch.float32
    (y.float().square().sum() + s.sum()).backward()
    ref = [x.double().requires_grad_() for x in xs]
    ref_s0 = st.double().requires_grad_()
    y2, s2 = wkv7_loop(*ref, state=ref_s0)
    (y2.square().sum() + s2.sum()).backward()
    for name, got, want in zip(["r", "w", "k", "v", "a", "b", "state"], [*leaves, s0], [*ref, ref_s0]):
        assert got.grad.dtype == got.dtype
        assert ((got.grad.double() - want.grad).abs().max() / want.grad.abs().max()) < tol, name
    y_only = cuda.wkv7_cuda(*[x.clone().requires_grad_() for x in xs])[0]
    y_only.float().sum().backward()  # the final state unused: its gradient arrives as None
