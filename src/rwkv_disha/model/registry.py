"""Model versions behind one door: version string -> model class + how to read its shape from tensors.

A version is one file (``rwkv7.py`` for RWKV-7, "x070") that defines the ``nn.Module``, an
``infer_config(state_dict) -> ModelConfig`` and a ``tensor_shapes(ModelConfig) -> {key: shape}``, plus
one :class:`ModelVersion` entry in :data:`MODELS`. RWKV-6 (``x060``) and RWKV-5 (``x052``) join the
same way: a new file, one entry here, and their name in :data:`rwkv_disha.choices.MODEL_VERSIONS`.

Versions that are recognised from their keys but not implemented are listed in :data:`RECOGNISED`, so
loading one says which version it is rather than "not an RWKV checkpoint".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rwkv_disha.errors import RWKVDishaError
from rwkv_disha.model import rwkv7
from rwkv_disha.model.config import ModelConfig


@dataclass(frozen=True)
class ModelVersion:
    version: str  # "x070"
    name: str  # "RWKV-7"
    marker: str  # a key suffix only this version's checkpoints have (in block 0's attention)
    model_class: type[torch.nn.Module]  # built as model_class(cfg, op=op)
    infer_config: Callable[[dict[str, torch.Tensor]], ModelConfig]
    tensor_shapes: Callable[[ModelConfig], dict[str, tuple[int, ...]]]


MODELS: dict[str, ModelVersion] = {
    "x070": ModelVersion("x070", "RWKV-7", "att.r_k", rwkv7.RWKV7, rwkv7.infer_config, rwkv7.tensor_shapes),
}

# version -> (name, marker key suffix) of versions we recognise but cannot load yet; checked in this order
RECOGNISED: dict[str, tuple[str, str]] = {
    "x060": ("RWKV-6", "att.time_maa_x"),
    "x052": ("RWKV-5", "att.time_faaaa"),
    "x040": ("RWKV-4", "att.time_mix_k"),
}


def version_name(version: str) -> str:
    if version in MODELS:
        return MODELS[version].name
    return RECOGNISED.get(version, (version, ""))[0]


def get_version(version: str) -> ModelVersion:
    """The registry entry of ``version``, or one line saying it is not supported yet."""
    if version not in MODELS:
        supported = ", ".join(f"{m.name} ({v})" for v, m in MODELS.items())
        raise RWKVDishaError(
            f"{version_name(version)} ({version}) checkpoints are not supported yet; supported: {supported}"
        )
    return MODELS[version]


def markers() -> list[tuple[str, str]]:
    """``(version, marker)`` pairs, supported versions first, in the order detection tries them."""
    return [(v, m.marker) for v, m in MODELS.items()] + [(v, mk) for v, (_, mk) in RECOGNISED.items()]
