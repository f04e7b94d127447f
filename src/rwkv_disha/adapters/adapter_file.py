"""The adapter file format, in one place: save, read, validate, infer settings, load into a model
(docs/ADAPTERS.md, "Files").

    rwkv-N.pth    {"blocks.0.att.key.disha": (r, out), ..., "blocks.0.ln1.weight": (C,), ...}
                  exactly the adapter tensors + the --train_parts tensors, official names: RWKV-PEFT's
                  merge scripts and ours read it alike.
    rwkv-N.json   {"format": "rwkv-disha-adapter", "adapter": {peft, mode, r, ...}, "weight_dtype": ...,
                   "base": {"shape": {...}, "hash": ..., "checksums": {...}}}     (fingerprint.py)

Train saves through :func:`save_adapter_file`; train (``load``), generate, eval and merge read through
:func:`open_adapter_file` and :func:`load_adapter_file`, so every reader refuses the same bad files with the
same message.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from rwkv_disha.adapters.base import adapter_modules
from rwkv_disha.adapters.config import DEFAULT_TARGETS, AdapterConfig
from rwkv_disha.adapters.fingerprint import base_fingerprint, check_fingerprint, check_fingerprint_types
from rwkv_disha.adapters.inject import adapter_parameters, train_part_parameters
from rwkv_disha.adapters.pissa import with_rwkv_peft_init
from rwkv_disha.adapters.registry import ADAPTER_KINDS
from rwkv_disha.adapters.state import TimeState, is_state_key, time_state_parameters
from rwkv_disha.choices import TRAIN_PARTS
from rwkv_disha.errors import RWKVDishaError
from rwkv_disha.fsio import atomic_write_files, json_text, text_writer
from rwkv_disha.train.checks import check_lora_scale

Tensor = torch.Tensor

SIDECAR_FORMAT = "rwkv-disha-adapter"
SIDECAR_VERSION = 1


def sidecar_path(path: str | Path) -> Path:
    """``out/rwkv-3.pth`` -> ``out/rwkv-3.json``."""
    return Path(path).with_suffix(".json")


def _list(names: Iterable[str], n: int = 3) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def adapter_suffixes() -> tuple[str, ...]:
    """Every registered kind's parameter names: the key suffixes that mark adapter tensors in a file."""
    return tuple(dict.fromkeys(n for cls in ADAPTER_KINDS.values() for n in cls.adapter_names))


# RWKV-PEFT named the DiSHA parameter ``bone`` before it became ``disha`` (its ``--peft bone`` releases, late
# 2024 to early 2025): the same tensors, Bone (r, out) or Bat (in/r, r, r), under the old suffix
RWKV_PEFT_OLD_SUFFIXES = {"bone": "disha"}


