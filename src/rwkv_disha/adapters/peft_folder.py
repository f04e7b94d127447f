"""Hugging Face peft adapter folders, in and out (docs/MIGRATING.md, "peft folders").

    adapter_config.json        {"peft_type": "MISS" | "LORA", "r": 8, "init_weights": true | "bat" | "mini",
                                "mini_r": .., "lora_alpha": .., "target_modules": [..], "modules_to_save": ..}
    adapter_model.safetensors  base_model.model.blocks.0.att.key.miss_block             MiSS (any mode)
                               base_model.model.blocks.0.att.key.lora_A.weight (r, in)  LoRA
                               base_model.model.blocks.0.att.key.lora_B.weight (out, r)
                               base_model.model.blocks.0.ln1.weight (C,)   modules_to_save (our train_parts)

Reading turns a folder into the same :class:`AdapterFile` an ``rwkv-N.pth`` gives (MiSS balance -> Bone
``disha``, MiSS bat / mini -> ``miss_block``, LoRA -> ``lora_A`` / ``lora_B``), so merge, generate, eval and
train read both alike. Writing does the reverse; PiSSA is written as the plain LoRA of rank 2r with the same
ΔW, and RWKV-PEFT's Bat (indexed by input block) has no peft form. A config whose r, mini_r, lora_alpha
or target_modules disagree with the tensors (or are not numbers / names) is refused, as peft would build
another adapter from it; so is any field that builds another model in peft (DoRA, an init_lora_weights that
rewrote the base, a LoRA variant). The adapted layers are kept by full name: peft may adapt some blocks only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from rwkv_disha.errors import RWKVDishaError

Tensor = torch.Tensor

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
# modules_to_save that hold our --train_parts "ln" tensors in RWKV-7 (module names, peft's suffix rule)
LN_MODULES = ("ln0", "ln1", "ln2", "ln_x", "ln_out")
# init_lora_weights (besides true / false) that leave the base weight as it is; the others (pissa*, olora,
# corda, loftq, lora_ga) start LoRA by rewriting W into a residual the folder does not hold
LORA_INITS_KEEPING_THE_BASE = ("gaussian", "eva", "orthogonal", "mica")
# config fields read below, and fields that change nothing the tensors mean (bookkeeping, training-only
# settings, which layers: the tensors say that); any other field set (a LoRA variant such as lora_bias,
# alora_invocation_tokens, layer_replication, arrow_config) builds another model in peft: refused
READ_FIELDS = {
    "peft_type", "r", "lora_alpha", "init_weights", "init_lora_weights", "mini_r", "target_modules",
    "modules_to_save", "bias", "use_dora", "use_rslora", "fan_in_fan_out", "rank_pattern", "alpha_pattern",
}  # fmt: skip
INERT_FIELDS = {
    "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
    "lora_dropout", "miss_dropout", "exclude_modules", "layers_to_transform", "layers_pattern",
    "megatron_config", "megatron_core", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
    "qalora_group_size", "runtime_config", "ensure_weight_tying",
}  # fmt: skip


def is_peft_folder(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG_NAME).is_file()


def _read_config(folder: Path) -> dict[str, Any]:
    try:
        conf = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RWKVDishaError(f"{folder / CONFIG_NAME} is not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(conf, dict):
        raise RWKVDishaError(f"{folder / CONFIG_NAME} is not a peft adapter config (not a JSON object)")
    return conf


def _refuse(folder: Path, conf: dict[str, Any], key: str, ok, why: str) -> None:
    if key in conf and not ok(conf[key]):
        raise RWKVDishaError(f"peft folder {folder}: {key}={conf[key]!r} is not supported ({why})")


def _keeps_the_base(init: Any) -> bool:
    """Whether peft's LoRA ``init_lora_weights`` left the base weight as it is."""
    return isinstance(init, bool) or (isinstance(init, str) and init.lower() in LORA_INITS_KEEPING_THE_BASE)


def _agree(folder: Path, conf: dict[str, Any], key: str, want: int, what: str) -> None:
    """Refuse a config integer (when present) that is not an int equal to ``want``."""
    if key in conf and (type(conf[key]) is not int or conf[key] != want):
        raise RWKVDishaError(
            f"peft folder {folder}: {CONFIG_NAME} has {key} {conf[key]!r} but {what} is {want}: "
            f"fix it to {want} or use the matching weights"
        )


