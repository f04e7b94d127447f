"""Typed configuration. Every command's options are a dataclass; the CLI is generated from them.

A field's ``metadata["help"]`` is its ``--help`` text. ``bool`` fields take ``0/1/true/false``
(RWKV-PEFT writes ``--grad_cp 1``) and a bare ``--flag`` means true.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import field
from typing import Any

from rwkv_disha.errors import RWKVDishaError


def opt(default: Any, help: str, choices: tuple | None = None, **kw: Any) -> Any:
    """A dataclass field with CLI help (and optional choices)."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def parse_bool(text: str | bool | int) -> bool:
    if isinstance(text, (bool, int)):
        return bool(text)
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected 0/1/true/false, got {text!r}")


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, is_optional) of an annotation such as ``int | None``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one ``--name`` option per field of dataclass ``cls`` (defaults are left to ``from_namespace``)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_"):
            continue
        tp, _ = _base_type(hints[f.name])
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        helptext = f.metadata.get("help", "")
        kw["help"] = f"{helptext} (default: {default!r})" if helptext else f"(default: {default!r})"
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if tp is bool:
            kw.update(type=parse_bool, nargs="?", const=True, metavar="0|1")
        elif typing.get_origin(tp) is list:
            (inner,) = typing.get_args(tp) or (str,)
            kw.update(type=inner, nargs="*")
        elif tp in (int, float, str):
            kw["type"] = tp
        else:
            kw["type"] = str
        parser.add_argument(f"--{f.name}", **kw)


def from_mapping(cls: type, values: dict[str, Any], source: str = "options") -> Any:
    """Build ``cls`` from a dict, refusing unknown keys with the list of known ones."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - names)
    if unknown:
        raise RWKVDishaError(f"unknown {source}: {', '.join(unknown)} (known: {', '.join(sorted(names))})")
    return cls(**values)


def from_namespace(cls: type, ns: argparse.Namespace) -> Any:
    return from_mapping(cls, {k: v for k, v in vars(ns).items() if not k.startswith("_")})


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)