def _current_names(tensors: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    """``blocks.0.att.key.bone`` -> ``blocks.0.att.key.disha``; other keys unchanged, order kept."""
    renamed: dict[str, Tensor] = {}
    for key, t in tensors.items():
        prefix, _, suffix = key.rpartition(".")
        new = RWKV_PEFT_OLD_SUFFIXES.get(suffix) if prefix else None
        name = f"{prefix}.{new}" if new else key
        if name != key and name in tensors:
            raise RWKVDishaError(f"{source} holds both {key} and {name}: it is not one adapter")
        renamed[name] = t
    return renamed


def _split_adapter_key(key: str) -> tuple[str, str] | None:
    """``blocks.0.att.key.disha`` -> (``blocks.0.att.key``, ``disha``); None for other tensors."""
    prefix, _, suffix = key.rpartition(".")
    return (prefix, suffix) if prefix and suffix in adapter_suffixes() else None


# ---------------------------------------------------------------------------------------------------------
# what is saved, and writing it
# ---------------------------------------------------------------------------------------------------------
def _saved_parameters(model: nn.Module, cfg: AdapterConfig) -> dict[str, nn.Parameter]:
    if cfg.peft == "none":
        return dict(model.named_parameters())
    # a states-only file loaded on top of another adapter (generate --peft_checkpoint --state) holds the
    # states alone: the layers' adapter tensors are the other file's
    layers = adapter_parameters(model) if cfg.adapts_layers else {}
    wanted = {**layers, **train_part_parameters(model, cfg.train_parts)}
    if cfg.train_state:
        wanted.update(time_state_parameters(model))
    return {name: p for name, p in model.named_parameters() if name in wanted}  # model order


def adapter_state_dict(model: nn.Module, cfg: AdapterConfig) -> dict[str, Tensor]:
    """Exactly what goes into ``rwkv-N.pth``: the adapter tensors plus the --train_parts tensors, under
    their official names, detached CPU copies (the RWKV-PEFT layout). ``peft none``: the whole model."""
    if cfg.peft == "none":
        return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    return {name: p.detach().to("cpu", copy=True) for name, p in _saved_parameters(model, cfg).items()}


def adapted_weight_dtype(model: nn.Module) -> str | None:
    """The dtype the adapted base weights had in training (recorded for ``merge --quant``)."""
    for _, m in adapter_modules(model):
        return str(m.weight_dtype).replace("torch.", "")
    return None


def adapter_sidecar(model: nn.Module, cfg: AdapterConfig, fingerprint: dict | None = None) -> dict[str, Any]:
    """The JSON sidecar of an adapter file: adapter settings, base fingerprint, adapted weights' dtype.
    Pass ``fingerprint`` when the model's base is no longer whole here (sharded or quantized later)."""
    return {
        "adapter": cfg.to_dict(),
        "base": fingerprint if fingerprint is not None else base_fingerprint(model),
        "weight_dtype": adapted_weight_dtype(model),
    }


def write_adapter_file(path: str | Path, tensors: Mapping[str, Tensor], sidecar: Mapping[str, Any]) -> Path:
    """Write ``tensors`` to ``path`` (.pth or .safetensors) and ``sidecar`` next to it, as one pair
    (:func:`fsio.atomic_write_files`): a failure or a crash leaves the old pair, or the new adapter without
    a sidecar (its settings then come from its tensors), never the new adapter beside an old sidecar that
    merge would trust. An OS error is one line naming the file. NaN / inf tensors are refused
    (RWKVDishaError) and nothing is written."""
    from rwkv_disha.model.load import state_dict_writer

    path = Path(path)
    # the last line of defence against a diverged run: never a NaN adapter under a final name
    _refuse_non_finite(tensors, f"the adapter to be saved as {path}")
    meta = {"format": SIDECAR_FORMAT, "format_version": SIDECAR_VERSION, **sidecar, "tensors": len(tensors)}
    atomic_write_files(
        [
            (path, state_dict_writer(dict(tensors), path), "adapter file"),
            (sidecar_path(path), text_writer(json_text(meta)), "adapter sidecar"),
        ]
    )
    return path


def save_adapter_file(model: nn.Module, cfg: AdapterConfig, path: str | Path) -> Path:
    """Write ``rwkv-N.pth`` (:func:`adapter_state_dict`) and its sidecar ``rwkv-N.json`` (adapter settings,
    base fingerprint). Returns the .pth path."""
    return write_adapter_file(path, adapter_state_dict(model, cfg), adapter_sidecar(model, cfg))


# ---------------------------------------------------------------------------------------------------------
# the sidecar: read and type-check
# ---------------------------------------------------------------------------------------------------------
_SETTING_TYPES: dict[str, tuple[type, ...]] = {
    "peft": (str,),
    "mode": (str,),
    "r": (int,),
    "lora_alpha": (int, float),
    "lora_dropout": (int, float),
    "quant": (str,),
}


def _check_setting_types(settings: Mapping[str, Any], side: Path) -> None:
    """Refuse sidecar settings of the wrong JSON type, one line naming the key (before they reach code)."""
    fix = "restore it from the training run, or move it away (settings are then read from the tensors)"
    for key, value in settings.items():
        if key in _SETTING_TYPES:
            ok = isinstance(value, _SETTING_TYPES[key]) and not isinstance(value, bool)
        elif key == "train_state":
            ok = isinstance(value, bool)
        elif key in ("targets", "train_parts"):
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        else:
            continue  # unknown keys are ignored: a later version may add settings
        if not ok:
            raise RWKVDishaError(f"adapter sidecar {side} has a bad {key!r} ({value!r}): {fix}")


def read_sidecar(path: str | Path) -> dict[str, Any] | None:
    """The type-checked sidecar of adapter file ``path``, or None when there is none (RWKV-PEFT files)."""
    side = sidecar_path(path)
    if not side.is_file():
        return None
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise RWKVDishaError(
            f"adapter sidecar {side} is not valid JSON ({str(e).splitlines()[0]}): delete it or restore it"
        ) from None
    except OSError as e:
        raise RWKVDishaError(f"cannot read adapter sidecar {side}: {e.strerror or e}") from None
    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
        raise RWKVDishaError(
            f"{side} is not an rwkv-disha adapter sidecar: move it away from {Path(path).name} "
            f"(then the adapter settings are read from the tensor shapes)"
        )
    if not isinstance(meta.get("adapter"), dict):
        raise RWKVDishaError(
            f"adapter sidecar {side} has no 'adapter' settings object (got {meta.get('adapter')!r}): "
            f"restore it from the training run, or move it away"
        )
    _check_setting_types(meta["adapter"], side)
    if meta.get("base") is not None:
        check_fingerprint_types(meta["base"], f"adapter sidecar {side}")
    if not isinstance(meta.get("weight_dtype"), (str, type(None))):
        raise RWKVDishaError(f"adapter sidecar {side} has a bad 'weight_dtype' ({meta['weight_dtype']!r})")
    return meta


# ---------------------------------------------------------------------------------------------------------
# settings from the tensors alone (RWKV-PEFT files have no sidecar)
# ---------------------------------------------------------------------------------------------------------
def _adapter_kind_of(layers: Mapping[str, Mapping[str, Tensor]], source: str):
    """(kind class, r) from per-layer adapter tensors {layer: {suffix: tensor}}; asks each kind in turn."""
    present = {s for tensors in layers.values() for s in tensors}
    families = [names for names in dict.fromkeys(c.adapter_names for c in ADAPTER_KINDS.values())]
    family = next((names for names in families if present <= set(names)), None)
    if family is None:
        raise RWKVDishaError(f"{source} mixes the tensors of several adapter kinds: it is not one adapter")
    incomplete = [f"{p}.{s}" for p, t in layers.items() for s in family if s not in t]
    if incomplete:
        raise RWKVDishaError(f"{source} has unpaired adapter tensors (lacks {_list(incomplete)})")
    candidates = [c for c in ADAPTER_KINDS.values() if c.adapter_names == family]
    for cls in candidates:
        ranks = {cls.rank_from_tensors(tensors) for tensors in layers.values()}
        if None in ranks:
            continue
        if len(ranks) != 1:
            raise RWKVDishaError(
                f"{source} mixes ranks {sorted(ranks)}: one adapter file must use a single r"
            )
        return cls, ranks.pop()
    shapes = sorted({tuple(t.shape) for tensors in layers.values() for t in tensors.values()})
    layouts = ", ".join(c.tensor_layout for c in candidates)
    raise RWKVDishaError(f"{source} has adapter tensors of unexpected shapes ({shapes}): {layouts}")


def infer_adapter_config(
    tensors: Mapping[str, Tensor], lora_alpha: float | None = None, source: str = "adapter file"
) -> AdapterConfig:
    """Adapter settings from tensor names and shapes alone: each kind reads its r back from its tensors
    (``disha`` (r, out) -> Bone, (in/r, r, r) -> Bat, ``lora_A`` (r, in) -> LoRA, whose alpha is not in the
    file: pass ``lora_alpha``). Every other tensor must be a --train_parts tensor."""
    layers: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        if split := _split_adapter_key(key):
            layers.setdefault(split[0], {})[split[1]] = t
    states = [k for k in tensors if is_state_key(k)]
    if states and not layers:  # a state file (--peft state): the states and nothing else
        others = [k for k in tensors if not is_state_key(k)]
        if others:
            raise RWKVDishaError(
                f"{source} holds initial states and other tensors ({_list(others)}): it is not a state file"
            )
        return AdapterConfig(peft=TimeState.peft)
    if not layers:
        names = " or ".join(f"*.{s}" for s in adapter_suffixes())
        raise RWKVDishaError(
            f"{source} holds no {names} tensors nor initial states: pass an adapter or state file "
            f"(rwkv-N.pth from training), not a base model"
        )
    kind, r = _adapter_kind_of(layers, source)
    targets: list[str] = []
    for prefix in layers:
        target = re.sub(r"^(.*\.)?blocks\.\d+\.", "", prefix)
        if target not in targets:
            targets.append(target)
    targets = [t for t in DEFAULT_TARGETS if t in targets] + [t for t in targets if t not in DEFAULT_TARGETS]
    others = [k for k in tensors if not _split_adapter_key(k) and not is_state_key(k)]
    unknown = [k for k in others if not any(part in k for part in TRAIN_PARTS)]
    if unknown:
        raise RWKVDishaError(
            f"{source} holds tensors that are neither adapter nor --train_parts tensors "
            f"({_list(unknown)}): it is not an adapter checkpoint"
        )
    return AdapterConfig(
        peft=kind.peft,
        r=r,
        targets=targets,
        train_parts=[p for p in TRAIN_PARTS if any(p in k for k in others)],
        train_state=bool(states),
        **kind.settings_without_sidecar(lora_alpha, source),
    )


# ---------------------------------------------------------------------------------------------------------
# reading a file
# ---------------------------------------------------------------------------------------------------------
@dataclass
class AdapterFile:
    """An adapter file read and checked: its tensors, its sidecar (None for RWKV-PEFT files), its settings."""

    path: Path
    tensors: dict[str, Tensor]
    meta: dict[str, Any] | None
    cfg: AdapterConfig

    @property
    def source(self) -> str:
        return f"adapter file {self.path}"

    @property
    def weight_dtype(self) -> torch.dtype | None:
        """The dtype the adapted base weights had in training (None when unknown)."""
        dtype = getattr(torch, str((self.meta or {}).get("weight_dtype")), None)
        return dtype if isinstance(dtype, torch.dtype) else None


def _refuse_non_finite(tensors: Mapping[str, Tensor], source: str) -> None:
    """Every trained tensor is floating point and finite."""
    from rwkv_disha.model.load import non_finite_names

    ints = [f"{k} ({t.dtype})" for k, t in tensors.items() if not t.is_floating_point()]
    if ints:
        raise RWKVDishaError(
            f"{source} holds non-float tensors ({_list(ints)}): trained weights are float, so the file is "
            f"damaged or not an adapter"
        )
    bad = non_finite_names(tensors)  # all floating point: checked above
    if bad:
        raise RWKVDishaError(
            f"{source} holds non-finite weights (NaN/inf) in {_list(bad)}: probably from a diverged run; "
            f"use an earlier rwkv-N.pth, or retrain with a lower --lr_init / gradient clipping"
        )


def _sidecar_config(tensors: Mapping[str, Tensor], meta: Mapping[str, Any], source: str) -> AdapterConfig:
    """The sidecar's settings, refused when they are not valid or do not describe these tensors."""
    try:
        cfg = AdapterConfig.from_dict(meta["adapter"])
    except RWKVDishaError as e:
        raise RWKVDishaError(f"the .json sidecar of {source} holds bad settings ({e})") from None
    if cfg.peft != "none":
        shapes_cfg = infer_adapter_config(tensors, lora_alpha=cfg.lora_alpha, source=source)
        if not shapes_cfg.same_adapter(cfg):
            raise RWKVDishaError(
                f"{source} holds {shapes_cfg.describe()} tensors but its .json sidecar says "
                f"{cfg.describe()}: the sidecar belongs to another file; move it away"
            )
    return cfg


def open_adapter_file(path: str | Path, lora_alpha: float | None = None, pissa_init: str = "") -> AdapterFile:
    """Read adapter file ``path`` (.pth memory-mapped) and its sidecar, and work out its settings: from
    the sidecar, else from the tensor shapes (``lora_alpha`` is then needed for LoRA). ``pissa_init``:
    RWKV-PEFT's init_pissa.pth, which completes the rwkv-N.pth of its PiSSA runs into one PiSSA adapter.
    Refuses, one line each: a missing or unreadable file, a bad sidecar, NaN/inf values, tensors that are
    not an adapter, an init file that does not belong to ``path``."""
    from rwkv_disha.adapters.peft_folder import WEIGHTS_NAME, is_peft_folder, open_peft_folder
    from rwkv_disha.model.load import load_state_dict

    path = Path(path)
    if path.name == WEIGHTS_NAME and is_peft_folder(path.parent):
        path = path.parent  # its settings are in the folder's adapter_config.json: not from shapes
    source = f"adapter file {path}"
    if pissa_init and (is_peft_folder(path) or sidecar_path(path).is_file()):
        raise RWKVDishaError(
            f"{source} is not an RWKV-PEFT checkpoint (it has {'peft' if is_peft_folder(path) else 'our'} "
            f"settings beside it): the PiSSA init file {pissa_init} completes RWKV-PEFT's PiSSA files only; "
            f"drop it"
        )
    if is_peft_folder(path):  # a Hugging Face peft folder: the same AdapterFile, from peft's names
        return open_peft_folder(path)
    tensors = _current_names(load_state_dict(path, what="adapter"), source)
    if pissa_init:
        init = load_state_dict(pissa_init, what="PiSSA init")
        tensors = with_rwkv_peft_init(tensors, init, source, f"the PiSSA init file {pissa_init}")
    _refuse_non_finite(tensors, source)  # first: a diverged run is the likeliest story of a NaN file
    meta = read_sidecar(path)
    cfg = (
        _sidecar_config(tensors, meta, source)
        if meta is not None
        else infer_adapter_config(tensors, lora_alpha=lora_alpha, source=source)
    )
    return AdapterFile(path, tensors, meta, cfg)


def reads_lora_alpha(cfg: AdapterConfig) -> bool:
    """Whether adapters of ``cfg``'s kind scale by lora_alpha (LoRA: its flag has the key; PiSSA, Bone...
    do not)."""
    return cfg.adapts_layers and any(
        field == "lora_alpha" for field, _, _ in cfg.layer_class.cli_keys.values()
    )


def apply_lora_alpha(file: AdapterFile, lora_alpha: float | None, log) -> None:
    """A --lora_alpha given to a reader of ``file`` (generate, eval, export): for LoRA it replaces the
    sidecar's value, with the notice merge prints; any other kind is refused, since the flag would change
    nothing. ``lora_alpha`` None / 0: nothing given."""
    if not lora_alpha:
        return
    if not reads_lora_alpha(file.cfg):
        raise RWKVDishaError(
            f"--lora_alpha {lora_alpha:g} scales LoRA adapters, but {file.source} holds "
            f"{file.cfg.describe()}: drop --lora_alpha"
        )
    check_lora_scale("--lora_alpha", lora_alpha, file.cfg.r)
    if lora_alpha != file.cfg.lora_alpha:  # a file without sidecar already took it from the flag
        log(f"using --lora_alpha {lora_alpha:g} instead of the sidecar's {file.cfg.lora_alpha:g}")
        file.cfg.lora_alpha = float(lora_alpha)


def check_base(file: AdapterFile, base: nn.Module | Mapping[str, Tensor]) -> None:
    """Refuse a base (model or state dict) other than the one the sidecar's fingerprint records."""
    if file.meta is not None and file.meta.get("base"):
        check_fingerprint(file.meta["base"], base_fingerprint(base), file.source)


# ---------------------------------------------------------------------------------------------------------
# loading into a model
# ---------------------------------------------------------------------------------------------------------
def _check_same_settings(file: AdapterFile, cfg: AdapterConfig) -> None:
    if not file.cfg.same_adapter(cfg):
        raise RWKVDishaError(
            f"{file.source} holds {file.cfg.describe()} but the config asks for {cfg.describe()}: "
            f"set the same peft / mode / r as in training"
        )
    if file.meta is not None and cfg.adapts_layers:  # without sidecar the settings came from cfg
        cfg.layer_class.check_file_settings(file.cfg, cfg, file.source)


def _check_keys(file: AdapterFile, expected: Mapping[str, Tensor], cfg: AdapterConfig) -> None:
    """Missing, unexpected and mis-shaped tensors, each with the fix."""
    tensors, parts = file.tensors, " ".join(file.cfg.train_parts)
    unexpected = [k for k in tensors if k not in expected]
    if unexpected:
        fix = (
            "it adapts layers this config does not target: set the same targets as in training"
            if any(_split_adapter_key(k) for k in unexpected)
            else "it holds initial states (trained with --train_state 1): set --train_state 1"
            if any(is_state_key(k) for k in unexpected)
            else f"it holds base tensors outside --train_parts {' '.join(cfg.train_parts) or '(none)'}: "
            f"pass the --train_parts used in training ({parts})"
        )
        raise RWKVDishaError(f"{file.source} has unexpected tensors {_list(unexpected)}: {fix}")
    missing = [k for k in expected if k not in tensors]
    if missing:
        fix = (
            "it was trained on fewer target layers: set the same targets as in training"
            if any(_split_adapter_key(k) for k in missing)
            # a folder's modules_to_save named some of a part's modules; ours train and merge whole parts
            else f"its modules_to_save holds only some of the --train_parts {parts} modules, which are saved "
            f"whole here: save all of them in peft, or none"
            if (file.meta or {}).get("format") == "peft" and parts
            else f"pass the --train_parts used in training ({parts or 'none'})"
        )
        raise RWKVDishaError(f"{file.source} lacks tensors {_list(missing)}: {fix}")
    misshaped = [
        f"{k} {tuple(tensors[k].shape)} vs model {tuple(p.shape)}"
        for k, p in expected.items()
        if tuple(tensors[k].shape) != tuple(p.shape)
    ]
    if misshaped:
        raise RWKVDishaError(
            f"{file.source} does not fit this model ({_list(misshaped, 2)}): it was trained on a base "
            f"model of another shape; use that base model"
        )


def check_adapter_fits(
    file: AdapterFile, model: nn.Module, cfg: AdapterConfig, base: nn.Module | Mapping[str, Tensor]
) -> dict[str, nn.Parameter]:
    """Everything :func:`load_adapter_file` refuses, without loading: ``model`` injected with ``cfg`` (a
    meta-device one will do: only names and shapes are read), ``base`` the model or its state dict (for the
    sidecar's fingerprint). Returns the model's parameters the file fills, by name."""
    _check_same_settings(file, cfg)
    check_base(file, base)
    expected = _saved_parameters(model, cfg)
    _check_keys(file, expected, cfg)
    return expected


def load_adapter_file(model: nn.Module, source: str | Path | AdapterFile, cfg: AdapterConfig) -> list[str]:
    """Load every tensor of an adapter file (a path, or one :func:`open_adapter_file` read) into ``model``
    (already injected with ``cfg``), strictly. Returns the names loaded.

    Refuses, with one line naming the fix, besides what :func:`open_adapter_file` refuses: a file of another
    kind / mode / r / LoRA alpha than ``cfg``, a sidecar whose base fingerprint differs from ``model``, and
    missing, unexpected or mis-shaped tensors.
    """
    if cfg.adapts_layers and not any(True for _ in adapter_modules(model)):
        raise RWKVDishaError("load_adapter_file: the model has no adapter layers; call inject_adapters first")
    file = source if isinstance(source, AdapterFile) else open_adapter_file(source, cfg.lora_alpha)
    expected = check_adapter_fits(file, model, cfg, model)
    with torch.no_grad():
        for name, p in expected.items():
            p.copy_(file.tensors[name])
    return list(expected)