def _check_targets(folder: Path, conf: dict[str, Any], tensors: dict[str, Tensor], names: set[str]) -> None:
    """Refuse target_modules that do not name every adapted module (peft's rules: a regex string matched
    whole, or a list of names each matching the module name or its last dotted parts)."""
    targets = conf.get("target_modules")
    if targets is None:
        return
    modules = sorted({k.rpartition(".")[0] for k in tensors if k.rpartition(".")[2] in names})
    if isinstance(targets, str):
        try:
            missed = [m for m in modules if not re.fullmatch(targets, m)]
        except re.error:
            missed = modules
    elif isinstance(targets, list) and all(isinstance(t, str) for t in targets):
        missed = [m for m in modules if not any(m == t or m.endswith("." + t) for t in targets)]
    else:
        missed = modules
    if missed:
        raise RWKVDishaError(
            f"peft folder {folder}: target_modules {targets!r} does not name {', '.join(missed[:3])}, "
            f"which its weights adapt: fix target_modules in {CONFIG_NAME}"
        )


def open_peft_folder(folder: str | Path):
    """A peft adapter folder read and checked -> :class:`AdapterFile` in our names (MiSS or LoRA)."""
    from rwkv_disha.adapters.adapter_file import (
        AdapterFile,
        _refuse_non_finite,
        _split_adapter_key,
        infer_adapter_config,
    )
    from rwkv_disha.model.load import load_state_dict

    folder = Path(folder)
    source = f"peft folder {folder}"
    conf = _read_config(folder)
    ptype = str(conf.get("peft_type", "")).upper()
    if ptype not in ("MISS", "LORA"):
        raise RWKVDishaError(f"{source} holds a {ptype or 'untyped'} adapter: rwkv-disha reads MISS and LORA")
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise RWKVDishaError(
            f"{source} has no {WEIGHTS_NAME} (save it with save_pretrained(safe_serialization=True))"
        )
    _refuse(folder, conf, "bias", lambda v: v in (None, "none"), "RWKV Linears have no bias")
    _refuse(folder, conf, "use_dora", lambda v: not v, "DoRA is not an rwkv-disha kind")
    _refuse(folder, conf, "use_rslora", lambda v: not v, "scale alpha/sqrt(r); use plain LoRA")
    _refuse(folder, conf, "fan_in_fan_out", lambda v: not v, "RWKV Linears store (out, in)")
    _refuse(folder, conf, "rank_pattern", lambda v: not v, "one r per file")
    _refuse(folder, conf, "alpha_pattern", lambda v: not v, "one alpha per file")
    if ptype == "LORA":
        _refuse(
            folder,
            conf,
            "init_lora_weights",
            _keeps_the_base,
            "peft started it by rewriting the base weights into a residual, which the folder does not hold: "
            "save it from peft with save_pretrained(path_initial_model_for_weight_conversion=...), a plain "
            "LoRA of the released base",
        )
    for key in sorted(set(conf) - READ_FIELDS - INERT_FIELDS):
        _refuse(folder, conf, key, lambda v: not v, "rwkv-disha reads plain LoRA and MiSS adapters")
    raw = load_state_dict(weights, what="peft adapter")
    _refuse_non_finite(raw, source)
    mode = conf.get("init_weights", True) if ptype == "MISS" else None
    if mode is False:  # peft's balance mode started from random values instead of zeros: the same layer
        mode = True
    if ptype == "MISS" and mode not in (True, "bat", "mini"):
        raise RWKVDishaError(f'{source}: MiSS init_weights {mode!r} is unknown (true, "bat" or "mini")')
    tensors: dict[str, Tensor] = {}
    for key, t in raw.items():
        name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        name = re.sub(r"\.(lora_[AB])\.weight$", r".\1", name)
        if name.endswith(".miss_block") and mode is True:  # MiSS balance is Bone: miss_block (r, out) = disha
            name = name[: -len("miss_block")] + "disha"
        tensors[name] = t
    extra: dict[str, Any] = {}
    alpha = None
    if ptype == "LORA":
        alpha = conf.get("lora_alpha", 8)
        if type(alpha) not in (int, float) or not 0 < alpha < float("inf"):  # "16" or true: not a number
            raise RWKVDishaError(
                f"{source}: lora_alpha {alpha!r} must be a positive number: fix {CONFIG_NAME}"
            )
        alpha = float(alpha)
    cfg = infer_adapter_config(tensors, lora_alpha=alpha, source=source)
    # peft builds its layers from the config: a number that disagrees with the tensors means another
    # adapter than the one that would be used here (a LoRA r changes the scale alpha / r)
    _agree(folder, conf, "r", cfg.r, "the tensors' rank")
    if mode == "mini":
        blocks = [t for k, t in tensors.items() if k.endswith(".miss_block")]
        extra["mini_r"] = int(blocks[0].shape[1]) if blocks else 1
        _agree(folder, conf, "mini_r", extra["mini_r"], "the miss_block width (dim 1)")
    _check_targets(folder, conf, tensors, set(cfg.layer_class.adapter_names))
    if ptype == "MISS" and cfg.mode != {True: "bone", "bat": "miss_bat", "mini": "miss_mini"}[mode]:
        raise RWKVDishaError(f"{source}: init_weights {mode!r} does not match its tensors ({cfg.describe()})")
    for k, v in extra.items():
        setattr(cfg, k, v)
    # the exact layers, by full name: peft can adapt some blocks only (layers_to_transform, full-name or
    # regex target_modules), which module names without the block would extend to every block
    cfg.targets = list(dict.fromkeys(split[0] for k in tensors if (split := _split_adapter_key(k))))
    meta = {"format": "peft", "adapter": cfg.to_dict(), "base": None, "weight_dtype": None}
    return AdapterFile(folder, tensors, meta, cfg)


