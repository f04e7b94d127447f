"""RWKV-PEFT's other command-line dialects, each mapped onto the registered adapter kinds (docs/MIGRATING.md).

    --peft bone  --bone_config '{"bone_mode":"bone","bone_load":"","bone_r":64}'       -> Bone / Bat
    --peft miss  --peft_config '{"r":8,"init_weights":true|"bat"|"mini"}'   -> Bone / MiSS bat / mini
    --peft lora  --peft_config '{"r":8,"lora_alpha":32,"lora_dropout":0.05}'           -> LoRA

``--peft disha --disha_config``, ``--peft lora --lora_config`` and ``--peft pissa --pissa_config`` are read
by :meth:`AdapterConfig.from_cli` from the kind classes themselves. A dialect only renames keys and picks
a kind; the kinds, files and formulas are the same whichever dialect chose them.

``target_modules`` follows peft's rule: a name without a dot adapts every Linear whose last name is that
word, so RWKV-PEFT's ``["receptance", "key", "value", "output"]`` adapts ``ffn.key`` and ``ffn.value`` too:
on RWKV-7 that is our default six layers, which is what a dialect adapts when target_modules is absent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from rwkv_disha.errors import RWKVDishaError

# peft's target_modules as RWKV-PEFT passes it to MissConfig / LoraConfig
PEFT_TARGET_MODULES = ("receptance", "key", "value", "output")


@dataclass(frozen=True)
class Dialect:
    """One ``--peft X --Y_config`` spelling: its keys and which kind each value of its mode key selects."""

    peft: str  # the --peft value users type
    flag: str  # its JSON flag
    keys: dict[str, tuple[str, Any]]  # JSON key -> (AdapterConfig field or "" for dialect-only, default)
    mode_key: str  # JSON key that picks the kind
    modes: dict[str, tuple[str, str]]  # mode value (as JSON text) -> (AdapterConfig peft, mode)
    example: str
    types: dict[str, tuple[type, ...]] = field(default_factory=dict)  # JSON key -> accepted types


DIALECTS: tuple[Dialect, ...] = (
    Dialect(
        peft="bone",
        flag="--bone_config",
        keys={"bone_mode": ("", "bone"), "bone_load": ("load", ""), "bone_r": ("r", 64)},
        mode_key="bone_mode",
        modes={"bone": ("disha", "bone"), "bat": ("disha", "bat")},
        example='{"bone_mode":"bone","bone_load":"","bone_r":64}',
        types={"bone_mode": (str,), "bone_load": (str,), "bone_r": (int,)},
    ),
    Dialect(
        peft="miss",
        flag="--peft_config",
        keys={
            "r": ("r", 64),
            "init_weights": ("", True),
            "mini_r": ("mini_r", 1),
            "miss_dropout": ("", 0.0),
            "target_modules": ("targets", list(PEFT_TARGET_MODULES)),
            "load": ("load", ""),
        },
        mode_key="init_weights",
        modes={"true": ("disha", "bone"), "bat": ("miss", "miss_bat"), "mini": ("miss", "miss_mini")},
        example='{"r":8}',
        types={
            "r": (int,),
            "init_weights": (bool, str),
            "mini_r": (int,),
            "miss_dropout": (int, float),
            "target_modules": (list,),
            "load": (str,),
        },
    ),
    Dialect(
        peft="lora",
        flag="--peft_config",
        keys={
            "r": ("r", 8),
            "lora_alpha": ("lora_alpha", 8.0),
            "lora_dropout": ("lora_dropout", 0.0),
            "target_modules": ("targets", list(PEFT_TARGET_MODULES)),
            "load": ("load", ""),
        },
        mode_key="",
        modes={"": ("lora", "bone")},
        example='{"r":8,"lora_alpha":32,"lora_dropout":0.05}',
        types={
            "r": (int,),
            "lora_alpha": (int, float),
            "lora_dropout": (int, float),
            "target_modules": (list,),
            "load": (str,),
        },
    ),
)


def find_dialect(peft: str, texts: Mapping[str, Any]) -> Dialect | None:
    """The dialect ``--peft peft`` speaks given the JSON flags' texts (a non-empty ``--peft_config`` wins
    over ``--lora_config``); None when the kind classes' own flag applies."""
    for d in DIALECTS:
        if d.peft == peft and (d.peft != "lora" or _given(texts.get(d.flag))):
            return d
    return None


def _given(text: Any) -> bool:
    return bool(text) and not (isinstance(text, str) and not text.strip())


def check_targets(names: Any, flag: str, known: tuple[str, ...]) -> list[str]:
    """peft's target_modules, checked: bare names (``key``: every Linear whose last name is ``key``, matched
    at injection) must be the last name of a known Linear; dotted names (``att.key``) are kept as they are."""
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise RWKVDishaError(
            f"{flag} target_modules must be a list of layer names like {list(PEFT_TARGET_MODULES)}"
        )
    words = sorted({t.rsplit(".", 1)[-1] for t in known})
    for name in names:
        if "." not in name and name not in words:
            raise RWKVDishaError(
                f"{flag} target_modules {name!r} names no RWKV Linear: use some of {', '.join(words)} "
                f"or a dotted name such as att.key"
            )
    return list(dict.fromkeys(names))


def dialect_values(d: Dialect, opts: Mapping[str, Any], known_targets: tuple[str, ...]) -> dict[str, Any]:
    """AdapterConfig fields from dialect ``d``'s parsed JSON ``opts``; one-line errors for unknown keys,
    wrong types and values no kind offers."""
    unknown = sorted(set(opts) - set(d.keys))
    if unknown:
        raise RWKVDishaError(
            f"--peft {d.peft} {d.flag} has unknown key(s) {', '.join(unknown)}: known keys are "
            f"{', '.join(d.keys)} (e.g. '{d.example}')"
        )
    values: dict[str, Any] = {}
    for key, (name, default) in d.keys.items():
        if key == "target_modules" and key not in opts:
            continue  # the model version's layers (inject_adapters), as peft's suffix rule finds them
        value = opts.get(key, default)
        types = d.types.get(key, (type(default),))
        ok = isinstance(value, types) and (bool in types or not isinstance(value, bool))
        if not ok:
            raise RWKVDishaError(
                f"--peft {d.peft} {d.flag} {key} has the wrong type: got {value!r} (e.g. '{d.example}')"
            )
        if name == "targets":
            value = check_targets(value, d.flag, known_targets)
        elif isinstance(default, float):
            value = float(value)
        if name:
            values[name] = value
    mode_text = ""
    if d.mode_key:
        raw = opts.get(d.mode_key, d.keys[d.mode_key][1])
        mode_text = "true" if raw is True else "false" if raw is False else str(raw).strip().lower()
    if mode_text not in d.modes:
        choices = " or ".join("true" if m == "true" else f'"{m}"' for m in d.modes)
        raise RWKVDishaError(f"--peft {d.peft} {d.flag} {d.mode_key} {mode_text!r} is unknown: use {choices}")
    values["peft"], mode = d.modes[mode_text]
    if values["peft"] != "lora":
        values["mode"] = mode
    dropout = opts.get("miss_dropout", 0.0)
    if d.peft == "miss" and dropout:  # peft's default is 0; Bone's fused forward has no dropout
        raise RWKVDishaError(
            f"--peft miss {d.flag} miss_dropout {dropout!r} is not supported (only 0, peft's default): "
            f"drop it"
        )
    return values
