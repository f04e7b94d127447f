"""Merge an adapter checkpoint (Bone, Bat or LoRA; ours or RWKV-PEFT's) into a plain RWKV model file.

    rwkv-disha merge --base_model RWKV-x070-World-0.1B.pth --peft_checkpoint out/rwkv-3.pth \\
        --output merged.pth [--quant int8|nf4|fp4] [--overwrite 1]

The merge is the training model, written out: the base is memory-mapped into the model, the adapters are
injected as in training, the adapter file is loaded strictly (the same checks as training and generate),
and each adapted layer's ``merged_weight()`` (W + ΔW in fp32, the formula the forward uses) is stored in the
base's dtype. --train_parts tensors from the adapter file replace the base's. The output has exactly the
base's keys, so the rwkv package, RWKV Runner and Ai00's converter load it like any released model. With
--quant the base weight is quantized and dequantized first, as in training. The output is written to a
temporary file and renamed: a failed merge leaves nothing at --output.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from rwkv_disha.adapters.adapter_file import (
    AdapterFile,
    apply_lora_alpha,
    check_base,
    load_adapter_file,
    open_adapter_file,
    sidecar_path,
)
from rwkv_disha.adapters.base import adapter_modules
from rwkv_disha.adapters.inject import inject_adapters
from rwkv_disha.adapters.quant import check_quant_mode
from rwkv_disha.adapters.state import TimeState, is_state_key, time_state_parameters
from rwkv_disha.choices import QUANT_CHOICES
from rwkv_disha.config import opt
from rwkv_disha.errors import RWKVDishaError
from rwkv_disha.fsio import check_output_path

Tensor = torch.Tensor


# RWKV-PEFT's merge/merge.py flags that merge spells otherwise (cli.py turns them into their fix)
FOREIGN_FLAGS = {"device": "merge runs on the CPU: drop it"}
MERGE_TYPES = {"lora": "LoRA", "pissa": "PiSSA"}  # RWKV-PEFT merge.py's --type: the kind it merges as
FOREIGN_VALUES = {("quant", "4bit"): "RWKV-PEFT's 4bit is bitsandbytes' fp4: use --quant fp4"}


@dataclass
class Config:
    base_model: str = opt("", "the base model .pth / .safetensors the adapter was trained on")
    peft_checkpoint: str = opt("", "the adapter checkpoint (rwkv-N.pth from train, or from RWKV-PEFT)")
    state: str = opt(
        "", "a state file (rwkv-N.pth of --peft state) to write into the base as blocks.N.att.time_state"
    )
    state_checkpoint: str = opt("", "the same as --state (the name RWKV-PEFT's merge_state.py uses)")
    lora_checkpoint: str = opt("", "the same as --peft_checkpoint (the name RWKV-PEFT's merge.py uses)")
    output: str = opt("", "where to write the merged model (.pth, or .safetensors)")
    lora_init: str = opt(
        "",
        "RWKV-PEFT's init_pissa.pth: the initial factors of an RWKV-PEFT PiSSA rwkv-N.pth (ours hold them)",
    )
    type: str = opt(
        "",
        "RWKV-PEFT merge.py's --type: the file must hold that kind ('' = any: the kind is read from it)",
        choices=("", *MERGE_TYPES),
    )
    quant: str = opt(
        "",
        "quantize-dequantize the base weights first, as training with --quant did "
        "('' = what the adapter's .json sidecar records, else none)",
        choices=("", *QUANT_CHOICES),
    )
    lora_alpha: float = opt(
        0.0, "LoRA alpha, needed only for a LoRA file without its .json sidecar (0 = from sidecar)"
    )
    overwrite: bool = opt(False, "replace an existing --output file")


def _check_paths(
    base_path: Path, adapter_path: Path, output: str | Path, overwrite: bool, pissa_init: str = ""
) -> None:
    """Refuse an --output that is an input, a directory, or (without ``overwrite``) an existing file."""
    inputs = (
        base_path,
        adapter_path,
        sidecar_path(adapter_path),
        *([Path(pissa_init)] if pissa_init else []),
    )
    if any(Path(output).resolve() == p.resolve() for p in inputs):
        raise RWKVDishaError(
            f"--output {output} would overwrite an input: write the merged model to a new file"
        )
    check_output_path(output, "--output", overwrite=overwrite)


def _resolve_quant(file: AdapterFile, quant: str | None, log: Callable[[str], None]) -> str:
    trained, given = file.cfg.quant, check_quant_mode(quant) if quant else None
    quant = given or trained
    if given not in (None, "none") and not file.cfg.adapts_layers:  # it would change nothing: say so
        raise RWKVDishaError(
            f"--quant {quant} rounds the adapted layers' base weights, but {file.source} adapts no layer "
            f"({file.cfg.describe()}): drop --quant"
        )
    if quant != trained:
        log(f"note: the adapter was trained with --quant {trained}, merging with --quant {quant}")
    return quant


def adapted_base(base: dict[str, Tensor], file: AdapterFile, quant: str, model_cfg=None):
    """The model of ``base`` (its tensors assigned, not copied) with ``file`` injected and loaded strictly.

    With ``quant``, each adapted base weight is first rounded to the dtype it had in training (the sidecar
    records it) and then quantized, so it dequantizes to exactly the base the training forward saw.
    """
    from rwkv_disha.model.load import infer_config, model_from_state_dict

    # the mmap'ed tensors themselves; a base that already holds merged states keeps them unless replaced
    model = model_from_state_dict(base, model_cfg or infer_config(base, source="the base model"), op="torch")
    check_base(file, model)  # another base: say so before any layer is touched
    cfg = replace(file.cfg, quant="none")
    inject_adapters(model, cfg)
    if quant != "none":
        for _, layer in adapter_modules(model):
            if file.weight_dtype is not None:
                layer.weight.data = layer.weight.data.to(file.weight_dtype)
            layer.quantize_base(quant)
    load_adapter_file(model, file, cfg)
    return model


def merged_state_dict(base: dict[str, Tensor], model) -> dict[str, Tensor]:
    """The base's keys in the base's order and dtypes: merged weights for adapted layers, the model's
    (loaded --train_parts, or untouched memory-mapped) tensors for everything else. Initial states
    follow as ``blocks.N.att.time_state`` in fp32 (RWKV-PEFT's merge_state writes them so; the recurrence
    runs in fp32)."""
    layers = dict(adapter_modules(model))
    tensors = model.state_dict()
    merged: dict[str, Tensor] = {}
    for key, t in base.items():
        layer = layers.get(key.removesuffix(".weight")) if key.endswith(".weight") else None
        dtype = torch.float32 if is_state_key(key) else t.dtype
        merged[key] = (layer.merged_weight() if layer is not None else tensors[key]).to(dtype)
    for key, p in time_state_parameters(model).items():
        merged[key] = p.detach().float()
    return merged


def _refuse_non_finite(merged: dict[str, Tensor], output: Path) -> None:
    from rwkv_disha.model.load import non_finite_names

    bad = non_finite_names(merged)
    if bad:
        names = ", ".join(bad[:3]) + (f", ... ({len(bad)} in all)" if len(bad) > 3 else "")
        raise RWKVDishaError(
            f"the merged model would hold NaN/inf values ({names}), so {output} was not written: "
            f"check that the base model is finite and the adapter fits its dtype"
        )


def merge_adapter_file(
    base_path: str | Path,
    adapter_path: str | Path,
    output: str | Path,
    quant: str | None = None,
    lora_alpha: float | None = None,
    log: Callable[[str], None] = lambda msg: None,
    overwrite: bool = False,
    pissa_init: str = "",
    kind: str = "",
) -> dict[str, Any]:
    """Merge ``adapter_path`` into ``base_path`` and write ``output`` atomically; returns a summary.

    ``quant`` None / "" means: what the sidecar records (none without a sidecar). ``lora_alpha`` is needed
    only for a LoRA file without sidecar (it overrides the sidecar's value when given). ``pissa_init``:
    RWKV-PEFT's init_pissa.pth when ``adapter_path`` is the rwkv-N.pth of an RWKV-PEFT PiSSA run.
    ``kind`` (RWKV-PEFT merge.py's --type, a key of MERGE_TYPES): the file must hold that kind.
    """
    from rwkv_disha.model.load import infer_config, load_state_dict, save_state_dict

    # output as given: "x/" is no file
    _check_paths(Path(base_path), Path(adapter_path), output, overwrite, pissa_init)
    base_path, adapter_path, output = Path(base_path), Path(adapter_path), Path(output)
    base = load_state_dict(base_path, what="base model")
    model_cfg = infer_config(base, source=str(base_path))  # refuses an adapter file given as the base
    file = open_adapter_file(adapter_path, lora_alpha=lora_alpha or None, pissa_init=pissa_init)
    _check_kind(file, kind, pissa_init)
    apply_lora_alpha(file, lora_alpha, log)  # refused for a kind it would not change
    quant = _resolve_quant(file, quant, log)
    with torch.no_grad():
        model = adapted_base(base, file, quant, model_cfg)
        merged = merged_state_dict(base, model)
    _refuse_non_finite(merged, output)
    save_state_dict(merged, output, what="merged model")
    described = file.cfg.describe()
    return {
        "adapter": described if quant == file.cfg.quant else f"{described} (merged with --quant {quant})",
        "layers": sum(1 for _ in adapter_modules(model)),
        "replaced": sum(1 for k in file.tensors if k in base and not is_state_key(k)),
        "states": sum(1 for k in file.tensors if is_state_key(k)),
        "keys": len(merged),
        "dtype": str(next(iter(base.values())).dtype).replace("torch.", ""),
        "quant": quant,
        "output": str(output),
    }


def _check_kind(file: AdapterFile, kind: str, pissa_init: str) -> None:
    """--type: refuse a file of another kind. An RWKV-PEFT PiSSA checkpoint without its init file reads as
    LoRA (the same tensor names), which is the likeliest way to get here: name the missing file."""
    if not kind or file.cfg.peft == kind:
        return
    if kind == "pissa" and file.cfg.peft == "lora" and not pissa_init:
        raise RWKVDishaError(
            f"--type pissa: {file.source} holds only lora_A / lora_B, so it reads as LoRA; an RWKV-PEFT "
            f"PiSSA checkpoint needs the run's initial factors: add --lora_init PROJ_DIR/init_pissa.pth"
        )
    raise RWKVDishaError(
        f"--type {kind}: {file.source} holds {file.cfg.describe()}, not {MERGE_TYPES[kind]}: give the "
        f"{MERGE_TYPES[kind]} checkpoint, or drop --type (the kind is read from the file)"
    )


def _one_input(cfg: Config) -> str:
    """The file to merge: --peft_checkpoint / --lora_checkpoint (any adapter file) or --state /
    --state_checkpoint (states)."""
    given = [
        f for f in ("peft_checkpoint", "lora_checkpoint", "state", "state_checkpoint") if getattr(cfg, f)
    ]
    if len(given) > 1:
        raise RWKVDishaError(
            f"give one of --{' / --'.join(given)}: an adapter trained with --train_state 1 holds its states "
            f"(give it as --peft_checkpoint); merge a separate state file into the merged model afterwards"
        )
    if given and given[0] in ("state", "state_checkpoint"):
        from rwkv_disha.adapters.adapter_file import open_adapter_file

        path = getattr(cfg, given[0])
        file = open_adapter_file(path)
        if file.cfg.peft != TimeState.peft:
            raise RWKVDishaError(
                f"--{given[0]} {path} holds {file.cfg.describe()}, not only initial states: "
                f"give it as --peft_checkpoint"
            )
    return getattr(cfg, given[0]) if given else ""


def run(cfg: Config) -> int:
    cfg.peft_checkpoint = _one_input(cfg)
    for flag in ("base_model", "peft_checkpoint", "output"):
        if not getattr(cfg, flag):
            raise RWKVDishaError(
                f"--{flag} is required: rwkv-disha merge --base_model BASE.pth --peft_checkpoint rwkv-N.pth "
                f"--output merged.pth"
            )
    if not (math.isfinite(cfg.lora_alpha) and cfg.lora_alpha >= 0):
        raise RWKVDishaError(f"--lora_alpha must be > 0 (or 0: from the sidecar), got {cfg.lora_alpha:g}")
    info = merge_adapter_file(
        cfg.base_model,
        cfg.peft_checkpoint,
        cfg.output,
        quant=cfg.quant or None,
        lora_alpha=cfg.lora_alpha or None,
        log=print,
        overwrite=cfg.overwrite,
        pissa_init=cfg.lora_init,
        kind=cfg.type,
    )
    states = f", {info['states']} initial states" if info["states"] else ""
    print(
        f"merged {info['adapter']}: {info['layers']} layers, {info['replaced']} train_parts tensors{states} "
        f"-> {info['output']} ({info['keys']} tensors, {info['dtype']})"
    )
    return 0
