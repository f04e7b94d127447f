"""Model versions behind one door: version string -> model class + how to read its shape from tensors.

A version is one file (``rwkv7.py`` for RWKV-7 "x070", ``rwkv6.py`` for RWKV-6 "x060", ``rwkv5.py`` for
RWKV-5.2 "x052") that defines the ``nn.Module``, ``infer_config(state_dict) -> ModelConfig``,
``tensor_shapes(ModelConfig) -> {key: shape}``, and for ``rwkv-disha init`` ``default_config`` and
``init_tensors``, plus one :class:`ModelVersion` entry in :data:`MODELS` and its name in
:data:`rwkv_disha.choices.MODEL_VERSIONS`. The entry also names the Linear layers adapters target by
default (RWKV-PEFT's choice for that version).

Versions that are recognised from their keys but not implemented are listed in :data:`RECOGNISED`, so
loading one says which version it is rather than "not an RWKV checkpoint".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rwkv_disha.errors import RWKVDishaError
from rwkv_disha.model import rwkv5, rwkv6, rwkv7
from rwkv_disha.model.config import ModelConfig

# docs/ADAPTERS.md, "Layouts": the Linear layers RWKV-PEFT adapts (module names after ``blocks.N.``)
RWKV7_TARGETS = ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value")
RWKV6_TARGETS = (*RWKV7_TARGETS, "att.gate", "ffn.receptance")


@dataclass(frozen=True)
class ModelVersion:
    version: str  # "x070"
    name: str  # "RWKV-7"
    marker: str  # a key suffix only this version's checkpoints have (in block 0's attention)
    head_key: str  # the key whose dim 1 is the head size (named in shape errors)
    model_class: type[torch.nn.Module]  # built as model_class(cfg, op=op)
    infer_config: Callable[[dict[str, torch.Tensor]], ModelConfig]
    tensor_shapes: Callable[[ModelConfig], dict[str, tuple[int, ...]]]
    default_config: Callable[[int, int, int, int], ModelConfig]  # (n_layer, n_embd, vocab, head_size)
    init_tensors: Callable[[ModelConfig, bool, torch.Generator], dict[str, torch.Tensor]]  # (cfg, random, g)
    adapter_targets: tuple[str, ...]  # the Linear layers adapters replace unless targets are given
    # tensors an adapter sidecar's base fingerprint hashes (adapters/fingerprint.py): ones no adapter
    # setting trains or quantizes where the version has them; "blocks.*." = the first and the last block,
    # "[:N]" = the first N rows only
    fingerprint: tuple[str, ...]


# RWKV-6 / 5.2 have no tensor that every setting leaves alone: the embedding and head are trained only by
# --train_parts emb / head (full fine-tuning), the rest by "time" / "ln" or quantized by --quant
_EMB_HEAD = ("emb.weight[:16]", "head.weight[:16]")


def _entry(version: str, name: str, marker: str, head_key: str, module, cls, targets, fp) -> ModelVersion:
    return ModelVersion(
        version, name, marker, head_key, cls, module.infer_config, module.tensor_shapes,
        module.default_config, module.init_tensors, targets, fp,
    )  # fmt: skip


# detection tries the markers in this order: x060 before x052 (RWKV-6 files also hold time_faaaa)
MODELS: dict[str, ModelVersion] = {
    "x070": _entry(
        "x070",
        "RWKV-7",
        "att.r_k",
        "att.r_k",
        rwkv7,
        rwkv7.RWKV7,
        RWKV7_TARGETS,
        ("blocks.*.att.r_k", "blocks.*.att.k_k", "blocks.*.att.w0"),
    ),
    "x060": _entry(
        "x060", "RWKV-6", "att.time_maa_x", "att.time_faaaa", rwkv6, rwkv6.RWKV6, RWKV6_TARGETS, _EMB_HEAD
    ),
    "x052": _entry(
        "x052", "RWKV-5.2", "att.time_faaaa", "att.time_faaaa", rwkv5, rwkv5.RWKV5, RWKV6_TARGETS, _EMB_HEAD
    ),
}

# version -> (name, marker key suffix) of versions we recognise but cannot load; checked after MODELS
RECOGNISED: dict[str, tuple[str, str]] = {
    "x040": ("RWKV-4", "att.time_mix_k"),
}


def version_name(version: str) -> str:
    if version in MODELS:
        return MODELS[version].name
    return RECOGNISED.get(version, (version, ""))[0]


def get_version(version: str) -> ModelVersion:
    """The registry entry of ``version``, or one line saying it is not supported."""
    if version not in MODELS:
        supported = ", ".join(f"{m.name} ({v})" for v, m in MODELS.items())
        raise RWKVDishaError(
            f"{version_name(version)} ({version}) checkpoints are not supported; supported: {supported}"
        )
    return MODELS[version]


def markers() -> list[tuple[str, str]]:
    """``(version, marker)`` pairs, supported versions first, in the order detection tries them."""
    return [(v, m.marker) for v, m in MODELS.items()] + [(v, mk) for v, (_, mk) in RECOGNISED.items()]


def adapter_targets(model: torch.nn.Module) -> tuple[str, ...]:
    """The Linear layers adapters replace by default in ``model`` (its version's entry)."""
    cfg = getattr(model, "config", None)
    if not isinstance(cfg, ModelConfig):
        raise RWKVDishaError(
            f"cannot tell the RWKV version of a {type(model).__name__}: give the adapter targets explicitly"
        )
    return get_version(cfg.version).adapter_targets
