"""The protocol every adapter layer follows, and what each adapter kind says about itself.

    x ──► frozen base  W (out, in)   [official name ``.weight``; dense, or quantized with --quant]
      └─► adapter      ΔW (out, in)  [trainable: ``.disha`` or ``.lora_A`` / ``.lora_B``, fp32]
    y = x @ (W + ΔW)^T

An adapter layer owns the frozen base weight under its original name, so a base checkpoint loads strictly
and a merged file keeps exactly the base's keys. ``delta_weight()`` is the one formula for ΔW:
``merged_weight()`` and the ``merge`` command go through it, and each forward is tested against it.

Each subclass is one adapter kind and carries everything only it knows (docs/ADAPTERS.md, "Adding a kind"):
its registry name and RWKV-PEFT flag with the JSON keys and defaults, its shape rule for r, how to read
r from a saved tensor, and its one-line description. ``adapters/registry.py`` lists the kinds.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from rwkv_disha.adapters.quant import QuantizedWeight, dense_weight, quantized_linear
from rwkv_disha.errors import RWKVDishaError

if TYPE_CHECKING:
    from rwkv_disha.adapters.config import AdapterConfig

Tensor = torch.Tensor

# RWKV-PEFT's --disha_config JSON, shared by Bone and Bat: JSON key -> (AdapterConfig field, type, default)
DISHA_FLAG = "--disha_config"
DISHA_KEYS: dict[str, tuple[str, type, Any]] = {
    "mode": ("mode", str, "bone"),
    "load": ("load", str, ""),
    "r": ("r", int, 64),
}


def whole_blocks_problem(r: int, out_f: int, in_f: int, name: str) -> str | None:
    """The rule of kinds that cut W into whole r x r blocks (Bat, MiSS bat): r divides both sides."""
    if r > 0 and (in_f % r or out_f % r):
        return f"must divide both sides of every adapted layer, but {name} is {out_f}x{in_f} (out x in)"
    return None


def folded_input_problem(r: int, in_f: int, name: str) -> str | None:
    """The rule of kinds that fold the input into r columns (Bone, MiSS mini): r no wider than the input."""
    return f"exceeds the input width {in_f} of {name}" if r > in_f else None


def narrowest_input(shapes: Mapping[str, tuple[int, int]]) -> int:
    """The smallest input width among the targets' (out, in) shapes."""
    return min(in_f for _, in_f in shapes.values())


def is_int_at_least(value: Any, low: int) -> bool:
    """A real int (JSON's 8.0 and true are not) >= low: the check every integer adapter option takes."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def common_block_side(shapes: Mapping[str, tuple[int, int]]) -> int:
    """The largest r dividing both sides of every target's (out, in) shape: gcd of all of them."""
    return math.gcd(*[d for shape in shapes.values() for d in shape])


