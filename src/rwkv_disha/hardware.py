"""What this machine can do: native bf16 on the CPU (and the precision a run should use there), and how much
memory a run may take.

A CPU without bf16 instructions (AVX-512 BF16 or AMX on x86) emulates bf16 matmuls: measured at
0.3-1.3 GFLOP/s on an AVX2-only EPYC against ~158 GFLOP/s in fp32, so ``--precision bf16`` trained
>= 55x slower than fp32 there, silently. Training on such a CPU runs in fp32 with a one-line notice.
"""

from __future__ import annotations

import contextlib
import platform
import resource
from pathlib import Path

import torch

from rwkv_disha.errors import RWKVDishaError


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


CGROUP = Path("/sys/fs/cgroup")  # cgroup v2: a container's RAM cap is here, not in /proc/meminfo


def _cgroup_bytes(name: str, root: Path | None = None) -> int | None:
    """A cgroup memory file's value (memory.max, memory.current); None where absent or "max" (no limit)."""
    with contextlib.suppress(OSError, ValueError):
        return int(((root or CGROUP) / name).read_text().strip())
    return None


def _meminfo_bytes(field: str) -> int | None:
    """A /proc/meminfo field (MemTotal, MemAvailable) in bytes; None where it cannot be read."""
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    return None


def cgroup_room_bytes(root: Path | None = None) -> int | None:
    """What this process's cgroup still lets it allocate: memory.max - memory.current (None: no limit)."""
    limit, used = _cgroup_bytes("memory.max", root), _cgroup_bytes("memory.current", root)
    return None if limit is None else max(limit - (used or 0), 0)


def memory_bytes(on_gpu: bool) -> int | None:
    """All the memory a run may use here: the GPU's, or the machine's RAM within this process's cgroup and
    address-space limits (None when it cannot be told)."""
    if on_gpu:
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    address_space = resource.getrlimit(resource.RLIMIT_AS)[0]
    limits = [
        _meminfo_bytes("MemTotal"),
        _cgroup_bytes("memory.max"),
        None if address_space == resource.RLIM_INFINITY else address_space,
    ]
    return min((n for n in limits if n is not None), default=None)


def available_bytes() -> int | None:
    """Memory a new allocation can still get here: MemAvailable, within the cgroup's limit."""
    room = [n for n in (_meminfo_bytes("MemAvailable"), cgroup_room_bytes()) if n is not None]
    return min(room, default=None)


def activation_floor_bytes(micro_bsz: int, ctx_len: int, n_embd: int, n_layer: int) -> int:
    """A lower bound of what one training step keeps for backward: even with --grad_cp 1 the input of every
    block (B, T, C) and a few tensors of the block being recomputed, at 2 bytes a value. A real step keeps
    ~10x more (docs/BENCHMARKS.md, "grad_cp and activation memory"), so a run above it cannot fit."""
    return micro_bsz * ctx_len * n_embd * (n_layer + 4) * 2


def check_activations_fit(micro_bsz: int, ctx_len: int, n_embd: int, n_layer: int, on_gpu: bool) -> None:
    """Refuse, before any work, a --ctx_len x --micro_bsz that cannot fit in this machine's memory."""
    floor, have = activation_floor_bytes(micro_bsz, ctx_len, n_embd, n_layer), memory_bytes(on_gpu)
    if have is not None and floor > have:
        where = "this GPU's" if on_gpu else "this machine's"
        raise RWKVDishaError(
            f"--ctx_len {ctx_len} x --micro_bsz {micro_bsz} needs more than {floor / 2**30:.0f} GiB of "
            f"activations on a L{n_layer} C{n_embd} model, above {where} {have / 2**30:.0f} GiB: "
            f"lower --ctx_len or --micro_bsz"
        )
