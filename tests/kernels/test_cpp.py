"""`--op cpp` (kernels/cpp, built by cpp_extension at first use) against the reference loops, RWKV-7 and
RWKV-6: output, final state, every input gradient and the initial state's, at head size 64 (the compiled
constant) and 16 (the runtime path), partial chunks, bf16 inputs; the registry's checks; training,
generate and eval runs."""

import csv
import json

import pytest
import torch

from rwkv_disha.cli import main
from rwkv_disha.errors import RWKVDishaError
from rwkv_disha.kernels import (
    available_ops,
    check_op_device,
    check_op_fits,
    cpp,
    get_wkv6,
    get_wkv7,
    resolve_op,
)
from rwkv_disha.kernels.compiled import build_extension
from rwkv_disha.kernels.wkv6 import wkv6_loop
from rwkv_disha.kernels.wkv7 import wkv7_loop
from tests.kernels.compare import errors_against_the_loop, rel
from tests.kernels.test_wkv6 import make_inputs as make_inputs6
from tests.kernels.test_wkv7 import make_inputs

needs_build = pytest.mark.skipif(cpp.missing() is not None, reason=f"--op cpp needs {cpp.missing()}")


RWKV7 = ["r", "w", "k", "v", "a", "b"]
RWKV6 = ["r", "w", "k", "v", "u"]


def _against_the_loop(xs, state, dtype, use_y=True, use_state=True):
    return errors_against_the_loop(cpp.wkv7_cpp, wkv7_loop, xs, state, dtype, RWKV7, use_y, use_state)


KERNELS = {  # make_inputs (without the start state), kernel, loop, input names
    "wkv7": (make_inputs, cpp.wkv7_cpp, wkv7_loop, RWKV7),
    "wkv6": (make_inputs6, cpp.wkv6_cpp, wkv6_loop, RWKV6),
}


@needs_build
@pytest.mark.parametrize("kernel", ["wkv7", "wkv6"])
@pytest.mark.parametrize("T", [1, 16, 37])
@pytest.mark.parametrize("N", [64, 16])
@pytest.mark.parametrize("decay", ["fast", "mixed", "slow"])
def test_cpp_kernel_equals_the_loop(kernel, T, N, decay):
    """T = 37 ends in a partial chunk of 5 (chunks of 16); N = 16 takes the runtime head-size path.
    RWKV-6's "fast" decays reach ~1e-9 per step: the step-by-step walk needs no log-space care."""
    make, fn, loop, names = KERNELS[kernel]
    xs = make(2, T, 3, N, decay, dtype=torch.float32, seed=T + N)
    state = torch.randn(2, 3, N, N, generator=torch.Generator().manual_seed(1))
    errors = errors_against_the_loop(fn, loop, xs, state, torch.float32, names)
    assert max(errors.values()) < 1e-5, errors


@needs_build
def test_cpp_kernel_without_a_start_state_and_with_one_output_used():
    xs = make_inputs(1, 20, 2, 64, dtype=torch.float32, seed=9)
    for use_y, use_state in ((True, False), (False, True)):  # the other output's gradient arrives as None
        errors = _against_the_loop(xs, None, torch.float32, use_y=use_y, use_state=use_state)
        grads = {k: v for k, v in errors.items() if k.startswith("d")}
        assert max(grads.values()) < 1e-5, (use_y, use_state, errors)


@needs_build
def test_cpp_kernel_takes_bf16_and_returns_bf16():
    xs = make_inputs(2, 40, 2, 64, dtype=torch.float32, seed=3)
    state = torch.randn(2, 2, 64, 64, generator=torch.Generator().manual_seed(2))
    errors = _against_the_loop(xs, state, torch.bfloat16)
    assert max(errors.values()) < 1e-2, errors  # bf16 rounding of y and the gradients (~4e-3)


@needs_build
def test_inference_keeps_no_chunk_states():
    xs = [x.contiguous() for x in make_inputs(1, 40, 2, 64, dtype=torch.float32, seed=4)]
    s0 = torch.zeros(1, 2, 64, 64)
    _, _, starts, sa = cpp.extension().wkv7_forward([xs[0], xs[1].exp(), *xs[2:]], s0, False)
    assert starts.numel() == 0 and sa.numel() == 0
    _, _, starts, sa = cpp.extension().wkv7_forward([xs[0], xs[1].exp(), *xs[2:]], s0, True)
    assert starts.shape == (1, 2, 3, 64, 64)  # ceil(40 / 16) chunk starts
    with torch.no_grad():
        y, s = cpp.wkv7_cpp(*xs)
    y_ref, s_ref = wkv7_loop(*(x.double() for x in xs))
    assert rel(y, y_ref) < 1e-5 and rel(s, s_ref) < 1e-5


