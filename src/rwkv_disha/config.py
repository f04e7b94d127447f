"""Typed configuration. Every command's options are a dataclass; the CLI is generated from them.

A field's ``metadata["help"]`` is its ``--help`` text. ``bool`` fields take ``0/1/true/false``
(RWKV-PEFT writes ``--grad_cp 1``) and a bare ``--flag`` means true. A field whose type is itself a
dataclass is a *group*: its fields become flat flags (``--lr_init``, not ``--optim.lr_init``), shown under
the group's title in ``--help``, so grouped configs keep RWKV-PEFT's flag names.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterator
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


def group(cls: type) -> Any:
    """A nested dataclass field: a group of options (flat flags on the command line)."""
    return field(default_factory=cls)


def parse_bool(text: str | bool | int) -> bool:
    if isinstance(text, (bool, int)):
        return bool(text)
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected 0/1/true/false, got {text!r}")


def _base_type(tp: Any) -> Any:
    """The inner type of an annotation such as ``int | None``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def _is_group(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def option_fields(cls: type) -> Iterator[tuple[str | None, dataclasses.Field, Any]]:
    """``(group name or None, field, type)`` of every option of ``cls``, groups flattened, in order."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_"):
            continue
        tp = _base_type(hints[f.name])
        if _is_group(tp):
            for _, sub, sub_tp in option_fields(tp):
                yield f.name, sub, sub_tp
        else:
            yield None, f, tp


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


def help_text(f: dataclasses.Field) -> str:
    """``--help`` text of a field, ``%`` escaped (argparse formats help with ``%``)."""
    text = f.metadata.get("help", "")
    text = f"{text} (default: {_default(f)!r})" if text else f"(default: {_default(f)!r})"
    return text.replace("%", "%%")


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one ``--name`` option per option of dataclass ``cls`` (groups: flat flags under a title).

    Defaults are ``SUPPRESS``: the parsed namespace holds only the flags given, which is how
    :func:`from_mapping` knows what was given (``--resume`` keeps the rest from the resumed run).
    """
    hints = typing.get_type_hints(cls)
    titles = {
        f.name: (_base_type(hints[f.name]).__doc__ or f.name).strip().splitlines()[0]
        for f in dataclasses.fields(cls)
        if _is_group(_base_type(hints[f.name]))
    }
    sections: dict[str, Any] = {}
    for grp, f, tp in option_fields(cls):
        target = parser
        if grp is not None:
            if grp not in sections:
                sections[grp] = parser.add_argument_group(titles[grp])
            target = sections[grp]
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text(f)}
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
        target.add_argument(f"--{f.name}", **kw)


def from_mapping(cls: type, values: dict[str, Any], source: str = "options") -> Any:
    """Build ``cls`` from flat ``{option: value}``, refusing unknown keys with the list of known ones.

    Options of a group go into that group. The names given are kept: :func:`given_options`.
    """
    where = {f.name: grp for grp, f, _ in option_fields(cls)}
    unknown = sorted(set(values) - set(where))
    if unknown:
        raise RWKVDishaError(f"unknown {source}: {', '.join(unknown)} (known: {', '.join(sorted(where))})")
    top: dict[str, Any] = {}
    groups: dict[str, dict[str, Any]] = {}
    for name, value in values.items():
        grp = where[name]
        (top if grp is None else groups.setdefault(grp, {}))[name] = value
    hints = typing.get_type_hints(cls)
    for grp, sub in groups.items():
        top[grp] = _base_type(hints[grp])(**sub)
    obj = cls(**top)
    object.__setattr__(obj, "_given", frozenset(values))
    return obj


def given_options(obj: Any) -> frozenset[str]:
    """The option names given when ``obj`` was built by :func:`from_mapping` (flags and YAML keys)."""
    return getattr(obj, "_given", frozenset())


def flat_dict(obj: Any) -> dict[str, Any]:
    """``{option: value}`` of a (grouped) config, groups flattened: the inverse of :func:`from_mapping`."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(flat_dict(value))
        elif f.init and not f.name.startswith("_"):
            out[f.name] = list(value) if isinstance(value, (list, tuple)) else value
    return out
