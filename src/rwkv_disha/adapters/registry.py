"""The adapter kinds, in one table: name -> layer class (docs/ADAPTERS.md, "Adding a kind").

A kind is selected by ``--peft`` (the class's ``peft``) and, where one ``--peft`` offers several kinds
(DiSHA: Bone and Bat), by the ``"mode"`` key of its JSON flag (the class's ``kind``). Everything else a
kind needs (its flag's keys, its shape rule, how to read r back from a file) is on the class itself.
"""

from __future__ import annotations

from rwkv_disha.adapters.base import AdapterLinear
from rwkv_disha.adapters.bat import BatLinear
from rwkv_disha.adapters.bone import BoneLinear
from rwkv_disha.adapters.lora import LoRALinear
from rwkv_disha.adapters.miss import MissBatLinear, MissMiniLinear
from rwkv_disha.adapters.pissa import PissaLinear
from rwkv_disha.adapters.state import TimeState
from rwkv_disha.errors import RWKVDishaError

ADAPTER_KINDS: dict[str, type[AdapterLinear]] = {
    "bone": BoneLinear,  # first DiSHA kind: the default "mode"
    "bat": BatLinear,
    "lora": LoRALinear,
    "miss_bat": MissBatLinear,  # MiSS balance is Bone; --peft miss picks these by init_weights
    "miss_mini": MissMiniLinear,
    "pissa": PissaLinear,
}

# kinds that add tensors to the model itself instead of wrapping a Linear: --peft state trains only the
# initial WKV states; any --peft adds them with --train_state 1 (AdapterConfig.train_state)
MODEL_KINDS: dict[str, type] = {"state": TimeState}


def kinds_of(peft: str) -> list[type[AdapterLinear]]:
    """The kinds that ``--peft peft`` offers, default first ([] for an unknown peft)."""
    return [cls for cls in ADAPTER_KINDS.values() if cls.peft == peft]


def adapter_class(peft: str, mode: str | None = None) -> type[AdapterLinear]:
    """The layer class for ``--peft peft`` (and, where peft offers several kinds, its JSON ``mode``)."""
    kinds = kinds_of(peft)
    if not kinds:
        named = ADAPTER_KINDS.get(str(peft))
        hint = f' ({named.title} is --peft {named.peft} with "mode":"{named.kind}")' if named else ""
        pefts = ", ".join(dict.fromkeys(c.peft for c in (*ADAPTER_KINDS.values(), *MODEL_KINDS.values())))
        raise RWKVDishaError(f"unknown --peft {peft!r}: use {pefts} or none{hint}")
    if len(kinds) == 1:
        return kinds[0]
    for cls in kinds:
        if cls.kind == mode:
            return cls
    names = " or ".join(f'"{cls.kind}"' for cls in kinds)
    raise RWKVDishaError(
        f"{kinds[0].cli_flag} mode {mode!r} is unknown: use {names} (e.g. '{kinds[0].cli_example}')"
    )
