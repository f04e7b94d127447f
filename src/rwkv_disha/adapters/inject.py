"""Put adapters into a model and choose what trains (docs/ADAPTERS.md, "Configuration").

    cfg = AdapterConfig.from_cli("disha", '{"mode":"bone","load":"","r":64}', "", ["time", "ln"], "none")
    inject_adapters(model, cfg)        # target nn.Linear -> BoneLinear / BatLinear / LoRALinear, in place
    mark_trainable(model, cfg)         # freeze all; adapter parameters + --train_parts tensors train

Every check that depends only on the configuration and the model's shapes runs here, before training.
Reading and writing adapter files is ``adapter_file.py``'s job.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
import torch.nn as nn

from rwkv_disha.adapters.base import AdapterLinear, adapter_modules
from rwkv_disha.adapters.config import DEFAULT_TARGETS, AdapterConfig
from rwkv_disha.adapters.state import add_time_states, time_state_parameters
from rwkv_disha.errors import RWKVDishaError
from rwkv_disha.model.registry import adapter_targets

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------------------
# injection
# ---------------------------------------------------------------------------------------------------------
def _target_pattern(target: str) -> re.Pattern:
    if target.startswith("blocks."):  # a full module name: exactly that layer
        return re.compile(rf"(^|\.){re.escape(target)}$")
    if "." not in target:  # peft's rule: a bare name adapts every Linear whose last name it is
        return re.compile(rf"(^|\.)blocks\.\d+\.(.+\.)?{re.escape(target)}$")
    return re.compile(rf"(^|\.)blocks\.\d+\.{re.escape(target)}$")


def find_targets(model: nn.Module, targets: Iterable[str]) -> dict[str, nn.Linear]:
    """The bias-free ``nn.Linear`` modules that ``targets`` name (e.g. ``att.key`` in every block)."""
    found: dict[str, nn.Linear] = {}
    modules = dict(model.named_modules())
    for target in targets:
        pattern = _target_pattern(target)
        hits = [name for name in modules if pattern.search(name)]
        if not hits and target.rpartition(".")[2] in (
            "head",
            "emb",
        ):  # outside the blocks: whole or not at all
            raise RWKVDishaError(
                f"adapter target {target!r}: adapters go on the Linear layers inside the blocks, not on the "
                f"{target.rpartition('.')[2]}; train it whole with --train_parts {target.rpartition('.')[2]}"
            )
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


def make_adapter_layer(cfg: AdapterConfig, weight: Tensor) -> AdapterLinear:
    """The adapter layer ``cfg`` asks for, wrapping ``weight`` (out, in) without copying it."""
    if not cfg.adapts_layers:
        raise RWKVDishaError(f"no adapter layer for --peft {cfg.peft}")
    return cfg.layer_class.from_config(weight, cfg)


def inject_adapters(model: nn.Module, cfg: AdapterConfig) -> list[str]:
    """Replace the target Linears of ``model`` by adapter layers, in place; returns their names.

    Base weights keep their names (``blocks.0.att.key.weight``); with ``cfg.quant`` they are stored
    quantized. All shapes are checked before the first layer is replaced. Loading ``cfg.load`` is left to
    :func:`load_adapter_file` (after :func:`mark_trainable` or before: either order works). With
    ``cfg.train_state`` every block also gets its zero initial state ``att.time_state`` (adapters/state.py).
    Empty ``cfg.targets`` are set to the model version's default layers (so the sidecar records them).
    """
    if not cfg.adapts_layers:
        if cfg.train_state:
            add_time_states(model)
        return []
    if not cfg.targets:  # the model version's default layers; set here so the sidecar records them
        cfg.targets = list(adapter_targets(model))
    linears = find_targets(model, cfg.targets)
    if any("." not in t for t in cfg.targets):  # peft's bare names: record the layers they matched
        cfg.targets = list(dict.fromkeys(re.sub(r"^.*?blocks\.\d+\.", "", n) for n in linears))
    cfg.layer_class.check_shapes(cfg.r, {name: tuple(m.weight.shape) for name, m in linears.items()})
    for name, linear in linears.items():
        layer = make_adapter_layer(cfg, linear.weight.data)
        if cfg.quant != "none":
            layer.quantize_base(cfg.quant)
        model.set_submodule(name, layer)
    if cfg.train_state:
        add_time_states(model)
    return list(linears)


# ---------------------------------------------------------------------------------------------------------
# what trains
# ---------------------------------------------------------------------------------------------------------
def train_part_parameters(model: nn.Module, train_parts: Iterable[str]) -> dict[str, nn.Parameter]:
    """Base parameters whose name contains a --train_parts substring (adapter layers' weights and the
    initial states excluded: "time" would otherwise match ``time_state``)."""
    parts = list(train_parts)
    in_adapters = {id(p) for _, m in adapter_modules(model) for p in m.parameters()}
    in_adapters |= {id(p) for p in time_state_parameters(model).values()}
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

    With ``peft == "none"`` (full fine-tuning) everything trains. With ``cfg.train_state`` the initial
    states train too (``peft state``: only they do). Returns the trainable names.
    """
    if cfg.peft == "none":
        model.requires_grad_(True)
        return [name for name, _ in model.named_parameters()]
    model.requires_grad_(False)
    trainable = {**adapter_parameters(model), **train_part_parameters(model, cfg.train_parts)}
    if cfg.train_state:
        states = time_state_parameters(model)
        if not states:
            raise RWKVDishaError("mark_trainable found no initial states: call inject_adapters first")
        trainable.update(states)
    if cfg.adapts_layers and not any(True for _ in adapter_modules(model)):
        raise RWKVDishaError("mark_trainable found no adapter layers: call inject_adapters(model, cfg) first")
    # saved with the adapter but never trained (PiSSA's initial factors)
    frozen = {id(getattr(m, n)) for _, m in adapter_modules(model) for n in m.frozen_adapter_names}
    trainable = {name: p for name, p in trainable.items() if id(p) not in frozen}
    for p in trainable.values():
        p.requires_grad_(True)
    return list(trainable)