def peft_tensors_and_config(tensors: dict[str, Tensor], cfg) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Our adapter tensors + settings -> (peft's safetensors dict, adapter_config.json dict)."""
    from rwkv_disha.adapters.pissa import pissa_as_lora

    kind = cfg.layer_class.kind
    layers: dict[str, dict[str, Tensor]] = {}
    others: dict[str, Tensor] = {}
    names = set(cfg.layer_class.adapter_names)
    for key, t in tensors.items():
        prefix, _, suffix = key.rpartition(".")
        if suffix in names:
            layers.setdefault(prefix, {})[suffix] = t
        else:
            others[key] = t
    if kind == "bat":
        raise RWKVDishaError(
            "RWKV-PEFT's Bat (disha indexed by input block) has no peft equivalent (peft's MiSS bat indexes "
            "by output block): merge it with rwkv-disha merge instead"
        )
    targets = sorted({re.sub(r"^blocks\.\d+\.", "", p) for p in layers})
    if any(t.startswith("blocks.") for t in cfg.targets):  # some blocks only (read from a peft folder)
        targets = list(layers)
    conf: dict[str, Any] = {
        "base_model_name_or_path": None,
        "bias": "none",
        "inference_mode": True,
        "target_modules": targets,
        "modules_to_save": sorted({m for k in others for m in LN_MODULES if f".{m}." in f".{k}"}) or None,
        "task_type": None,
        "revision": None,
    }
    out: dict[str, Tensor] = {}
    if kind in ("bone", "miss_bat", "miss_mini"):
        init = {"bone": True, "miss_bat": "bat", "miss_mini": "mini"}[kind]
        conf.update(peft_type="MISS", r=cfg.r, init_weights=init, mini_r=cfg.mini_r, miss_dropout=0.0)
        for p, t in layers.items():
            out[f"{PREFIX}{p}.miss_block"] = next(iter(t.values()))
    elif kind in ("lora", "pissa"):
        r, alpha = cfg.r, cfg.lora_alpha
        if kind == "pissa":  # the plain LoRA of rank 2r with the same ΔW; scale alpha / r' = 1
            layers = {p: pissa_as_lora(t) for p, t in layers.items()}
            r = alpha = 2 * cfg.r
        conf.update(
            peft_type="LORA", r=r, lora_alpha=alpha, lora_dropout=0.0, use_rslora=False, use_dora=False
        )
        conf.update(fan_in_fan_out=False, init_lora_weights=True)
        for p, t in layers.items():
            out[f"{PREFIX}{p}.lora_A.weight"] = t["lora_A"]
            out[f"{PREFIX}{p}.lora_B.weight"] = t["lora_B"]
    else:
        raise RWKVDishaError(f"{cfg.layer_class.title} adapters have no peft form: merge them instead")
    unsaved = [k for k in others if not any(f".{m}." in f".{k}" for m in LN_MODULES)]
    if unsaved:
        raise RWKVDishaError(
            f"the adapter also trains {', '.join(unsaved[:3])}, which a peft folder cannot hold "
            f"(only the ln tensors go to modules_to_save): merge it instead"
        )
    for k, t in others.items():
        out[f"{PREFIX}{k}"] = t
    return {k: v.detach().contiguous() for k, v in out.items()}, conf


def write_peft_folder(tensors: dict[str, Tensor], cfg, folder: str | Path) -> Path:
    """Write our adapter (tensors + settings) as a peft folder ``PeftModel.from_pretrained`` loads."""
    from rwkv_disha.fsio import atomic_write_json, atomic_write_safetensors

    folder = Path(folder)
    out, conf = peft_tensors_and_config(tensors, cfg)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_safetensors(folder / WEIGHTS_NAME, out, what="peft adapter weights")
    atomic_write_json(folder / CONFIG_NAME, conf, what="peft adapter config")
    return folder
