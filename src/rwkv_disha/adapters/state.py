"""State tuning: a trainable initial WKV state per block (``--peft state``; docs/ADAPTERS.md, "State tuning").

    frozen base  +  blocks.i.att.time_state (H, N, N) fp32, zero at start, laid out (value, key)

Every sequence starts from these states instead of zeros (the token-shift states stay zero), so a file
of a few hundred KB steers a frozen model. The layout is the one of the ``rwkv`` package's WKV state and
of RWKV-PEFT's kernels (``s[h, i, j]``, i = value index, j = key index): a file moves between the tools
without a transpose. Training, saving, loading and merging go through the adapter machinery
(``AdapterConfig.train_state``); this module owns the tensors: where they live, their names and shapes,
and reading a state file for inference (``load_model(path, state=FILE)``, ``generate/eval --state``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

from rwkv_disha.errors import RWKVDishaError

Tensor = torch.Tensor

SUFFIX = "time_state"  # the parameter's name on a block's attention module
_KEY = re.compile(r"^blocks\.(\d+)\.att\." + SUFFIX + r"$")


class TimeState:
    """The state kind: what ``--peft state`` selects, described for the registry and for messages."""

    kind, peft = "state", "state"  # registry name, --peft value

    @staticmethod
    def describe() -> str:
        return "initial WKV states"


def is_state_key(key: str) -> bool:
    """``blocks.3.att.time_state`` -> True."""
    return bool(_KEY.match(key))


def _attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of each block's attention that takes an initial state (declares ``time_state``)."""
    blocks = getattr(model, "blocks", None)
    found = [(f"blocks.{i}.att", b.att) for i, b in enumerate(blocks or []) if hasattr(b.att, SUFFIX)]
    if not found or len(found) != len(blocks):
        raise RWKVDishaError(
            f"state tuning needs a model whose attention takes an initial state; "
            f"{type(model).__name__} does not (RWKV-7, RWKV-6 and RWKV-5.2 do)"
        )
    return found


def state_shapes(n_layer: int, n_head: int, head_size: int) -> dict[str, tuple[int, int, int]]:
    """Every state key of a model of this shape, with its (H, N, N) shape."""
    return {f"blocks.{i}.att.{SUFFIX}": (n_head, head_size, head_size) for i in range(n_layer)}


def add_time_states(model: nn.Module, values: Mapping[str, Tensor] | None = None) -> list[str]:
    """Give every block's attention a ``time_state`` parameter (H, N, N) in fp32: zero, or ``values[name]``.

    A block that already has one keeps it (a model loaded from a merged file); ``values`` then replace
    its content. Returns the parameter names."""
    names = []
    for name, att in _attention_modules(model):
        key = f"{name}.{SUFFIX}"
        H, N = att.n_head, att.head_size
        current = getattr(att, SUFFIX)
        if current is None:
            device = att.r_k.device if hasattr(att, "r_k") else next(att.parameters()).device
            current = nn.Parameter(torch.zeros(H, N, N, dtype=torch.float32, device=device))
            setattr(att, SUFFIX, current)
        if values is not None and key in values:
            with torch.no_grad():
                current.copy_(values[key])
        names.append(key)
    return names


def time_state_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every ``blocks.i.att.time_state`` parameter the model has, by full name (model order)."""
    blocks = getattr(model, "blocks", None) or []
    return {
        f"blocks.{i}.att.{SUFFIX}": p
        for i, b in enumerate(blocks)
        if isinstance(p := getattr(getattr(b, "att", None), SUFFIX, None), nn.Parameter)
    }


def check_state_keys(keys, n_layer: int, source: str) -> None:
    """A file holds states for every block or for none (a partial set is a damaged file)."""
    have = sorted(int(m.group(1)) for k in keys if (m := _KEY.match(k)))
    if have and have != list(range(n_layer)):
        missing = sorted(set(range(n_layer)) - set(have))
        extra = sorted(set(have) - set(range(n_layer)))
        raise RWKVDishaError(
            f"{source} holds initial states for blocks {have[:4]}{'...' if len(have) > 4 else ''} "
            f"but the model has {n_layer} blocks (missing {missing[:4]}, extra {extra[:4]}): "
            f"it was made for another model"
        )


def load_state_file(model: nn.Module, path: str | Path) -> list[str]:
    """Make ``model`` start every sequence from the states in ``path`` (a ``--peft state`` file, ours or
    RWKV-PEFT's): checked like any adapter file (finite values, exact keys and shapes, and the sidecar's
    base fingerprint against ``model``). Returns the names loaded."""
    from rwkv_disha.adapters.adapter_file import load_adapter_file, open_adapter_file
    from rwkv_disha.adapters.inject import inject_adapters

    file = open_adapter_file(path)
    if file.cfg.peft != TimeState.peft:
        raise RWKVDishaError(
            f"{file.source} holds {file.cfg.describe()}, not only initial states: give it as "
            f"--peft_checkpoint (an adapter file trained with --train_state 1 carries its states along)"
        )
    inject_adapters(model, file.cfg)
    return load_adapter_file(model, file, file.cfg)
