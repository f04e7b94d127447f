"""The protocol every adapter layer follows.

    x ──► frozen base  W (out, in)   [official name ``.weight``; dense, or quantized with --quant]
      └─► adapter      ΔW (out, in)  [trainable: ``.disha`` or ``.lora_A`` / ``.lora_B``, fp32]
    y = x @ (W + ΔW)^T

An adapter layer owns the frozen base weight under its original name, so a base checkpoint loads strictly
and a merged file keeps exactly the base's keys. ``delta_weight()`` is the one formula for ΔW: ``merge()``
and the ``merge`` command go through it, and each forward is tested against it.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from rwkv_disha.adapters.quant import QuantizedWeight, quantized_linear

Tensor = torch.Tensor


class AdapterLinear(nn.Module):
    """A bias-free Linear with a frozen base ``weight`` and a small trainable adapter.

    Subclasses define ``adapter_names`` (their parameter names, which are also the file key suffixes),
    ``delta_weight()``, ``reset_adapter()`` and ``forward()``.
    """

    adapter_names: tuple[str, ...] = ()

    def __init__(self, weight: Tensor):
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"an adapter wraps a 2-D (out, in) weight, got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        # Shares the base tensor's storage: wrapping a Linear copies nothing.
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)

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

    def base_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """The frozen base weight as a dense (out, in) tensor (dequantized if quantized), no grad."""
        if isinstance(self.weight, QuantizedWeight):
            return self.weight.dequantized_weight(dtype)
        w = self.weight.detach()
        return w if dtype is None else w.to(dtype)

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

    def reset_adapter(self) -> None:
        """Back to the initial adapter (the layer then equals the base layer)."""
        raise NotImplementedError

    @torch.no_grad()
    def merge(self) -> Tensor:
        """The merged weight W + ΔW (out, in) in fp32. Pure: the layer is left unchanged."""
        return self.base_weight(torch.float32) + self.delta_weight()

    def _param_like(self, *shape: int) -> nn.Parameter:
        """A zero fp32 parameter on the base weight's device (adapters stay in full precision)."""
        device = self.weight.device
        return nn.Parameter(torch.zeros(*shape, dtype=torch.float32, device=device))

    def extra_repr(self) -> str:
        q = f", quant={self.weight.mode}" if self.is_quantized else ""
        return f"in={self.in_features}, out={self.out_features}{q}"


def adapter_modules(model: nn.Module) -> Iterator[tuple[str, AdapterLinear]]:
    """(name, module) for every adapter layer in ``model``, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLinear):
            yield name, module