@needs_build
def test_the_binding_refuses_wrong_inputs():
    x = torch.zeros(1, 16, 1, 64)
    s = torch.zeros(1, 1, 64, 64)
    with pytest.raises(RuntimeError, match="wkv7 cpp: b must be a contiguous fp32 CPU tensor"):
        cpp.extension().wkv7_forward([x, x, x, x, x, x.double()], s, True)
    with pytest.raises(RuntimeError, match="wkv7 cpp: the state has shape"):
        cpp.extension().wkv7_forward([x] * 6, torch.zeros(1, 1, 64, 32), True)
    with pytest.raises(RuntimeError, match="wkv7 cpp: the saved states has shape"):
        cpp.extension().wkv7_backward([x] * 6, torch.zeros(1, 1, 2, 64, 64), x, x, s)


@needs_build
@pytest.mark.parametrize("kernel", ["wkv7", "wkv6"])
def test_the_callers_state_is_never_written_and_the_returned_one_is_its_own(kernel):
    """At head size 1 the transposed start state is already contiguous: the kernel once walked the caller's
    tensor itself (a tuned time_state changed under its owner's feet)."""
    make, fn = (make_inputs, cpp.wkv7_cpp) if kernel == "wkv7" else (make_inputs6, cpp.wkv6_cpp)
    for N in (1, 64):
        xs = make(1, 6, 2, N, dtype=torch.float32, seed=0)
        tuned = torch.nn.Parameter(torch.ones(2, N, N))
        y, s = fn(*xs, state=tuned.expand(1, 2, N, N))
        assert torch.equal(tuned.detach(), torch.ones(2, N, N)), N
        assert s.is_contiguous() and s.data_ptr() != tuned.data_ptr()
        s.detach().add_(1)  # the caller may change the returned state in place


@needs_build
def test_no_grad_keeps_nothing_even_for_inputs_that_require_grad(monkeypatch):
    """Under torch.no_grad() autograd still reports needs_input_grad for such inputs; the wrapper asks
    grad mode itself, so inference never allocates the chunk states and sa."""
    ext, saves = cpp.extension(), []

    class Spy:
        def wkv7_forward(self, xs, s0, save):
            saves.append(save)
            return ext.wkv7_forward(xs, s0, save)

    monkeypatch.setattr(cpp, "extension", lambda: Spy())
    xs = [x.requires_grad_() for x in make_inputs(1, 20, 2, 64, dtype=torch.float32, seed=1)]
    with torch.no_grad():
        cpp.wkv7_cpp(*xs)
    cpp.wkv7_cpp(*xs)
    assert saves == [False, True]


def test_cpp_on_another_device_is_refused():
    xs = [torch.zeros(1, 4, 1, 64, device="meta") for _ in range(6)]
    with pytest.raises(ValueError, match="--op cpp runs on CPU tensors, got meta; on a GPU use --op fla"):
        cpp.wkv7_cpp(*xs)
    with pytest.raises(RWKVDishaError, match="--op cpp runs on CPU tensors only: use --device cpu"):
        check_op_device("cpp", True, "add --device cuda", "use --device cpu")  # as bench words it


@needs_build
def test_registry_knows_cpp():
    assert "cpp" in available_ops() and resolve_op("cpp") == "cpp"
    assert get_wkv7("cpp") is cpp.wkv7_cpp and get_wkv6("cpp") is cpp.wkv6_cpp
    for version in ("x070", "x060", "x052"):
        check_op_fits("cpp", version, 16)  # any version, any head size


def test_without_build_tools_cpp_names_what_is_missing(monkeypatch):
    monkeypatch.setattr(cpp, "missing", lambda: "a C++ compiler (c++: install g++ or clang)")
    msg = r"--op cpp needs a C\+\+ compiler .*; available here: torch, loop"
    with pytest.raises(RWKVDishaError, match=msg):
        resolve_op("cpp")


