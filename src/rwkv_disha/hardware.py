"""What this machine can do fast: native bf16 on the CPU, and the precision a run should use there.

A CPU without bf16 instructions (AVX-512 BF16 or AMX on x86) emulates bf16 matmuls: measured at
0.3-1.3 GFLOP/s on an AVX2-only EPYC against ~158 GFLOP/s in fp32, so ``--precision bf16`` trained
>= 55x slower than fp32 there, silently. Training on such a CPU runs in fp32 with a one-line notice.
"""

from __future__ import annotations

import platform

import torch


def cpu_capabilities() -> dict:
    """torch's view of this CPU (``avx512_bf16``, ``amx_bf16``, ...); {} when torch cannot tell."""
    try:
        return dict(torch._C._cpu._get_cpu_capability())
    except (AttributeError, RuntimeError):
        return {}


def cpu_has_native_bf16() -> bool:
    """Whether bf16 matmuls run in hardware here: AVX-512 BF16 or AMX-BF16 on x86; on other CPUs
    (Arm) what oneDNN reports."""
    caps = cpu_capabilities()
    if platform.machine().lower() in ("x86_64", "amd64", "i686", "x86"):
        return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_precision(precision: str) -> tuple[str, str | None]:
    """The precision a CPU run of ``precision`` uses here, and the notice to print when it differs."""
    if precision == "bf16" and not cpu_has_native_bf16():
        return "fp32", (
            "notice: this CPU has no native bf16 (no AVX-512 BF16 / AMX), where bf16 matmuls run ~50x "
            "slower than fp32: training in fp32 instead (same results, more memory)"
        )
    return precision, None
