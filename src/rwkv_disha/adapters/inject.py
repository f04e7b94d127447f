"""Put adapters into a model, choose what trains, and save / load adapter files.

    cfg = AdapterConfig.from_cli("disha", '{"mode":"bone","load":"","r":64}', "", ["time", "ln"], "none")
    inject_adapters(model, cfg)        # target nn.Linear -> BoneLinear / BatLinear / LoRALinear, in place
    mark_trainable(model, cfg)         # freeze all; adapter parameters + --train_parts tensors train
    if cfg.load: load_adapter_file(model, cfg.load, cfg)
    ...
    save_adapter_file(model, cfg, "out/rwkv-3.pth")   # rwkv-3.pth (RWKV-PEFT layout) + rwkv-3.json

Every check that depends only on the configuration and the model's shapes runs here, before training.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from rwkv_disha.adapters.base import AdapterLinear, adapter_modules
from rwkv_disha.adapters.bat import BatLinear
from rwkv_disha.adapters.bone import BoneLinear
from rwkv_disha.adapters.files import (
    base_fingerprint,
    check_fingerprint,
    read_adapter_file,
    write_adapter_file,
)
from rwkv_disha.adapters.lora import LoRALinear
from rwkv_disha.adapters.quant import check_quant_mode
from rwkv_disha.errors import RWKVDishaError

Tensor = torch.Tensor

PEFT_KINDS = ("disha", "lora", "none")
DISHA_MODES = ("bone", "bat")
# SPEC §3: the Linear layers RWKV-PEFT adapts in RWKV-7 (module name after ``blocks.N.``).
DEFAULT_TARGETS = ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value")
# --train_parts: substrings of base tensor names that also train (RWKV-PEFT semantics). In RWKV-7 "ln"
# selects every ln0/ln1/ln2/ln_x/ln_out weight and bias; "time" matches no RWKV-7 tensor.
TRAIN_PARTS = ("time", "ln", "emb", "head")
DEFAULT_TRAIN_PARTS = ("time", "ln")
ADAPTER_SUFFIXES = ("disha", "lora_A", "lora_B")

DISHA_EXAMPLE = '\'{"mode":"bone","load":"","r":64}\''
LORA_EXAMPLE = '\'{"lora_load":"","lora_r":8,"lora_alpha":32,"lora_dropout":0.01}\''


# ---------------------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------------------
def parse_train_parts(value: str | Iterable[str] | None) -> list[str]:
    """``time ln`` / ``["time","ln"]`` / ``'["time", "ln"]'`` / ``time,ln`` -> ``["time", "ln"]``."""
    if value is None:
        return list(DEFAULT_TRAIN_PARTS)
    text = value if isinstance(value, str) else " ".join(str(v) for v in value)
    parts: list[str] = []
    for token in re.split(r"[\s,]+", re.sub(r"[\[\]\"']", " ", text)):
        if token and token not in parts:
            parts.append(token)
    bad = [p for p in parts if p not in TRAIN_PARTS]
    if bad:
        raise RWKVDishaError(
            f"unknown --train_parts {', '.join(map(repr, bad))}: choose from {' '.join(TRAIN_PARTS)} "
            f"(e.g. --train_parts time ln)"
        )
    return parts


def _parse_json_option(flag: str, text: str | Mapping | None, example: str) -> dict[str, Any]:
    if text is None or (isinstance(text, str) and not text.strip()):
        return {}
    if isinstance(text, Mapping):
        return dict(text)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise RWKVDishaError(
            f"{flag} is not valid JSON ({e.msg} at char {e.pos} of {text!r}): write it like {example} "
            f"(double quotes inside, single quotes around it in the shell)"
        ) from None
    if not isinstance(value, dict):
        raise RWKVDishaError(f"{flag} must be a JSON object like {example}, got {text!r}")
    return value


def _take(options: dict[str, Any], flag: str, key: str, kind: type, default: Any) -> Any:
    value = options.get(key, default)
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise RWKVDishaError(f"{flag} {key} must be {kind.__name__}, got {value!r}")
    return value


@dataclass
class AdapterConfig:
    """What to adapt and how; built from RWKV-PEFT's flags by :meth:`from_cli`."""

    peft: str = "none"  # "disha" (Bone / Bat), "lora", or "none"
    mode: str = "bone"  # disha only: "bone" or "bat"
    r: int = 64  # disha r, or lora_r
    load: str = ""  # adapter file to start from ("" = fresh zero-init adapter)
    lora_alpha: float = 32.0
    lora_dropout: float = 0.01
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    train_parts: list[str] = field(default_factory=lambda: list(DEFAULT_TRAIN_PARTS))
    quant: str = "none"  # frozen base storage: none, int8, nf4, fp4

    def __post_init__(self) -> None:
        self.train_parts = parse_train_parts(self.train_parts)
        self.quant = check_quant_mode(self.quant)
        if self.peft not in PEFT_KINDS:
            hint = ' (Bone is --peft disha with "mode":"bone")' if self.peft == "bone" else ""
            raise RWKVDishaError(f"unknown --peft {self.peft!r}: use disha, lora or none{hint}")
        if self.peft == "none":
            if self.quant != "none":
                raise RWKVDishaError(
                    "--quant quantizes the frozen base under an adapter: add --peft disha or lora"
                )
            return
        flag = "--disha_config" if self.peft == "disha" else "--lora_config"
        key = "r" if self.peft == "disha" else "lora_r"
        if self.peft == "disha" and self.mode not in DISHA_MODES:
            raise RWKVDishaError(
                f'--disha_config mode {self.mode!r} is unknown: use "bone" or "bat" (e.g. {DISHA_EXAMPLE})'
            )
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise RWKVDishaError(f"{flag} {key} must be a positive integer, got {self.r!r}")
        if self.peft == "lora":
            if not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
                raise RWKVDishaError(f"--lora_config lora_alpha must be > 0, got {self.lora_alpha!r}")
            if not 0.0 <= self.lora_dropout < 1.0:
                raise RWKVDishaError(
                    f"--lora_config lora_dropout must be in [0, 1), got {self.lora_dropout!r}"
                )
        if isinstance(self.targets, str):
            self.targets = [t for t in re.split(r"[\s,]+", self.targets) if t]
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise RWKVDishaError(f"adapter targets must be module names like {' '.join(DEFAULT_TARGETS)}")

    @classmethod
    def from_cli(
        cls,
        peft: str = "none",
        disha_config: str | Mapping | None = "",
        lora_config: str | Mapping | None = "",
        train_parts: str | Iterable[str] | None = None,
        quant: str = "none",
        targets: Iterable[str] | None = None,
    ) -> AdapterConfig:
        """From RWKV-PEFT's flags: ``--peft disha --disha_config '{"mode":"bone","load":"","r":64}'``.

        Only the JSON of the chosen ``peft`` is read (the other may hold its default). Unknown JSON keys,
        wrong types, bad values and malformed JSON raise :class:`RWKVDishaError`.
        """
        peft = (peft or "none").strip().lower()
        common: dict[str, Any] = {"train_parts": parse_train_parts(train_parts), "quant": quant or "none"}
        if targets is not None:
            common["targets"] = list(targets)
        if peft == "disha":
            opts = _parse_json_option("--disha_config", disha_config, DISHA_EXAMPLE)
            _refuse_unknown("--disha_config", opts, ("mode", "load", "r"), DISHA_EXAMPLE)
            return cls(
                peft="disha",
                mode=_take(opts, "--disha_config", "mode", str, "bone").strip().lower(),
                r=_take(opts, "--disha_config", "r", int, 64),
                load=_take(opts, "--disha_config", "load", str, ""),
                **common,
            )
        if peft == "lora":
            opts = _parse_json_option("--lora_config", lora_config, LORA_EXAMPLE)
            known = ("lora_load", "lora_r", "lora_alpha", "lora_dropout")
            _refuse_unknown("--lora_config", opts, known, LORA_EXAMPLE)
            return cls(
                peft="lora",
                r=_take(opts, "--lora_config", "lora_r", int, 8),
                load=_take(opts, "--lora_config", "lora_load", str, ""),
                lora_alpha=_take(opts, "--lora_config", "lora_alpha", float, 32.0),
                lora_dropout=_take(opts, "--lora_config", "lora_dropout", float, 0.01),
                **common,
            )
        return cls(peft=peft, **common)

    def to_dict(self) -> dict[str, Any]:
        """The settings an adapter file's sidecar records (everything but ``load``)."""
        d = asdict(self)
        d.pop("load")
        return d

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> AdapterConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def describe(self) -> str:
        if self.peft == "disha":
            what = f"{self.mode.capitalize()} r={self.r}"
        elif self.peft == "lora":
            what = f"LoRA r={self.r} alpha={self.lora_alpha:g}"
        else:
            return "no adapter"
        q = f", base {self.quant}" if self.quant != "none" else ""
        return f"{what}{q}"