def test_a_failed_build_is_one_line_naming_what_still_runs(monkeypatch, tmp_path):
    import torch.utils.cpp_extension as ext

    def fail(**kwargs):
        raise RuntimeError("ninja: build stopped\nError building extension 'x'")

    monkeypatch.setattr(ext, "load", fail)
    monkeypatch.setattr(ext, "_get_build_directory", lambda name, verbose: str(tmp_path))
    msg = r"--op cpp: building the CPU kernel failed \(Error building extension 'x'\); use --op torch"
    with pytest.raises(RWKVDishaError, match=msg):
        build_extension("cpp", "CPU", "torch", "x", [tmp_path / "x.cpp"])


def test_the_first_build_says_so_and_a_cached_one_is_silent(monkeypatch, tmp_path, capsys):
    """The first build is half a minute without output: one line says why; loading the cached build
    prints nothing."""
    import torch.utils.cpp_extension as ext

    monkeypatch.setattr(ext, "load", lambda **kwargs: "module")
    monkeypatch.setattr(ext, "_get_build_directory", lambda name, verbose: str(tmp_path))
    assert build_extension("cpp", "CPU", "torch", "x", [tmp_path / "x.cpp"]) == "module"
    assert capsys.readouterr().err == "--op cpp: building the CPU kernel (first use only, 30-60 s)\n"
    (tmp_path / "x.so").write_bytes(b"")
    build_extension("cpp", "CPU", "torch", "x", [tmp_path / "x.cpp"])
    assert capsys.readouterr().err == ""


def _train(proj, base, op, *extra):
    argv = ["train", "--load_model", str(base), "--proj_dir", str(proj), "--data_type", "dummy",
            "--ctx_len", "40", "--micro_bsz", "2", "--epoch_steps", "6", "--epoch_count", "1",
            "--lr_init", "1e-2", "--lr_final", "1e-2", "--accelerator", "cpu", "--precision", "fp32",
            "--progress_bar", "0", "--random_seed", "1", "--op", op,
            "--disha_config", '{"mode":"bone","load":"","r":16}', *extra]  # fmt: skip
    assert main(argv) == 0
    return [float(r["loss"]) for r in csv.DictReader((proj / "metrics.csv").read_text().splitlines())]


@needs_build
def test_train_with_op_cpp_matches_op_torch(tmp_path, make_checkpoint):
    base = make_checkpoint(2, 128, 256, style="pretrain", seed=2)
    a = _train(tmp_path / "cpp", base, "cpp")
    b = _train(tmp_path / "torch", base, "torch")
    assert len(a) == len(b) == 6 and a[0] == pytest.approx(b[0], rel=1e-5)
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4 * max(b)


@needs_build
@pytest.mark.parametrize(
    "extra", [["--grad_cp", "1"], ["--train_type", "infctx", "--chunk_ctx", "16"]], ids=["grad_cp", "infctx"]
)
def test_grad_cp_and_infctx_with_op_cpp_match_op_torch(tmp_path, make_checkpoint, extra):
    """grad_cp runs each block's forward again in the backward; infctx carries the state across chunks
    and backpropagates into it."""
    base = make_checkpoint(2, 128, 256, style="pretrain", seed=2)
    a = _train(tmp_path / "cpp", base, "cpp", *extra)
    b = _train(tmp_path / "torch", base, "torch", *extra)
    assert len(a) == len(b) == 6 and max(abs(x - y) for x, y in zip(a, b)) < 1e-4 * max(b)


@needs_build
@pytest.mark.parametrize("kernel", ["wkv7", "wkv6"])
@pytest.mark.parametrize("save", [True, False])
def test_the_custom_ops_agree_with_their_fake_and_autograd_registrations(kernel, save):
    """torch's own check of a custom op: its schema, its fake (meta) outputs against the real ones,
    the autograd registration, and tracing under aot_autograd with dynamic shapes."""
    make, op = (make_inputs, cpp._wkv7) if kernel == "wkv7" else (make_inputs6, cpp._wkv6)
    xs = [x.requires_grad_(save) for x in make(1, 19, 2, 16, dtype=torch.float32, seed=4)]
    s0 = torch.randn(1, 2, 16, 16, requires_grad=save)
    result = torch.library.opcheck(op, (*xs, s0, save))
    assert set(result.values()) == {"SUCCESS"}, result


