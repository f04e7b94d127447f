"""wkv7.cu itself, built by g++ and run on this CPU, behind `--op cuda`'s Python wrapper, against the loop.

tests/kernels/test_wkv7_cuda.py checks a torch mirror of the kernel's algorithm; this runs the kernel's own
source: its index arithmetic, shared vectors, barriers, saved-state chunks and bf16 conversions.
`cuda_on_cpu/` holds the two CUDA headers it includes, reduced to what it uses: a thread block runs as
64 threads meeting at `__syncthreads()`, blocks one after another. The launch line `<<<...>>>` is
rewritten as a call, and the torch binding (which refuses CPU tensors) is stood in for by
`_SourceOnCPU`, which allocates what it allocates.
"""

import ctypes
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rwkv_disha.kernels import cuda
from rwkv_disha.kernels.wkv7 import wkv7_loop
from tests.kernels.compare import errors_against_the_loop, rel
from tests.kernels.test_wkv7 import make_inputs

HEADERS = Path(__file__).parent / "cuda_on_cpu"
EXPORTS = """
extern "C" int emu_forward(bool bf16, int B, int T, int H, const void* r, const void* w, const void* k,
                           const void* v, const void* a, const void* b, const float* s0, void* y,
                           float* s_last, float* s_saved, float* sa) {
  return wkv7_cuda_forward(bf16, B, T, H, r, w, k, v, a, b, s0, y, s_last, s_saved, sa, nullptr);
}
extern "C" int emu_backward(bool bf16, int B, int T, int H, const void* r, const void* w, const void* k,
                            const void* v, const void* a, const void* b, const float* sa,
                            const float* s_saved, const void* dy, const float* ds_last, void* dr, void* dw,
                            void* dk, void* dv, void* da, void* db, float* ds0) {
  return wkv7_cuda_backward(bf16, B, T, H, r, w, k, v, a, b, sa, s_saved, dy, ds_last, dr, dw, dk, dv, da,
                            db, ds0, nullptr);
}
extern "C" int emu_chunk(bool bf16) { return wkv7_cuda_chunk(bf16); }
"""


