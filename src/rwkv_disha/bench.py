"""Measure this machine: the WKV-7 kernels (chunked vs per-step loop) and the matmul peak.

Results of the project's benchmarks live in docs/BENCHMARKS.md, each with the command that made it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import torch

from rwkv_disha.choices import OPS
from rwkv_disha.config import opt
from rwkv_disha.errors import RWKVDishaError
from rwkv_disha.kernels import get_wkv7, resolve_op


def best_time(fn, repeat: int = 5, warmup: int = 1) -> float:
    """Shortest wall time of ``repeat`` calls of ``fn`` (after ``warmup`` calls), in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_peak_flops(dtype: torch.dtype = torch.float32, n: int = 2048, device: str = "cpu") -> float:
    """Measured dense matmul throughput (FLOP/s) for an n x n x n product."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    t = best_time(lambda: a @ b, repeat=5)
    return 2 * n**3 / t


def wkv_inputs(B: int, T: int, H: int, N: int, device: str = "cpu", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g) for _ in range(3))
    log_w = -0.6065 * torch.rand(B, T, H, N, generator=g)
    kk = torch.nn.functional.normalize(torch.randn(B, T, H, N, generator=g), dim=-1)
    a_gate = torch.rand(B, T, H, N, generator=g)
    return [t.to(device).requires_grad_() for t in (r, log_w, k, v, -kk, kk * a_gate)]


def time_kernel(op: str, B: int, T: int, H: int, N: int, device: str = "cpu", repeat: int = 5) -> float:
    """Seconds for one forward + backward of the WKV-7 op on random inputs."""
    fn = get_wkv7(op)
    xs = wkv_inputs(B, T, H, N, device)

    def step():
        y, s = fn(*xs)
        (y.float().sum() + s.sum()).backward()

    return best_time(step, repeat=repeat)


@dataclass
class Config:
    what: str = opt(
        "kernel", "what to measure: kernel (WKV-7 ops) or matmul (this machine's peak)", ("kernel", "matmul")
    )
    B: int = opt(1, "batch size")
    T: int = opt(512, "sequence length")
    H: int = opt(12, "heads")
    N: int = opt(64, "head size")
    ops: str = opt("torch,loop", "comma-separated kernels to time; the first is compared with the others")
    device: str = opt("cpu", "cpu or cuda (cuda:N for one GPU)")
    repeat: int = opt(5, "timed repetitions (the best is reported)")


def validate(cfg: Config) -> list[str]:
    """Every option checked before any tensor is made; returns the ops to time."""
    for name in ("B", "T", "H", "N", "repeat"):
        if getattr(cfg, name) < 1:
            raise RWKVDishaError(f"--{name} must be positive, got {getattr(cfg, name)}")
    device = cfg.device.strip().lower()
    if device != "cpu" and not (device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        raise RWKVDishaError(f"--device must be cpu, cuda or cuda:N, got {cfg.device!r}")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RWKVDishaError(f"--device {cfg.device}: no CUDA GPU is visible here; use --device cpu")
        if device[5:] and int(device[5:]) >= torch.cuda.device_count():
            raise RWKVDishaError(
                f"--device {cfg.device}: this machine has {torch.cuda.device_count()} GPU(s)"
            )
    ops = [o.strip() for o in cfg.ops.split(",") if o.strip()]
    if cfg.what == "kernel" and not ops:
        raise RWKVDishaError("--ops is empty: give kernels to time, e.g. --ops torch,loop")
    for op in ops if cfg.what == "kernel" else []:
        if op not in OPS:
            raise RWKVDishaError(f"--ops: unknown kernel {op!r}; choose from {', '.join(OPS)}")
        if resolve_op(op) == "fla" and device == "cpu":
            raise RWKVDishaError(f"--ops {op} runs on CUDA tensors only: add --device cuda")
    return ops


def run(cfg: Config) -> int:
    ops = validate(cfg)
    torch.manual_seed(0)
    if cfg.what == "matmul":
        res = {str(d): matmul_peak_flops(d, device=cfg.device) / 1e9 for d in (torch.float32, torch.bfloat16)}
        print(json.dumps({"threads": torch.get_num_threads(), "matmul_gflops": res}))
        return 0
    times = {op: time_kernel(op, cfg.B, cfg.T, cfg.H, cfg.N, cfg.device, cfg.repeat) for op in ops}
    result = {
        "shape": dict(B=cfg.B, T=cfg.T, H=cfg.H, N=cfg.N),
        "device": cfg.device,
        "threads": torch.get_num_threads(),
        "fwd_bwd_ms": {op: round(t * 1e3, 2) for op, t in times.items()},
        "speedup_of_" + ops[0]: {op: round(t / times[ops[0]], 2) for op, t in times.items() if op != ops[0]},
    }
    print(json.dumps(result))
    return 0
