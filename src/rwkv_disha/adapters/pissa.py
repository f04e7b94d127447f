"""PiSSA: LoRA started from the top-r singular triplets of W (``--peft pissa --pissa_config``).

    frozen  W         (out, in)        the base, as released
            pissa_A0  (r, in)          sqrt(S_r) V_r^T   } the initial factors: B0 @ A0 is W's best rank-r
            pissa_B0  (out, r)         U_r sqrt(S_r)     } part (randomized SVD, ``svd_niter`` iterations)
    trains  lora_A    (r, in)          = pissa_A0 at start
            lora_B    (out, r)         = pissa_B0 at start
    ΔW = lora_B @ lora_A - pissa_B0 @ pissa_A0          (zero at start: the layer equals the base)
    forward:  y = x @ W^T + ((x @ lora_A^T) @ lora_B^T - (x @ pissa_A0^T) @ pissa_B0^T)

PiSSA's frozen base is the residual W_res = W - B0 @ A0; here it is applied as W minus the B0 @ A0 path,
which is the same function with the same gradients, and keeps the file small: it holds B0 and A0 (saved,
never trained), so ``merge`` rebuilds W_res + B @ A = W + ΔW from the released base alone. The same ΔW is
a plain LoRA of rank 2r: lora_A = [A; -A0], lora_B = [B, B0], scale 1 (:func:`pissa_as_lora`, what
``rwkv-disha export --format lora`` writes). docs/ADAPTERS.md, "PiSSA".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from rwkv_disha.adapters.base import AdapterLinear, is_int_at_least
from rwkv_disha.adapters.quant import dense_weight
from rwkv_disha.errors import RWKVDishaError

if TYPE_CHECKING:
    from rwkv_disha.adapters.config import AdapterConfig

Tensor = torch.Tensor


def pissa_init(weight: Tensor, r: int, niter: int) -> tuple[Tensor, Tensor]:
    """(A0 (r, in), B0 (out, r)) with B0 @ A0 = U_r S_r V_r^T from a randomized SVD of W (fp32)."""
    w = weight.float()
    # its own seed: the same W gives the same start in every run (a --resume rebuilds A0, B0 this way)
    # and the run's random stream is left as it was
    with torch.random.fork_rng(devices=[w.device] if w.device.type == "cuda" else []):
        torch.manual_seed(0)
        u, s, v = torch.svd_lowrank(w, q=r, niter=niter)  # u (out, r), s (r,), v (in, r)
    root = s.sqrt()
    return (v * root).t().contiguous(), (u * root).contiguous()


def pissa_delta(lora_A: Tensor, lora_B: Tensor, A0: Tensor, B0: Tensor) -> Tensor:
    """ΔW (out, in) = lora_B @ lora_A - B0 @ A0."""
    return lora_B @ lora_A - B0 @ A0


def pissa_as_lora(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """One layer's PiSSA tensors -> the plain LoRA of rank 2r (scale 1) with the same ΔW:
    lora_A (2r, in) = [A; -A0], lora_B (out, 2r) = [B, B0]."""
    a = torch.cat([tensors["lora_A"], -tensors["pissa_A0"]], 0)
    b = torch.cat([tensors["lora_B"], tensors["pissa_B0"]], 1)
    return {"lora_A": a, "lora_B": b}


# RWKV-PEFT keeps PiSSA's initial factors out of its checkpoints, in one file per run (init_pissa.pth):
# ``<layer>.init_lora_A`` (r, in), ``<layer>.init_lora_B`` (out, r), the values lora_A / lora_B started from
RWKV_PEFT_INIT_NAMES = {"init_lora_A": ("pissa_A0", "lora_A"), "init_lora_B": ("pissa_B0", "lora_B")}


def with_rwkv_peft_init(
    tensors: Mapping[str, Tensor], init: Mapping[str, Tensor], source: str, init_source: str
) -> dict[str, Tensor]:
    """RWKV-PEFT's PiSSA checkpoint (``lora_A`` / ``lora_B`` per layer, + any train_parts tensors) and its
    init file -> the tensors of one PiSSA adapter file: ``pissa_A0`` / ``pissa_B0`` added per layer.
    Refuses, one line each, a checkpoint that already holds them or holds no LoRA tensors, and an init
    file that is not RWKV-PEFT's or not of the same run (other layers or shapes)."""
    if any(k.endswith((".pissa_A0", ".pissa_B0")) for k in tensors):
        raise RWKVDishaError(
            f"{source} already holds PiSSA's initial factors (pissa_A0 / pissa_B0): drop {init_source}"
        )
    layers = [k.removesuffix(".lora_A") for k in tensors if k.endswith(".lora_A")]
    if not layers:
        raise RWKVDishaError(
            f"{source} holds no lora_A / lora_B tensors: {init_source} completes the rwkv-N.pth of an "
            f"RWKV-PEFT --peft pissa run only; drop it"
        )
    stray = [k for k in init if k.rpartition(".")[2] not in RWKV_PEFT_INIT_NAMES]
    if stray or not init:
        raise RWKVDishaError(
            f"{init_source} is not RWKV-PEFT's init_pissa.pth, which holds only *.init_lora_A / "
            f"*.init_lora_B tensors (found {', '.join(stray[:3]) or 'no tensors'})"
        )
    others = sorted({k.rpartition(".")[0] for k in init} - set(layers))
    if others:
        raise RWKVDishaError(
            f"{init_source} holds initial factors of layers {source} does not adapt "
            f"({', '.join(others[:3])}): it is the init file of another run"
        )
    out = dict(tensors)
    for layer in layers:
        for old, (new, trained) in RWKV_PEFT_INIT_NAMES.items():
            t0, t = init.get(f"{layer}.{old}"), tensors.get(f"{layer}.{trained}")
            if t0 is None:
                raise RWKVDishaError(
                    f"{init_source} lacks {layer}.{old}: it is the init file of another run than {source}"
                )
            if t is not None and t0.shape != t.shape:
                raise RWKVDishaError(
                    f"{init_source}: {layer}.{old} is {tuple(t0.shape)} but {source}'s {trained} is "
                    f"{tuple(t.shape)}: it is the init file of another run"
                )
            out[f"{layer}.{new}"] = t0
    return out


