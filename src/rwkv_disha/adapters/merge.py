"""Merge an adapter checkpoint (Bone, Bat or LoRA; ours or RWKV-PEFT's) into a plain RWKV model file.

    rwkv-disha merge --base_model RWKV-x070-World-0.1B.pth --peft_checkpoint out/rwkv-3.pth \\
        --output merged.pth [--quant int8|nf4|fp4]

Each adapted weight becomes W + ΔW, computed in fp32 by the adapter layer's own ``merge()`` (the formula the
training forward uses) and stored in the base's dtype; --train_parts tensors in the adapter file replace
the base's. The output has exactly the base's keys, so the rwkv package, RWKV Runner and Ai00's converter
load it like any released model. With --quant the base weight is quantized and dequantized first, as in
training. The base is memory-mapped and merged one tensor at a time; the output is written to a
temporary file and renamed, so a failed merge leaves nothing at --output.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rwkv_disha.adapters.files import base_fingerprint, check_fingerprint, read_adapter_file
from rwkv_disha.adapters.inject import (
    ADAPTER_SUFFIXES,
    AdapterConfig,
    infer_adapter_config,
    make_adapter_layer,
)
from rwkv_disha.adapters.quant import check_quant_mode
from rwkv_disha.config import opt
from rwkv_disha.errors import RWKVDishaError

Tensor = torch.Tensor


@dataclass
class Config:
    base_model: str = opt("", "the base model .pth / .safetensors the adapter was trained on")
    peft_checkpoint: str = opt("", "the adapter checkpoint (rwkv-N.pth from train, or from RWKV-PEFT)")
    output: str = opt("", "where to write the merged model (.pth, or .safetensors)")
    quant: str = opt(
        "",
        "quantize-dequantize the base weights first, as training with --quant did "
        "('' = what the adapter's .json sidecar records, else none)",
        choices=("", "none", "int8", "nf4", "fp4"),
    )
    lora_alpha: float = opt(
        0.0, "LoRA alpha, needed only for a LoRA file without its .json sidecar (0 = from sidecar)"
    )


def merged_weight(
    cfg: AdapterConfig,
    base_weight: Tensor,
    adapter_tensors: Mapping[str, Tensor],
    quant: str = "none",
    weight_dtype: torch.dtype | None = None,
) -> Tensor:
    """W + ΔW in fp32 for one layer, through the same adapter layer class the training forward uses.

    ``weight_dtype``: the dtype the base weight had in training; with ``quant`` the weight is rounded to it
    before quantizing, so the codes are the ones training used.
    """
    w = base_weight
    if quant != "none" and weight_dtype is not None:
        w = w.to(weight_dtype)
    layer = make_adapter_layer(cfg, w.to(torch.float32, copy=True))
    if quant != "none":
        layer.quantize_base(quant)
    params = layer.adapter_parameters()
    with torch.no_grad():
        for name, p in params.items():
            t = adapter_tensors[name]
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"{name} is {tuple(t.shape)}, the layer needs {tuple(p.shape)}")
            p.copy_(t)
    return layer.merge()


def _resolve_dtype(name: str | None) -> torch.dtype | None:
    if not name:
        return None
    dtype = getattr(torch, str(name), None)
    return dtype if isinstance(dtype, torch.dtype) else None


def merge_adapter_file(
    base_path: str | Path,
    adapter_path: str | Path,
    output: str | Path,
    quant: str | None = None,
    lora_alpha: float | None = None,
    log: Callable[[str], None] = lambda msg: None,
) -> dict[str, Any]:
    """Merge ``adapter_path`` into ``base_path`` and write ``output`` atomically; returns a summary.

    ``quant`` None / "" means: what the sidecar records (none without a sidecar). ``lora_alpha`` is needed
    only for a LoRA file without sidecar (it overrides the sidecar's value when given).
    """
    from rwkv_disha.model.load import infer_config, load_state_dict, save_state_dict

    base_path, adapter_path, output = Path(base_path), Path(adapter_path), Path(output)
    if output.resolve() == base_path.resolve() or output.resolve() == adapter_path.resolve():
        raise RWKVDishaError(
            f"--output {output} would overwrite an input: write the merged model to a new file"
        )
    base = load_state_dict(base_path, what="base model")
    model_cfg = infer_config(base)  # refuses an adapter file given as the base, and non-RWKV-7 files
    tensors, meta = read_adapter_file(adapter_path)
    source = f"adapter file {adapter_path}"
    if meta is not None:
        cfg = AdapterConfig.from_dict(meta["adapter"])
        if lora_alpha and cfg.peft == "lora" and lora_alpha != cfg.lora_alpha:
            log(f"using --lora_alpha {lora_alpha:g} instead of the sidecar's {cfg.lora_alpha:g}")
            cfg.lora_alpha = float(lora_alpha)
        if meta.get("base"):
            check_fingerprint(meta["base"], base_fingerprint(base), source)
        # the sidecar's config must agree with the tensors themselves
        shapes_cfg = infer_adapter_config(tensors, lora_alpha=cfg.lora_alpha, source=source)
        if (shapes_cfg.peft, shapes_cfg.mode if cfg.peft == "disha" else "", shapes_cfg.r) != (
            cfg.peft,
            cfg.mode if cfg.peft == "disha" else "",
            cfg.r,
        ):
            raise RWKVDishaError(
                f"{source} holds {shapes_cfg.describe()} tensors but its .json sidecar says "
                f"{cfg.describe()}: the sidecar belongs to another file; move it away"
            )
    else:
        cfg = infer_adapter_config(tensors, lora_alpha=lora_alpha or None, source=source)
    trained_quant = cfg.quant
    quant = check_quant_mode(quant) if quant else trained_quant
    if quant != trained_quant:
        log(f"note: the adapter was trained with --quant {trained_quant}, merging with --quant {quant}")
    weight_dtype = _resolve_dtype(meta.get("weight_dtype")) if meta else None

    # group the adapter tensors by layer; everything else replaces a base tensor
    layers: dict[str, dict[str, Tensor]] = {}
    replaced: dict[str, Tensor] = {}
    for key, t in tensors.items():
        prefix, _, suffix = key.rpartition(".")
        if suffix in ADAPTER_SUFFIXES:
            layers.setdefault(prefix, {})[suffix] = t
        else:
            replaced[key] = t
    missing_layers = [p for p in layers if f"{p}.weight" not in base]
    missing_parts = [k for k in replaced if k not in base]
    if missing_layers or missing_parts:
        names = [f"{p}.weight" for p in missing_layers] + missing_parts
        raise RWKVDishaError(
            f"{source} refers to tensors the base model lacks ({', '.join(names[:3])}): it was trained on "
            f"another model; use its base ({model_cfg.summary()} given)"
        )
    bad = [
        f"{k} {tuple(t.shape)} vs base {tuple(base[k].shape)}"
        for k, t in replaced.items()
        if t.shape != base[k].shape
    ]
    if bad:
        raise RWKVDishaError(
            f"{source} does not fit this base ({'; '.join(bad[:2])}): use the base it was trained on"
        )

    merged: dict[str, Tensor] = {}
    with torch.no_grad():
        for key, t in base.items():
            prefix = key[: -len(".weight")] if key.endswith(".weight") else None
            if key in replaced:
                merged[key] = replaced[key].to(t.dtype)
            elif prefix is not None and prefix in layers:
                try:
                    w = merged_weight(cfg, t, layers[prefix], quant, weight_dtype)
                except (ValueError, RuntimeError) as e:
                    raise RWKVDishaError(
                        f"{source} does not fit {key} {tuple(t.shape)} ({e}): use the base it was trained on"
                    ) from None
                merged[key] = w.to(t.dtype)
            else:
                merged[key] = t  # untouched: still the memory-mapped base tensor
    save_state_dict(merged, output)
    return {
        "adapter": cfg.describe()
        if quant == cfg.quant
        else f"{cfg.describe()} (merged with --quant {quant})",
        "layers": len(layers),
        "replaced": len(replaced),
        "keys": len(merged),
        "dtype": str(next(iter(base.values())).dtype).replace("torch.", ""),
        "quant": quant,
        "output": str(output),
    }


def run(cfg: Config) -> int:
    for flag in ("base_model", "peft_checkpoint", "output"):
        if not getattr(cfg, flag):
            raise RWKVDishaError(
                f"--{flag} is required: rwkv-disha merge --base_model BASE.pth --peft_checkpoint rwkv-N.pth "
                f"--output merged.pth"
            )
    info = merge_adapter_file(
        cfg.base_model,
        cfg.peft_checkpoint,
        cfg.output,
        quant=cfg.quant or None,
        lora_alpha=cfg.lora_alpha or None,
        log=print,
    )
    print(
        f"merged {info['adapter']}: {info['layers']} layers, {info['replaced']} train_parts tensors -> "
        f"{info['output']} ({info['keys']} tensors, {info['dtype']})"
    )
    return 0