def _refuse_unknown(flag: str, opts: Mapping[str, Any], known: tuple[str, ...], example: str) -> None:
    unknown = sorted(set(opts) - set(known))
    if unknown:
        raise RWKVDishaError(
            f"{flag} has unknown key(s) {', '.join(unknown)}: known keys are {', '.join(known)} "
            f"(e.g. {example})"
        )


# ---------------------------------------------------------------------------------------------------------
# injection
# ---------------------------------------------------------------------------------------------------------
def _target_pattern(target: str) -> re.Pattern:
    if target.startswith("blocks."):  # a full module name: exactly that layer
        return re.compile(rf"(^|\.){re.escape(target)}$")
    return re.compile(rf"(^|\.)blocks\.\d+\.{re.escape(target)}$")


def find_targets(model: nn.Module, targets: Iterable[str]) -> dict[str, nn.Linear]:
    """The bias-free ``nn.Linear`` modules that ``targets`` name (e.g. ``att.key`` in every block)."""
    found: dict[str, nn.Linear] = {}
    modules = dict(model.named_modules())
    for target in targets:
        pattern = _target_pattern(target)
        hits = [name for name in modules if pattern.search(name)]
        if not hits:
            linears = sorted(
                {
                    re.sub(r"^.*?blocks\.\d+\.", "", n)
                    for n, m in modules.items()
                    if isinstance(m, nn.Linear) and ".blocks." in f".{n}"
                }
            )
            raise RWKVDishaError(
                f"adapter target {target!r} matches no layer of this model: use some of {' '.join(linears)}"
            )
        for name in hits:
            module = modules[name]
            if isinstance(module, AdapterLinear):
                raise RWKVDishaError(f"{name} already has an adapter: inject adapters once per model")
            if not isinstance(module, nn.Linear) or module.bias is not None:
                raise RWKVDishaError(
                    f"adapter target {name} is a {type(module).__name__}, not a bias-free nn.Linear: "
                    f"choose targets among the Linear layers ({' '.join(DEFAULT_TARGETS)})"
                )
            found[name] = module
    order = {name: i for i, name in enumerate(modules)}
    return dict(sorted(found.items(), key=lambda item: order[item[0]]))


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, max(1, min(n, limit)) + 1) if n % d == 0)