class PissaLinear(AdapterLinear):
    """Frozen ``weight`` (out, in) + trainable ``lora_A`` (r, in), ``lora_B`` (out, r) started from W's top-r
    SVD, and their saved starting values ``pissa_A0`` / ``pissa_B0``; r <= min(in, out)."""

    kind, title, peft = "pissa", "PiSSA", "pissa"
    adapter_names = ("lora_A", "lora_B", "pissa_A0", "pissa_B0")
    frozen_adapter_names = ("pissa_A0", "pissa_B0")  # saved with the adapter, never trained
    tensor_layout = "PiSSA tensors are lora_A / pissa_A0 (r, in) and lora_B / pissa_B0 (out, r)"
    cli_flag = "--pissa_config"
    cli_keys: dict[str, tuple[str, type, Any]] = {
        "pissa_load": ("load", str, ""),
        "pissa_init": ("pissa_init", str, ""),
        "pissa_r": ("r", int, 8),
        "svd_niter": ("svd_niter", int, 4),
    }
    cli_example = '{"pissa_load":"","pissa_init":"","pissa_r":8,"svd_niter":4}'

    def __init__(self, weight: Tensor, r: int, svd_niter: int = 4):
        super().__init__(weight, r)
        self.svd_niter = svd_niter
        self.lora_A = self._param_like(r, self.in_features)  # (r, in)
        self.lora_B = self._param_like(self.out_features, r)  # (out, r)
        self.pissa_A0 = self._param_like(r, self.in_features)  # (r, in)
        self.pissa_B0 = self._param_like(self.out_features, r)  # (out, r)
        self.pissa_A0.requires_grad_(False)
        self.pissa_B0.requires_grad_(False)
        self.reset_adapter()

    @classmethod
    def shape_problem(cls, r: int, out_f: int, in_f: int, name: str) -> str | None:
        if r > min(in_f, out_f):  # W has no more singular triplets than its smaller side
            return f"exceeds the smaller side {min(in_f, out_f)} of {name} ({out_f}x{in_f})"
        return super().shape_problem(r, out_f, in_f, name)

    @classmethod
    def shape_fix(cls, r: int, shapes: Mapping[str, tuple[int, int]]) -> str:
        return "choose a smaller pissa_r"

    @classmethod
    def rank_from_tensors(cls, tensors: Mapping[str, Tensor]) -> int | None:
        a, b = tensors.get("lora_A"), tensors.get("lora_B")
        a0, b0 = tensors.get("pissa_A0"), tensors.get("pissa_B0")
        if any(t is None or t.dim() != 2 for t in (a, b, a0, b0)):
            return None
        if a.shape != a0.shape or b.shape != b0.shape or a.shape[0] != b.shape[1]:
            return None
        return int(a.shape[0])

    @classmethod
    def settings_without_sidecar(cls, lora_alpha: float | None, source: str) -> dict[str, Any]:
        return {"mode": cls.kind}

    @classmethod
    def check_config(cls, cfg: AdapterConfig) -> None:
        niter = cfg.svd_niter
        if not is_int_at_least(niter, 0):
            raise RWKVDishaError(f"{cls.cli_flag} svd_niter must be an integer >= 0, got {niter!r}")
        if cfg.pissa_init and not cfg.load:  # RWKV-PEFT's init file completes the checkpoint it continues
            raise RWKVDishaError(
                f"{cls.cli_flag} pissa_init completes an RWKV-PEFT PiSSA checkpoint given as pissa_load; "
                f"give both (a fresh run makes its own initial factors), or neither"
            )

    @classmethod
    def describe(cls, cfg: AdapterConfig) -> str:
        return f"{cls.title} r={cfg.r} svd_niter={cfg.svd_niter}"

    @classmethod
    def from_config(cls, weight: Tensor, cfg: AdapterConfig) -> PissaLinear:
        return cls(weight, cfg.r, cfg.svd_niter)

    def reset_adapter(self) -> None:
        """A fresh randomized SVD of W: A0, B0 and the trainable A, B all start from it."""
        a0, b0 = pissa_init(dense_weight(self.weight, torch.float32), self.r, self.svd_niter)
        with torch.no_grad():
            for p, v in ((self.pissa_A0, a0), (self.lora_A, a0), (self.pissa_B0, b0), (self.lora_B, b0)):
                p.copy_(v)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_forward(x)  # (..., out)
        dt = y.dtype
        h = F.linear(F.linear(x.to(dt), self.lora_A.to(dt)), self.lora_B.to(dt))  # (..., out)
        h0 = F.linear(F.linear(x.to(dt), self.pissa_A0.to(dt)), self.pissa_B0.to(dt))
        return y + (h - h0)

    def delta_weight(self) -> Tensor:
        p = {n: t.detach().float() for n, t in self.adapter_parameters().items()}
        return pissa_delta(p["lora_A"], p["lora_B"], p["pissa_A0"], p["pissa_B0"])
