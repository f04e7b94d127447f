"""What to adapt and how: :class:`AdapterConfig`, from RWKV-PEFT's flags (docs/ADAPTERS.md, "Configuration").

    cfg = AdapterConfig.from_cli("disha", '{"mode":"bone","load":"","r":64}', "", ["time", "ln"], "none")

Which JSON flag and keys a kind reads, and its extra checks, come from the kind's class (``registry.py``);
this module only knows what all kinds share.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from rwkv_disha.adapters.base import is_int_at_least
from rwkv_disha.adapters.dialects import dialect_values, find_dialect
from rwkv_disha.adapters.quant import check_quant_mode
from rwkv_disha.adapters.registry import MODEL_KINDS, adapter_class, kinds_of
from rwkv_disha.choices import DEFAULT_TRAIN_PARTS, TRAIN_PARTS
from rwkv_disha.errors import RWKVDishaError
from rwkv_disha.model.registry import MODELS, RWKV7_TARGETS
from rwkv_disha.train.checks import check_lora_scale

# docs/ADAPTERS.md, "Layouts": the Linear layers RWKV-PEFT adapts in RWKV-7 (module name after ``blocks.N.``)
# The Linear layers adapters replace by default come from the model version's registry entry
# (rwkv_disha.model.registry: RWKV-7's six; RWKV-6 / 5.2 add att.gate and ffn.receptance). An empty
# ``targets`` means "the model's"; inject_adapters fills them in. KNOWN_TARGETS: every version's.
DEFAULT_TARGETS = RWKV7_TARGETS
KNOWN_TARGETS = tuple(dict.fromkeys(t for m in MODELS.values() for t in m.adapter_targets))


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
            f"{flag} is not valid JSON ({e.msg} at char {e.pos} of {text!r}): write it like '{example}' "
            f"(double quotes inside, single quotes around it in the shell)"
        ) from None
    if not isinstance(value, dict):
        raise RWKVDishaError(f"{flag} must be a JSON object like '{example}', got {text!r}")
    return value


def _take(options: Mapping[str, Any], flag: str, key: str, kind: type, default: Any) -> Any:
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
    mini_r: int = 1  # MiSS mini: width of the block repeated along out
    svd_niter: int = 4  # PiSSA: randomized SVD iterations
    pissa_init: str = ""  # PiSSA: RWKV-PEFT's init_pissa.pth for an RWKV-PEFT ``load`` (ours hold the init)
    targets: list[str] = field(default_factory=list)  # [] = the model version's (inject_adapters)
    train_parts: list[str] = field(default_factory=lambda: list(DEFAULT_TRAIN_PARTS))
    quant: str = "none"  # frozen base storage: none, int8, nf4, fp4
    train_state: bool = False  # also train each block's initial WKV state (adapters/state.py)

    def __post_init__(self) -> None:
        self.train_parts = parse_train_parts(self.train_parts)
        self.quant = check_quant_mode(self.quant)
        if not isinstance(self.train_state, bool):
            raise RWKVDishaError(f"train_state must be true or false, got {self.train_state!r}")
        if self.peft in MODEL_KINDS:  # --peft state: the states and nothing else train
            self.train_state, self.train_parts = True, []
            if self.quant != "none":
                raise RWKVDishaError(
                    "--quant with --peft state is not supported: state tuning trains no adapter; drop --quant"
                )
            return
        if self.peft == "none":
            if self.quant != "none":
                raise RWKVDishaError(
                    "--quant quantizes the frozen base under an adapter: add --peft disha or lora"
                )
            return
        kind = self.layer_class  # refuses an unknown peft / mode
        if not is_int_at_least(self.r, 1):
            key = next(k for k, (name, _, _) in kind.cli_keys.items() if name == "r")
            raise RWKVDishaError(f"{kind.cli_flag} {key} must be a positive integer, got {self.r!r}")
        kind.check_config(self)
        if any(name == "lora_alpha" for name, _, _ in kind.cli_keys.values()):  # LoRA: scale alpha / r
            check_lora_scale("lora_alpha", self.lora_alpha, self.r)
        if isinstance(self.targets, str):
            self.targets = [t for t in re.split(r"[\s,]+", self.targets) if t]
        if not isinstance(self.targets, list) or not all(isinstance(t, str) and t for t in self.targets):
            raise RWKVDishaError(f"adapter targets must be module names like {' '.join(DEFAULT_TARGETS)}")

    @property
    def adapts_layers(self) -> bool:
        """Whether this config puts adapter layers into the model (not for ``state`` and ``none``)."""
        return bool(kinds_of(self.peft))

    @property
    def layer_class(self):
        """The adapter layer class (``BoneLinear``, ...) this config selects; not for ``peft none``."""
        return adapter_class(self.peft, self.mode)

    @classmethod
    def from_cli(
        cls,
        peft: str = "none",
        disha_config: str | Mapping | None = "",
        lora_config: str | Mapping | None = "",
        train_parts: str | Iterable[str] | None = None,
        quant: str = "none",
        targets: Iterable[str] | None = None,
        train_state: bool = False,
        peft_config: str | Mapping | None = "",
        bone_config: str | Mapping | None = "",
        pissa_config: str | Mapping | None = "",
    ) -> AdapterConfig:
        """From RWKV-PEFT's flags: ``--peft disha --disha_config '{"mode":"bone","load":"","r":64}'``.

        Only the JSON of the chosen ``peft`` is read (the other may hold its default). Unknown JSON keys,
        wrong types, bad values and malformed JSON raise :class:`RWKVDishaError`.
        """
        peft = (peft or "none").strip().lower()
        common: dict[str, Any] = {"train_parts": parse_train_parts(train_parts), "quant": quant or "none"}
        common["train_state"] = bool(train_state)
        if targets is not None:
            common["targets"] = list(targets)
        if peft == "none" or peft in MODEL_KINDS:
            return cls(peft=peft, **common)
        texts = {"--disha_config": disha_config, "--lora_config": lora_config, "--peft_config": peft_config}
        texts.update({"--bone_config": bone_config, "--pissa_config": pissa_config})
        dialect = find_dialect(peft, texts)  # RWKV-PEFT's other spellings (dialects.py)
        if dialect is not None:
            opts = _parse_json_option(f"--peft {peft} {dialect.flag}", texts[dialect.flag], dialect.example)
            return cls(**{**common, **dialect_values(dialect, opts, KNOWN_TARGETS)})
        first = (kinds_of(peft) or [adapter_class(peft)])[0]  # adapter_class refuses an unknown peft
        flag = first.cli_flag
        text = texts[flag]
        opts = _parse_json_option(flag, text, first.cli_example)
        mode = None
        if "mode" in first.cli_keys:  # the JSON key that picks one of several kinds
            mode = _take(opts, flag, "mode", str, first.cli_keys["mode"][2]).strip().lower()
        kind = adapter_class(peft, mode)
        unknown = sorted(set(opts) - set(kind.cli_keys))
        if unknown:
            raise RWKVDishaError(
                f"{flag} has unknown key(s) {', '.join(unknown)}: known keys are {', '.join(kind.cli_keys)} "
                f"(e.g. '{kind.cli_example}')"
            )
        values = {name: _take(opts, flag, key, typ, dflt) for key, (name, typ, dflt) in kind.cli_keys.items()}
        if mode is not None:
            values["mode"] = mode
        return cls(peft=peft, **values, **common)

    def to_dict(self) -> dict[str, Any]:
        """The settings an adapter file's sidecar records (everything but the files a run started from:
        ``load``, and ``pissa_init``, whose factors the saved file holds)."""
        d = asdict(self)
        d.pop("load")
        d.pop("pissa_init")
        return d

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> AdapterConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def same_adapter(self, other: AdapterConfig) -> bool:
        """Same kind and r, both with or without states: the tensors of one fit the model of the other."""
        if self.train_state != other.train_state:
            return False
        if not (self.adapts_layers and other.adapts_layers):
            return self.peft == other.peft
        return self.layer_class is other.layer_class and self.r == other.r

    def describe(self, layers: bool = False) -> str:
        """One line naming the adapter; with ``layers`` also the adapted layers (the run's summary)."""
        if layers and self.adapts_layers:
            return f"{self.describe()} on {' '.join(self.targets)} (every block)"
        if self.peft in MODEL_KINDS:
            return MODEL_KINDS[self.peft].describe()
        states = " + initial WKV states" if self.train_state else ""
        if self.peft == "none":
            return f"no adapter{states}"
        q = f", base {self.quant}" if self.quant != "none" else ""
        return f"{self.layer_class.describe(self)}{q}{states}"