class AdapterLinear(nn.Module):
    """A bias-free Linear with a frozen base ``weight`` and a small trainable adapter of rank ``r``.

    Subclasses set the class attributes below and define ``delta_weight()``, ``reset_adapter()``,
    ``forward()``, ``shape_problem()``, ``rank_from_tensors()`` and ``from_config()``. A kind of one of
    the two block shapes subclasses :class:`WholeBlocksLinear` or :class:`FoldedInputLinear` instead,
    which bring the shape rule, the fix, reading r back and the zero reset.
    """

    kind: ClassVar[str] = ""  # registry name; for DiSHA kinds also the JSON "mode"
    title: ClassVar[str] = ""  # how messages name it: "Bone"
    peft: ClassVar[str] = ""  # the --peft value that selects it: "disha" or "lora"
    adapter_names: ClassVar[tuple[str, ...]] = ()  # parameter names = key suffixes in adapter files
    frozen_adapter_names: ClassVar[tuple[str, ...]] = ()  # of those, saved but never trained (PiSSA's A0, B0)
    tensor_layout: ClassVar[str] = ""  # for messages: "disha (r, out)"
    cli_flag: ClassVar[str] = ""  # RWKV-PEFT's JSON flag: "--disha_config"
    cli_keys: ClassVar[dict[str, tuple[str, type, Any]]] = {}  # JSON key -> (config field, type, default)
    cli_example: ClassVar[str] = ""  # the flag's value as RWKV-PEFT's README writes it

    def __init__(self, weight: Tensor, r: int):
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"an adapter wraps a 2-D (out, in) weight, got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        type(self).check_shapes(r, {"this layer": (self.out_features, self.in_features)})
        self.r = r
        # Shares the base tensor's storage: wrapping a Linear copies nothing.
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)

    # -- what the kind knows ---------------------------------------------------------------------------
    @classmethod
    def shape_problem(cls, r: int, out_f: int, in_f: int, name: str) -> str | None:
        """Why rank ``r`` does not fit layer ``name`` of shape (out, in), or None when it fits."""
        return None if r > 0 else "must be a positive integer"

    @classmethod
    def shape_fix(cls, r: int, shapes: Mapping[str, tuple[int, int]]) -> str:
        """What to do instead, given every target's (out, in) shape."""
        return "choose another r"

    @classmethod
    def largest_r(cls, shapes: Mapping[str, tuple[int, int]], below: int) -> int | None:
        """The largest r < ``below`` fitting every (out, in) shape of ``shapes`` (by layer name), or None."""

        def fits(r: int) -> bool:
            return all(cls.shape_problem(r, o, i, name) is None for name, (o, i) in shapes.items())

        widest = max((max(shape) for shape in shapes.values()), default=0)
        return next((r for r in range(min(below - 1, widest), 0, -1) if fits(r)), None)

    @classmethod
    def check_shapes(cls, r: int, shapes: Mapping[str, tuple[int, int]]) -> None:
        """Refuse an r that does not fit every (out, in) shape in ``shapes`` (by layer name): used by
        injection before any layer is replaced, and by the constructor."""
        for name, (out_f, in_f) in shapes.items():
            problem = cls.shape_problem(r, out_f, in_f, name)
            if problem:
                raise RWKVDishaError(f"{cls.title} r={r} {problem}: {cls.shape_fix(r, shapes)}")

    @classmethod
    def rank_from_tensors(cls, tensors: Mapping[str, Tensor]) -> int | None:
        """r from one layer's saved adapter tensors (by suffix); None when the shapes are not this kind's."""
        raise NotImplementedError

    @classmethod
    def settings_without_sidecar(cls, lora_alpha: float | None, source: str) -> dict[str, Any]:
        """AdapterConfig fields a file without sidecar does not hold (RWKV-PEFT files hold only tensors)."""
        return {"mode": cls.kind}

    @classmethod
    def check_config(cls, cfg: AdapterConfig) -> None:
        """Refuse settings of this kind beyond r (which every kind checks); raise RWKVDishaError."""

    @classmethod
    def check_file_settings(cls, file_cfg: AdapterConfig, cfg: AdapterConfig, source: str) -> None:
        """Refuse loading a file (settings from its sidecar) whose tensors mean something else under ``cfg``,
        beyond kind and r (which every kind compares); raise RWKVDishaError."""

    @classmethod
    def describe(cls, cfg: AdapterConfig) -> str:
        return f"{cls.title} r={cfg.r}"

    @classmethod
    def from_config(cls, weight: Tensor, cfg: AdapterConfig) -> AdapterLinear:
        """The layer ``cfg`` asks for around ``weight`` (out, in), without copying it."""
        return cls(weight, cfg.r)

    # -- the frozen base -------------------------------------------------------------------------------
    @property
    def is_quantized(self) -> bool:
        return isinstance(self.weight, QuantizedWeight)

    def quantize_base(self, mode: str) -> None:
        """Replace the dense base weight by a quantized copy (int8 / nf4 / fp4); frees the dense one."""
        if self.is_quantized:
            raise RuntimeError("base weight is already quantized")
        qweight = QuantizedWeight(self.weight.data, mode)
        del self.weight  # removes the Parameter from self._parameters
        self.weight = qweight

    def base_forward(self, x: Tensor) -> Tensor:
        """x (..., in) -> x @ W^T (..., out)."""
        if isinstance(self.weight, QuantizedWeight):
            return quantized_linear(x, self.weight)
        return F.linear(x, self.weight)

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.weight.dtype

    # -- the adapter ----------------------------------------------------------------------------------
    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The trainable adapter parameters, by name (the key suffix in adapter files)."""
        return {name: getattr(self, name) for name in self.adapter_names}

    def delta_weight(self) -> Tensor:
        """ΔW (out, in) in fp32, such that this layer computes x @ (W + ΔW)^T."""
        raise NotImplementedError

    def train_flops_per_token(self, tokens_per_step: int) -> float:
        """Training FLOPs per token the adapter adds to the frozen layer (forward, input gradient and its
        own gradient: 6 per trained element); kinds that do more per step say so."""
        return 6.0 * sum(p.numel() for p in self.adapter_parameters().values() if p.requires_grad)

    def reset_adapter(self) -> None:
        """Back to the initial adapter (the layer then equals the base layer)."""
        raise NotImplementedError

    @torch.no_grad()
    def merged_weight(self) -> Tensor:
        """W + ΔW (out, in) in fp32. Pure: the layer is left unchanged."""
        return dense_weight(self.weight, torch.float32) + self.delta_weight()

    def _param_like(self, *shape: int) -> nn.Parameter:
        """A zero fp32 parameter on the base weight's device (adapters stay in full precision)."""
        device = self.weight.device
        return nn.Parameter(torch.zeros(*shape, dtype=torch.float32, device=device))

    def extra_repr(self) -> str:
        q = f", quant={self.weight.mode}" if self.is_quantized else ""
        return f"in={self.in_features}, out={self.out_features}, r={self.r}{q}"