def check_shapes(cfg: AdapterConfig, shapes: Mapping[str, tuple[int, int]]) -> None:
    """Refuse an r that does not fit the (out, in) shape of every target layer (before any training)."""
    if cfg.peft == "none":
        return
    for name, (out_f, in_f) in shapes.items():
        if cfg.peft == "disha" and cfg.mode == "bone" and cfg.r > in_f:
            raise RWKVDishaError(
                f"Bone r={cfg.r} exceeds the input width {in_f} of {name}: "
                f"choose r <= {in_f} in --disha_config"
            )
        if cfg.peft == "lora" and cfg.r > min(in_f, out_f):
            raise RWKVDishaError(
                f"LoRA r={cfg.r} exceeds the smaller side {min(in_f, out_f)} of {name} ({out_f}x{in_f}): "
                f"choose a smaller lora_r"
            )
        if cfg.peft == "disha" and cfg.mode == "bat" and (in_f % cfg.r or out_f % cfg.r):
            g = math.gcd(*[d for shape in shapes.values() for d in shape])
            raise RWKVDishaError(
                f"Bat r={cfg.r} must divide both sides of every adapted layer, but {name} is {out_f}x{in_f} "
                f"(out x in): choose r dividing {g}, e.g. r={_largest_divisor_at_most(g, cfg.r)}, "
                f'or use "mode":"bone"'
            )


