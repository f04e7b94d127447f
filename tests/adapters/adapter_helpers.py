"""Helpers for the adapter tests: adapted tiny models with randomised (non-zero) adapters."""

from __future__ import annotations

import torch

from rwkv_disha import load_model
from rwkv_disha.adapters import AdapterConfig, inject_adapters, mark_trainable
from rwkv_disha.adapters.inject import adapter_parameters, train_part_parameters
from rwkv_disha.adapters.quant import QuantizedWeight

BONE = '{"mode":"bone","load":"","r":%d}'
BAT = '{"mode":"bat","load":"","r":%d}'
LORA = '{"lora_load":"","lora_r":%d,"lora_alpha":32,"lora_dropout":0.0}'


def config(kind: str, r: int, **kw) -> AdapterConfig:
    """AdapterConfig for kind in bone / bat / lora through the CLI parser, as the trainer builds it."""
    if kind == "lora":
        return AdapterConfig.from_cli("lora", "", LORA % r, **kw)
    return AdapterConfig.from_cli("disha", (BONE if kind == "bone" else BAT) % r, "", **kw)


def randomise(model: torch.nn.Module, seed: int = 0, train_parts: tuple[str, ...] = ("ln",)) -> None:
    """Non-zero adapters (zero init would make every merged == unmerged check trivially true), and
    perturbed train_parts tensors (so that the merge must carry them over)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        for p in train_part_parameters(model, train_parts).values():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.05)


def adapted(path, cfg: AdapterConfig, seed: int = 0, dtype=torch.float32):
    model = load_model(path, dtype=dtype, op="torch")
    inject_adapters(model, cfg)
    mark_trainable(model, cfg)
    randomise(model, seed)
    return model.eval()


def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens[None] if tokens.dim() == 1 else tokens).float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def tokens(vocab: int, shape=(2, 24), seed: int = 7) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def quantize_dequantize_ref(weight: torch.Tensor, mode: str) -> torch.Tensor:
    """What training with ``--quant mode`` sees of ``weight``: fp32, same shape (identity for "none")."""
    if mode == "none":
        return weight.float()
    return QuantizedWeight(weight, mode).dequantized_weight(torch.float32)
