"""Measuring tools shared by ``rwkv-disha bench`` and benchmarks/: timers, the matmul peak, peak RSS, a
step's peak allocation, WKV kernel inputs, paired medians over interleaved rounds, random-weight models and
training FLOPs."""

from __future__ import annotations

import contextlib
import math
import os
import resource
import statistics
import time

import torch

from rwkv_disha.kernels import get_wkv6, get_wkv7


def _sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def best_time(fn, repeat: int = 5, warmup: int = 1, device: str = "cpu") -> float:
    """Shortest wall time of ``repeat`` calls of ``fn`` (after ``warmup`` calls), in seconds."""
    for _ in range(warmup):
        fn()
    return min(_timed(fn, device) for _ in range(repeat))


class MatmulProbe:
    """An n x n x n product on preallocated buffers: this machine's dense matmul rate, measured between
    the steps of a run so that both see the same load (a shared machine drifts)."""

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.device = device
        self.n = 8192 if device.type == "cuda" else 2048
        self.a, self.b, self.c = (torch.randn(self.n, self.n, device=device).to(dtype) for _ in range(3))
        self.nbytes = 3 * self.a.numel() * self.a.element_size()
        self.rate()  # warm-up (cuBLAS / oneDNN pick their kernels)

    def rate(self) -> float:
        """FLOP/s of the best of two products (one alone is at the mercy of a single hiccup)."""
        t = min(_timed(lambda: torch.mm(self.a, self.b, out=self.c), self.device) for _ in range(2))
        return 2 * self.n**3 / t


def matmul_peak_flops(dtype: torch.dtype = torch.float32, n: int = 2048, device: str = "cpu") -> float:
    """Measured dense matmul throughput (FLOP/s) for an n x n x n product."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    t = best_time(lambda: a @ b, repeat=5, device=device)
    return 2 * n**3 / t


def rss_bytes() -> int:
    """This process's resident memory now (0 where /proc is not available)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _reset_peak_rss() -> None:
    """Reset the kernel's high-water mark of this process's RSS (Linux); without it, the peak is the
    process's whole life (ru_maxrss)."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_bytes() -> int:
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def step_peak_bytes(step, device: torch.device | str = "cpu") -> int:
    """Peak bytes allocated during ``step()`` above what was allocated before it.

    CUDA: the caching allocator's peak statistic. CPU: replayed from the profiler's allocation records,
    because RSS also counts freed blocks the allocator keeps and pages the step never touched."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    points = []  # "[memory]" events are allocations outside ops; an op's net bytes are its self usage
    for e in prof.events():
        nbytes = e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        if nbytes:
            points.append((e.time_range.start, nbytes))
    live = peak = 0
    for _, nbytes in sorted(points):
        live += nbytes
        peak = max(peak, live)
    return peak


# --- --what kernel -----------------------------------------------------------------------------------
def wkv_inputs(
    B: int, T: int, H: int, N: int, device: str = "cpu", seed: int = 0, dtype=torch.float32, version="x070"
):
    """Random leaves for a WKV kernel: RWKV-7's (r, log_w, k, v, a, b), or RWKV-6 / 5.2's (r, log_w, k,
    v, u (H, N)), each in its model's range of decays."""
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g) for _ in range(3))
    if version == "x070":
        log_w = -0.6065 * torch.rand(B, T, H, N, generator=g)
        kk = torch.nn.functional.normalize(torch.randn(B, T, H, N, generator=g), dim=-1)
        a_gate = torch.rand(B, T, H, N, generator=g)
        xs = (r, log_w, k, v, -kk, kk * a_gate)
    else:  # per-step decays from ~0.99 down to ~1e-9, as trained RWKV-6 channels have
        xs = (r, -torch.exp(1.5 * torch.randn(B, T, H, N, generator=g)), k, v, torch.randn(H, N, generator=g))
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in xs]