def make_adapter_layer(cfg: AdapterConfig, weight: Tensor) -> AdapterLinear:
    """The adapter layer ``cfg`` asks for, wrapping ``weight`` (out, in) without copying it."""
    if cfg.peft == "disha":
        return BoneLinear(weight, cfg.r) if cfg.mode == "bone" else BatLinear(weight, cfg.r)
    if cfg.peft == "lora":
        return LoRALinear(weight, cfg.r, cfg.lora_alpha, cfg.lora_dropout)
    raise RWKVDishaError("no adapter layer for --peft none")


def inject_adapters(model: nn.Module, cfg: AdapterConfig) -> list[str]:
    """Replace the target Linears of ``model`` by adapter layers, in place; returns their names.

    Base weights keep their names (``blocks.0.att.key.weight``); with ``cfg.quant`` they are stored
    quantized. All shapes are checked before the first layer is replaced. Loading ``cfg.load`` is left to
    :func:`load_adapter_file` (after :func:`mark_trainable` or before: either order works).
    """
    if cfg.peft == "none":
        return []
    linears = find_targets(model, cfg.targets)
    check_shapes(cfg, {name: tuple(m.weight.shape) for name, m in linears.items()})
    for name, linear in linears.items():
        layer = make_adapter_layer(cfg, linear.weight.data)
        if cfg.quant != "none":
            layer.quantize_base(cfg.quant)
        model.set_submodule(name, layer)
    return list(linears)


# ---------------------------------------------------------------------------------------------------------
# what trains, what is saved
# ---------------------------------------------------------------------------------------------------------
def train_part_parameters(model: nn.Module, train_parts: Iterable[str]) -> dict[str, nn.Parameter]:
    """Base parameters whose name contains a --train_parts substring (adapter layers' weights excluded)."""
    parts = list(train_parts)
    in_adapters = {id(p) for _, m in adapter_modules(model) for p in m.parameters()}
    return {
        name: p
        for name, p in model.named_parameters()
        if id(p) not in in_adapters and any(part in name for part in parts)
    }


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every adapter parameter by full name (``blocks.0.att.key.disha``), found by walking adapter layers."""
    return {
        f"{mname}.{pname}": p
        for mname, m in adapter_modules(model)
        for pname, p in m.adapter_parameters().items()
    }


def mark_trainable(model: nn.Module, cfg: AdapterConfig) -> list[str]:
    """Freeze everything, then unfreeze the adapter parameters and the --train_parts tensors.

    With ``peft == "none"`` (full fine-tuning) everything trains. Returns the trainable names.
    """
    if cfg.peft == "none":
        model.requires_grad_(True)
        return [name for name, _ in model.named_parameters()]
    model.requires_grad_(False)
    trainable = {**adapter_parameters(model), **train_part_parameters(model, cfg.train_parts)}
    if not any(True for _ in adapter_modules(model)):
        raise RWKVDishaError("mark_trainable found no adapter layers: call inject_adapters(model, cfg) first")
    for p in trainable.values():
        p.requires_grad_(True)
    return list(trainable)


def _saved_parameters(model: nn.Module, cfg: AdapterConfig) -> dict[str, nn.Parameter]:
    if cfg.peft == "none":
        return dict(model.named_parameters())
    wanted = {**adapter_parameters(model), **train_part_parameters(model, cfg.train_parts)}
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


def save_adapter_file(model: nn.Module, cfg: AdapterConfig, path: str | Path) -> Path:
    """Write ``rwkv-N.pth`` (:func:`adapter_state_dict`) and its sidecar ``rwkv-N.json`` (adapter settings,
    base fingerprint), each atomically. Returns the .pth path."""
    return write_adapter_file(path, adapter_state_dict(model, cfg), adapter_sidecar(model, cfg))


def file_adapter_config(
    tensors: Mapping[str, Tensor], meta: Mapping[str, Any] | None, lora_alpha: float | None, source: str
) -> AdapterConfig:
    """An adapter file's settings: from its sidecar, else (RWKV-PEFT files) from the tensor shapes."""
    if meta is not None:
        return AdapterConfig.from_dict(meta["adapter"])
    return infer_adapter_config(tensors, lora_alpha=lora_alpha, source=source)