def cpu_source() -> str:
    """wkv7.cu with each `kernel<F><<<grid, block, shmem, stream>>>(` turned into a launch call."""
    src = (cuda.SOURCES / "wkv7.cu").read_text()
    src, n = re.subn(r"(\w+<F>)<<<(.*?)>>>\(", r"::cuda_cpu::launch(\1, \2, ", src, flags=re.S)
    assert n == 2, "wkv7.cu should launch two kernels"
    return src + EXPORTS


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("needs g++")
    out = tmp_path_factory.mktemp("wkv7_cpu")
    (out / "wkv7_cpu.cpp").write_text(cpu_source())
    cmd = [gxx, "-std=c++17", "-O2", "-fPIC", "-shared", "-pthread", "-Wall", "-Wno-unknown-pragmas"]
    cmd += [f"-I{HEADERS}", str(out / "wkv7_cpu.cpp"), "-o", str(out / "wkv7_cpu.so")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "warning" not in done.stderr, done.stderr[-3000:]
    return ctypes.CDLL(str(out / "wkv7_cpu.so"))


def _ptr(x):
    return ctypes.c_void_p(x.data_ptr() if x.numel() else None)


class _SourceOnCPU:
    """wkv7_bind.cpp's forward / backward for CPU tensors: the same checks and allocations, then the
    kernel source built for the CPU."""

    def __init__(self, lib):
        self.lib = lib
        self.calls = []

    def _check(self, r, *xs):
        assert r.dtype in (torch.float32, torch.bfloat16) and r.dim() == 4 and r.shape[3] == 64
        assert r.shape[1] % cuda.T_MULTIPLE == 0
        for x in (r, *xs):
            assert x.is_contiguous() and x.dtype == r.dtype and x.shape == r.shape
        B, T, H, _ = r.shape
        return B, T, H, r.dtype == torch.bfloat16

    def forward(self, r, w, k, v, a, b, s0, save, stream):
        B, T, H, bf16 = self._check(r, w, k, v, a, b)
        assert s0.dtype == torch.float32 and s0.is_contiguous() and s0.shape == (B, H, 64, 64)
        chunk = self.lib.emu_chunk(bf16)
        y, s_last = torch.empty_like(r), torch.empty(B, H, 64, 64)
        s_saved = torch.empty(B, H, T // chunk, 64, 64) if save else torch.empty(0)
        sa = torch.empty(B, T, H, 64) if save else torch.empty(0)
        ptrs = map(_ptr, (r, w, k, v, a, b, s0, y, s_last, s_saved, sa))
        assert self.lib.emu_forward(bf16, B, T, H, *ptrs) == 0
        self.calls.append(("forward", save, chunk))
        return y, s_last, s_saved, sa

    def backward(self, r, w, k, v, a, b, sa, s_saved, dy, ds_last, stream):
        B, T, H, bf16 = self._check(r, w, k, v, a, b, dy)
        chunk = self.lib.emu_chunk(bf16)
        assert sa.dtype == torch.float32 and sa.shape == r.shape
        assert s_saved.shape == (B, H, T // chunk, 64, 64) and ds_last.dtype == torch.float32
        grads = [torch.empty_like(r) for _ in range(6)]
        ds0 = torch.empty(B, H, 64, 64)
        ptrs = map(_ptr, (r, w, k, v, a, b, sa, s_saved, dy, ds_last, *grads, ds0))
        assert self.lib.emu_backward(bf16, B, T, H, *ptrs) == 0
        self.calls.append(("backward", chunk))
        return [*grads, ds0]


@pytest.fixture
def on_cpu(lib, monkeypatch):
    ext = _SourceOnCPU(lib)
    monkeypatch.setattr(cuda, "extension", lambda: ext)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: SimpleNamespace(cuda_stream=0))
    return ext


def _against_the_loop(xs, state, dtype):
    names = ["r", "w", "k", "v", "a", "b"]
    return errors_against_the_loop(cuda.wkv7_cuda, wkv7_loop, xs, state, dtype, names)


@pytest.mark.slow
@pytest.mark.parametrize("T", [16, 37])
@pytest.mark.parametrize("decay", ["fast", "mixed"])
def test_fp32_kernel_source_equals_the_loop(on_cpu, T, decay):
    """fp32 walks chunks of 8; T = 37 is padded to 48 (six chunks, the last one mostly padding)."""
    xs = make_inputs(2, T, 2, 64, decay, dtype=torch.float32, seed=T)
    state = torch.randn(2, 2, 64, 64, generator=torch.Generator().manual_seed(1))
    errors = _against_the_loop(xs, state, torch.float32)
    assert max(errors.values()) < 5e-5, errors
    assert on_cpu.calls == [("forward", True, 8), ("backward", 8)]


@pytest.mark.slow
def test_bf16_kernel_source_equals_the_loop_on_the_rounded_inputs(on_cpu):
    """bf16 inputs stay bf16 (chunks of 16); y and the gradients come back rounded to bf16."""
    xs = make_inputs(2, 40, 2, 64, "mixed", dtype=torch.float32, seed=3)
    state = torch.randn(2, 2, 64, 64, generator=torch.Generator().manual_seed(2))
    errors = _against_the_loop(xs, state, torch.bfloat16)
    assert max(errors.values()) < 1e-2, errors
    assert on_cpu.calls == [("forward", True, 16), ("backward", 16)]


def test_inference_saves_nothing_and_gives_the_same_output(on_cpu):
    xs = make_inputs(1, 16, 2, 64, dtype=torch.float32, seed=7)
    with torch.no_grad():
        y, s = cuda.wkv7_cuda(*xs)
    y_ref, s_ref = wkv7_loop(*(x.double() for x in xs))
    assert rel(y, y_ref) < 1e-5 and rel(s, s_ref) < 1e-5
    assert on_cpu.calls == [("forward", False, 8)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_custom_op_agrees_with_its_fake_and_autograd_registrations(on_cpu, dtype):
    """torch's check of the op --compile 1 traces: the fake outputs (the saved states' chunk count by dtype)
    against what the kernel source allocates, the autograd registration, aot_autograd tracing."""
    xs = [x.to(dtype).requires_grad_() for x in make_inputs(1, 16, 1, 64, dtype=torch.float32, seed=2)]
    s0 = torch.randn(1, 1, 64, 64, requires_grad=True)
    result = torch.library.opcheck(cuda._wkv7, (*xs, s0, True))
    assert set(result.values()) == {"SUCCESS"}, result


def test_the_wrapper_compiles_into_one_graph_and_equals_eager(on_cpu):
    """fullgraph=True traces the wrapper (padding, casts) and the kernel's op without a break."""
    torch._dynamo.reset()
    compiled = torch.compile(cuda.wkv7_cuda, backend="aot_eager", fullgraph=True)
    results = []
    for f in (cuda.wkv7_cuda, compiled):
        xs = [x.requires_grad_() for x in make_inputs(1, 20, 2, 64, dtype=torch.float32, seed=5)]
        y, s = f(*xs)
        (y.square().sum() + s.sum()).backward()
        results.append([y, s, *(x.grad for x in xs)])
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)