class ZeroStartLinear(AdapterLinear):
    """A kind whose adapter tensors all start at zero, so that the layer starts equal to its base."""

    def reset_adapter(self) -> None:
        with torch.no_grad():
            for p in self.adapter_parameters().values():
                p.zero_()


class WholeBlocksLinear(ZeroStartLinear):
    """A kind that cuts W (out, in) into whole r x r blocks and trains one (n, r, r) tensor, the one named
    ``adapter_names[0]``: an r x r matrix per block of one side (Bat: n = in/r; MiSS bat: n = out/r)."""

    @classmethod
    def shape_problem(cls, r: int, out_f: int, in_f: int, name: str) -> str | None:
        return whole_blocks_problem(r, out_f, in_f, name) or super().shape_problem(r, out_f, in_f, name)

    @classmethod
    def shape_fix(cls, r: int, shapes: Mapping[str, tuple[int, int]]) -> str:
        return f"choose r dividing {common_block_side(shapes)} in {cls.cli_flag}"

    @classmethod
    def rank_from_tensors(cls, tensors: Mapping[str, Tensor]) -> int | None:
        blocks = tensors.get(cls.adapter_names[0])
        if blocks is None or blocks.dim() != 3 or blocks.shape[1] != blocks.shape[2]:
            return None
        return int(blocks.shape[1])


class FoldedInputLinear(ZeroStartLinear):
    """A kind that folds the input (..., in) into r columns and trains one (r, m) tensor, the one named
    ``adapter_names[0]`` (Bone: m = out; MiSS mini: m = mini_r)."""

    @classmethod
    def shape_problem(cls, r: int, out_f: int, in_f: int, name: str) -> str | None:
        return folded_input_problem(r, in_f, name) or super().shape_problem(r, out_f, in_f, name)

    @classmethod
    def shape_fix(cls, r: int, shapes: Mapping[str, tuple[int, int]]) -> str:
        return f"choose r <= {narrowest_input(shapes)} in {cls.cli_flag}"

    @classmethod
    def rank_from_tensors(cls, tensors: Mapping[str, Tensor]) -> int | None:
        rows = tensors.get(cls.adapter_names[0])
        return int(rows.shape[0]) if rows is not None and rows.dim() == 2 else None


def adapter_modules(model: nn.Module) -> Iterator[tuple[str, AdapterLinear]]:
    """(name, module) for every adapter layer in ``model``, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLinear):
            yield name, module