# ---------------------------------------------------------------------------------------------------------
# reading adapter files
# ---------------------------------------------------------------------------------------------------------
def _split_adapter_key(key: str) -> tuple[str, str] | None:
    prefix, _, suffix = key.rpartition(".")
    return (prefix, suffix) if prefix and suffix in ADAPTER_SUFFIXES else None


def infer_adapter_config(
    tensors: Mapping[str, Tensor], lora_alpha: float | None = None, source: str = "adapter file"
) -> AdapterConfig:
    """Adapter settings from tensor names and shapes alone (RWKV-PEFT files have no sidecar).

    ``disha`` (r, out) -> Bone r; ``disha`` (in/r, r, r) -> Bat r; ``lora_A`` (r, in) -> LoRA r (its alpha
    is not in the file: pass ``lora_alpha``). Other tensors must be --train_parts tensors.
    """
    adapter = {k: v for k, v in tensors.items() if _split_adapter_key(k)}
    if not adapter:
        raise RWKVDishaError(
            f"{source} holds no *.disha or *.lora_A/lora_B tensors: pass an adapter checkpoint "
            f"(rwkv-N.pth from training), not a base model"
        )
    suffixes = {_split_adapter_key(k)[1] for k in adapter}
    if "disha" in suffixes and suffixes & {"lora_A", "lora_B"}:
        raise RWKVDishaError(f"{source} mixes DiSHA and LoRA tensors: it is not a single adapter checkpoint")
    kwargs: dict[str, Any] = {}
    if "disha" in suffixes:
        ndims = {v.dim() for v in adapter.values()}
        if ndims == {2}:
            mode, ranks = "bone", {v.shape[0] for v in adapter.values()}
        elif ndims == {3} and all(v.shape[1] == v.shape[2] for v in adapter.values()):
            mode, ranks = "bat", {v.shape[1] for v in adapter.values()}
        else:
            shapes = sorted({tuple(v.shape) for v in adapter.values()})
            raise RWKVDishaError(
                f"{source} has *.disha tensors of unexpected shapes ({shapes}): "
                f"Bone tensors are (r, out), Bat tensors (in/r, r, r)"
            )
        kwargs.update(peft="disha", mode=mode)
    else:
        missing_b = [k for k in adapter if k.endswith(".lora_A") and k[: -len("A")] + "B" not in adapter]
        missing_a = [k for k in adapter if k.endswith(".lora_B") and k[: -len("B")] + "A" not in adapter]
        if missing_a or missing_b:
            raise RWKVDishaError(
                f"{source} has unpaired LoRA tensors ({', '.join((missing_a + missing_b)[:3])})"
            )
        ranks = {v.shape[0] for k, v in adapter.items() if k.endswith(".lora_A")}
        if lora_alpha is None:
            raise RWKVDishaError(
                f"{source} is a LoRA checkpoint without its .json sidecar, so lora_alpha is unknown: pass "
                f"--lora_alpha (the value used in training, RWKV-PEFT's default is 32)"
            )
        kwargs.update(peft="lora", lora_alpha=float(lora_alpha), lora_dropout=0.0)
    if len(ranks) != 1:
        raise RWKVDishaError(f"{source} mixes ranks {sorted(ranks)}: one adapter file must use a single r")
    kwargs["r"] = ranks.pop()
    targets: list[str] = []
    for k in adapter:
        target = re.sub(r"^(.*\.)?blocks\.\d+\.", "", _split_adapter_key(k)[0])
        if target not in targets:
            targets.append(target)
    kwargs["targets"] = [t for t in DEFAULT_TARGETS if t in targets] + [
        t for t in targets if t not in DEFAULT_TARGETS
    ]
    others = [k for k in tensors if k not in adapter]
    unknown = [k for k in others if not any(part in k for part in TRAIN_PARTS)]
    if unknown:
        raise RWKVDishaError(
            f"{source} holds tensors that are neither adapter nor --train_parts tensors "
            f"({_list(unknown)}): it is not an adapter checkpoint"
        )
    kwargs["train_parts"] = [p for p in TRAIN_PARTS if any(p in k for k in others)]
    return AdapterConfig(**kwargs)