@needs_build
@pytest.mark.parametrize("kernel", ["wkv7", "wkv6"])
def test_the_kernel_compiles_into_one_graph_and_equals_eager(kernel):
    """fullgraph=True: torch.compile traces through the kernel (no graph break), and the compiled
    function's output, state and every gradient equal eager's."""
    make, fn = (make_inputs, cpp.wkv7_cpp) if kernel == "wkv7" else (make_inputs6, cpp.wkv6_cpp)
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    results = []
    for f in (fn, compiled):
        xs = [x.requires_grad_() for x in make(2, 21, 2, 32, dtype=torch.float32, seed=6)]
        s0 = torch.randn(2, 2, 32, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
        y, s = f(*xs, state=s0)
        (y.square().sum() + s.sin().sum()).backward()
        results.append([y, s, *(x.grad for x in xs), s0.grad])
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)


@needs_build
def test_compiled_blocks_around_the_cpp_kernel_equal_eager(make_checkpoint):
    """--compile 1 --op cpp: the blocks' graphs take the kernel in; values and every gradient stay eager's."""
    from rwkv_disha.model.load import load_model
    from tests.bench.test_speed_paths import _compiled_equals_eager

    torch._dynamo.reset()
    _compiled_equals_eager(load_model(make_checkpoint(2, 64, 200), op="cpp").train(), "aot_eager")


@needs_build
@pytest.mark.parametrize("version", ["x070", "x060"])
def test_compiled_blocks_take_the_kernel_in_without_a_graph_break(version):
    """Two graphs for any depth (block 0, and the blocks after it), as with the torch kernel: the custom op
    breaks no graph (RWKV-6's chunked torch kernel does, at an .item())."""
    from tests.bench.test_speed_paths import _compiled_graphs

    assert _compiled_graphs(version, 3, "cpp") == _compiled_graphs(version, 5, "cpp") == 2


@needs_build
def test_cpp_kernel_passes_the_state_gradient_guard():
    """State tuning and infctx check a kernel's initial-state gradient before training: cpp passes."""
    from rwkv_disha.train.modes import check_state_gradients

    check_state_gradients("cpp", torch.device("cpu"))


@needs_build
def test_generate_and_eval_with_op_cpp_equal_op_torch(tmp_path, make_checkpoint, capsys):
    """Inference walks the state token by token (T = 1 per call after the prompt) and keeps nothing."""
    base = make_checkpoint(2, 64, 65536, style="pretrain", seed=4)
    outputs = []
    for op in ("torch", "cpp"):
        capsys.readouterr()
        gen = ["generate", "--load_model", str(base), "--prompt", "Hello", "--max_tokens", "12"]
        assert main([*gen, "--temperature", "0", "--op", op]) == 0
        ev = ["eval", "--load_model", str(base), "--data_type", "dummy", "--ctx_len", "24"]
        assert main([*ev, "--max_samples", "2", "--json", str(tmp_path / f"{op}.json"), "--op", op]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0].count("\n") >= 2 and outputs[0] == outputs[1]  # the sampled text and eval's report
    reports = [json.loads((tmp_path / f"{op}.json").read_text()) for op in ("torch", "cpp")]
    assert reports[0]["loss"] == pytest.approx(reports[1]["loss"], rel=1e-5)


# --- RWKV-6 / 5.2


def _wkv6_against_the_loop(xs, state, dtype):
    return errors_against_the_loop(cpp.wkv6_cpp, wkv6_loop, xs, state, dtype, RWKV6)


@needs_build
def test_wkv6_cpp_kernel_takes_bf16():
    xs = make_inputs6(2, 40, 2, 64, dtype=torch.float32, seed=5)
    state = torch.randn(2, 2, 64, 64, generator=torch.Generator().manual_seed(4))
    errors = _wkv6_against_the_loop(xs, state, torch.bfloat16)
    assert max(errors.values()) < 1e-2, errors


@needs_build
def test_wkv6_binding_refuses_a_wrong_u():
    x = torch.zeros(1, 16, 2, 64)
    with pytest.raises(RuntimeError, match=r"wkv6 cpp: u has shape \[64\], expected \[2, 64\]"):
        cpp.extension().wkv6_forward([x] * 4, torch.zeros(64), torch.zeros(1, 2, 64, 64), True)