def kernel_step(
    op: str, B: int, T: int, H: int, N: int, device: str = "cpu", dtype=torch.float32, version: str = "x070"
):
    """One forward + backward of the WKV op of ``version`` on random inputs of ``dtype``, as a function."""
    fn = get_wkv7(op) if version == "x070" else get_wkv6(op)
    xs = wkv_inputs(B, T, H, N, device, dtype=dtype, version=version)

    def step():
        y, s = fn(*xs)
        (y.float().sum() + s.sum()).backward()

    return step


def time_kernel(op: str, B: int, T: int, H: int, N: int, device: str = "cpu", repeat: int = 5) -> float:
    """Seconds for one forward + backward of the WKV-7 op on random inputs (best of ``repeat``)."""
    return best_time(kernel_step(op, B, T, H, N, device), repeat=repeat, device=device)


def interleaved_times(steps: dict, rounds: int, device, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each step per round, after ``warmup`` untimed calls of each; the order rotates every
    round, so no variant always runs first (or right after the slowest one) on a machine whose load drifts."""
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    for name in names:
        for _ in range(warmup):
            steps[name]()
    for i in range(rounds):
        order = names[i % len(names) :] + names[: i % len(names)]
        for name in order if i % 2 == 0 else reversed(order):
            times[name].append(_timed(steps[name], device))
    return times


def paired_median_ratio(times: dict[str, list[float]], name: str, base: str) -> float:
    """Median over rounds of (name's time / base's time in the same round)."""
    return statistics.median(t / b for t, b in zip(times[name], times[base]))


def random_base(mcfg, op: str, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """A model of shape ``mcfg`` with random weights made on ``device`` (seconds at any size; only for
    timing: norms at 1 / 0, per-channel vectors in (0, 1), matrices uniform at 1/sqrt(width))."""
    from rwkv_disha.model.load import build_model

    model = build_model(mcfg, op=op, device="meta").to_empty(device=device)
    torch.manual_seed(seed)
    C = mcfg.n_embd
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(0.0 if name.endswith(".bias") else 1.0)
            elif p.numel() > C and name.startswith("emb."):
                p.normal_(0.0, 1.0)
            elif p.numel() > C:
                p.uniform_(-1.0, 1.0).mul_(1.0 / math.sqrt(max(p.shape[-2:])))
            else:
                p.uniform_(0.0, 1.0)
        for b in model.buffers():
            b.zero_()
    return model


def flops_per_token(model: torch.nn.Module, tokens_per_step: int) -> dict[str, float]:
    """Training matmul FLOPs per token of the adapted ``model`` (forward + backward), by part.

    Matmul weights are the >= 2-D tensors with more than C elements (r_k, time_faaaa and the mixes are
    per-channel). A frozen weight costs 2 x size forward + 2 x size for the input gradient; a trained one
    2 x size more for its own gradient. Adapters, counted honestly: Bone / LoRA / MiSS-like kinds 6 FLOPs per
    trainable element (forward, input gradient, their gradient) plus Bone's fold; Bat also builds
    W' = W + W_b @ disha_b + disha_b every step (2 r in out, and as much again backward) and needs the
    full (out, in) gradient of W'. The WKV recurrence: 8 C N per token and layer forward (RWKV-7; 6 for
    6 / 5.2), x3 for training."""
    from rwkv_disha.adapters import adapter_modules

    cfg = model.config
    C, N, L = cfg.n_embd, cfg.head_size, cfg.n_layer
    base = adapter = 0.0
    inside = set()
    for _, m in adapter_modules(model):
        inside.update(id(p) for p in m.parameters())
        size = m.in_features * m.out_features
        base += 4 * size
        adapter += m.train_flops_per_token(tokens_per_step)
    for name, p in model.named_parameters():
        if (
            id(p) in inside
            or p.dim() < 2
            or p.numel() <= C
            or name.startswith("emb.")
            or "time_state" in name
        ):
            continue
        base += (6 if p.requires_grad else 4) * p.numel()
    wkv = 3 * (8 if cfg.version == "x070" else 6) * C * N * L
    return {"total": base + adapter + wkv, "base": base, "adapter": adapter, "wkv": wkv}