def _same_adapter(a: AdapterConfig, b: AdapterConfig) -> bool:
    if a.peft != b.peft or a.r != b.r:
        return False
    return a.mode == b.mode if a.peft == "disha" else True


def _list(names: Iterable[str], n: int = 3) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def load_adapter_file(model: nn.Module, path: str | Path, cfg: AdapterConfig) -> list[str]:
    """Load every tensor of an adapter file into ``model`` (already injected with ``cfg``), strictly.

    Refuses, with one line naming the fix: a file of another adapter kind / mode / r, a sidecar whose
    base fingerprint differs from ``model``, and missing, unexpected or mis-shaped tensors. Accepts
    RWKV-PEFT files (no sidecar). Returns the names loaded.
    """
    path = Path(path)
    if cfg.peft != "none" and not any(True for _ in adapter_modules(model)):
        raise RWKVDishaError("load_adapter_file: the model has no adapter layers; call inject_adapters first")
    tensors, meta = read_adapter_file(path)
    file_cfg = file_adapter_config(tensors, meta, cfg.lora_alpha, f"adapter file {path}")
    if not _same_adapter(file_cfg, cfg):
        raise RWKVDishaError(
            f"adapter file {path} holds {file_cfg.describe()} but the config asks for {cfg.describe()}: "
            f"set the same peft / mode / r as in training"
        )
    if cfg.peft == "lora" and meta is not None and file_cfg.lora_alpha != cfg.lora_alpha:
        raise RWKVDishaError(
            f"adapter file {path} was trained with lora_alpha {file_cfg.lora_alpha:g}, the config says "
            f"{cfg.lora_alpha:g}: set lora_alpha to {file_cfg.lora_alpha:g}"
        )
    if meta is not None and meta.get("base"):
        check_fingerprint(meta["base"], base_fingerprint(model), f"adapter file {path}")

    expected = _saved_parameters(model, cfg)
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if unexpected:
        adapter_like = [k for k in unexpected if _split_adapter_key(k)]
        fix = (
            "it adapts layers this config does not target: set the same targets as in training"
            if adapter_like
            else f"it holds base tensors outside --train_parts {' '.join(cfg.train_parts) or '(none)'}: "
            f"pass the --train_parts used in training ({' '.join(file_cfg.train_parts)})"
        )
        raise RWKVDishaError(f"adapter file {path} has unexpected tensors {_list(unexpected)}: {fix}")
    if missing:
        adapter_like = [k for k in missing if _split_adapter_key(k)]
        fix = (
            "it was trained on fewer target layers: set the same targets as in training"
            if adapter_like
            else f"pass the --train_parts used in training ({' '.join(file_cfg.train_parts) or 'none'})"
        )
        raise RWKVDishaError(f"adapter file {path} lacks tensors {_list(missing)}: {fix}")
    misshaped = [
        f"{k} {tuple(tensors[k].shape)} vs model {tuple(p.shape)}"
        for k, p in expected.items()
        if tuple(tensors[k].shape) != tuple(p.shape)
    ]
    if misshaped:
        raise RWKVDishaError(
            f"adapter file {path} does not fit this model ({_list(misshaped, 2)}): it was trained on a base "
            f"model of another shape; use that base model"
        )
    with torch.no_grad():
        for name, p in expected.items():
            p.copy_(tensors[name])
    return list(expected)