@needs_build
@pytest.mark.parametrize("version", ["x060", "x052"])
def test_train_rwkv6_and_5_with_op_cpp_matches_op_torch(tmp_path, version):
    base = tmp_path / "base.pth"
    init = ["init", "--version", version, "--output", str(base), "--n_layer", "2", "--n_embd", "64"]
    assert main([*init, "--head_size", "32", "--vocab_size", "256", "--style", "pretrain"]) == 0
    a = _train(tmp_path / "cpp", base, "cpp")
    b = _train(tmp_path / "torch", base, "torch")
    assert len(a) == len(b) == 6 and a[0] == pytest.approx(b[0], rel=1e-5)
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4 * max(b)


@needs_build
@pytest.mark.parametrize("version", ["x070", "x060"])
def test_a_model_on_op_cpp_pickles_and_copies(version):
    """The attention module leaves its kernel out of a pickle and looks it up again on load."""
    import copy
    import pickle

    from rwkv_disha.model.init import make_config
    from rwkv_disha.model.load import build_model

    model = build_model(make_config(1, 64, 64, 32, version), op="cpp", device="cpu")
    idx = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(0))
    for other in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert other.blocks[0].att.op == "cpp" and torch.equal(other(idx), model(idx))


def test_importing_the_kernels_does_not_import_dynamo():
    """Registering the custom ops imports no dynamo (nor Triton where installed): `import
    rwkv_disha.kernels` stays light, and make test-fla-cpu can still switch Triton to its interpreter
    after importing us."""
    import subprocess
    import sys

    code = "import sys, rwkv_disha.kernels; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# --- heads wider than the kernel's MAX_N: one line in every command, before any work


def test_check_op_fits_knows_cpps_head_size_limit():
    """No build needed: the limit is data, and it is the one common.h compiles in."""
    import re

    from rwkv_disha.kernels import HEAD_SIZE_LIMITS

    max_n = int(re.search(r"MAX_N = (\d+);", (cpp.SOURCES / "common.h").read_text())[1])
    assert HEAD_SIZE_LIMITS["cpp"][2] == max_n == 256
    for version in ("x070", "x060", "x052"):
        check_op_fits("cpp", version, 1)
        check_op_fits("cpp", version, 256)
        msg = "--op cpp runs heads of size <= 256; this model's are 512: use --op torch"
        with pytest.raises(RWKVDishaError, match=f"^{msg}$"):
            check_op_fits("cpp", version, 512)
    with pytest.raises(RWKVDishaError, match=r"^--ops cpp runs heads of size <= 256; --N is 300: use --ops"):
        check_op_fits("cpp", "x070", 300, "--ops", "--N is")


def _snapshot(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_error(capsys, rc) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


@needs_build
@pytest.mark.parametrize("version", ["x070", "x060"])
def test_heads_over_256_with_op_cpp_are_one_line_in_every_command(
    tmp_path, capsys, make_checkpoint, version, monkeypatch
):
    """generate, eval, train and bench --what kernel refuse a head size the kernel cannot take, before the
    model loads, the run folder is written or the kernel is built (half a minute on first use)."""

    def never(*args):
        raise AssertionError("built the kernel before checking the heads")

    monkeypatch.setattr(cpp, "extension", never)
    base = make_checkpoint(1, 512, 256, head_size=512, version=version)
    data = ["--data_type", "dummy", "--ctx_len", "8"]
    want = "error: --op cpp runs heads of size <= 256; this model's are 512: use --op torch"
    runs = {
        "generate": ["generate", "--load_model", str(base), "--prompt", "a", "--max_tokens", "2"],
        "eval": ["eval", "--load_model", str(base), *data, "--json", str(tmp_path / "e.json")],
        "train": ["train", "--load_model", str(base), "--proj_dir", str(tmp_path / "p"), *data,
                  "--accelerator", "cpu", "--precision", "fp32", "--epoch_steps", "1", "--epoch_count", "1"],
    }  # fmt: skip
    before = _snapshot(tmp_path)
    for name, argv in runs.items():
        assert _one_error(capsys, main([*argv, "--op", "cpp"])) == want, name
    assert _snapshot(tmp_path) == before and not (tmp_path / "p").exists()
    kernel = ["bench", "--what", "kernel", "--ops", "torch,cpp", "--N", "512", "--T", "2", "--H", "1"]
    line = _one_error(capsys, main([*kernel, "--repeat", "1", "--device", "cpu", "--version", version]))
    assert line == "error: --ops cpp runs heads of size <= 256; --N is 512: use --ops torch"
