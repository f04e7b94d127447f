"""docs/CLI.md: every command's every option, generated from the ``Config`` dataclasses the CLI is built from.

    python -m rwkv_disha.cli_reference > docs/CLI.md

A test keeps the file equal to this output, so a new option cannot go undocumented and a changed default
cannot leave the reference behind.
"""

from __future__ import annotations

import dataclasses
import importlib
import typing

from rwkv_disha.cli import COMMANDS
from rwkv_disha.config import _base_type, _default, option_fields

_HEADER = """\
# Command-line reference

Generated from the option dataclasses by `python -m rwkv_disha.cli_reference > docs/CLI.md` (a test checks
that this file matches them). Every command also takes `--config FILE.yaml` (its keys are these option names;
flags given on the command line override it) and `--help`. A `0|1` option also takes `true` / `false`, and
the bare flag means 1. An option listed with `...` takes several values (`--input a.jsonl b.jsonl`).
The guides explain the options in context: [README](../README.md), [TRAINING](TRAINING.md),
[DATA](DATA.md), [ADAPTERS](ADAPTERS.md), [MODEL](MODEL.md), [BENCHMARKS](BENCHMARKS.md), and
[MIGRATING](MIGRATING.md) for RWKV-PEFT's and peft's flags.
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _value(f: dataclasses.Field, tp: typing.Any) -> str:
    """The default as a user types it: ``0|1`` options as 0 / 1, an empty string as ``''``."""
    value = _default(f)
    if tp is bool:
        return str(int(value))
    if isinstance(value, list):
        return " ".join(map(str, value)) or "(none)"
    if value == "":
        return "''"
    return str(value)


def _form(f: dataclasses.Field, tp: typing.Any) -> str:
    if "choices" in f.metadata:
        return "|".join(str(c) if c != "" else "''" for c in f.metadata["choices"])
    if tp is bool:
        return "0|1"
    if typing.get_origin(tp) is list:
        (inner,) = typing.get_args(tp) or (str,)
        return f"{inner.__name__} ..."
    return tp.__name__ if tp in (int, float, str) else "str"


def _command(name: str) -> list[str]:
    module_name, summary = COMMANDS[name]
    cfg = importlib.import_module(module_name).Config
    hints = typing.get_type_hints(cfg)
    titles = {
        f.name: (_base_type(hints[f.name]).__doc__ or f.name).strip().splitlines()[0]
        for f in dataclasses.fields(cfg)
        if dataclasses.is_dataclass(_base_type(hints[f.name]))
    }
    lines = [f"## `rwkv-disha {name}`", "", f"{summary[0].upper()}{summary[1:]}."]
    current: object = ()  # no group yet
    for grp, f, tp in option_fields(cfg):
        if grp != current:  # a new table, under its group's title
            lines += ["", f"*{titles[grp]}*", ""] if grp is not None else [""]
            lines += ["| option | takes | default | meaning |", "|---|---|---|---|"]
            current = grp
        help_ = f.metadata.get("help", "")
        lines.append(f"| `--{f.name}` | {_cell(_form(f, tp))} | `{_cell(_value(f, tp))}` | {_cell(help_)} |")
    return lines + [""]


def reference_markdown() -> str:
    """The whole of docs/CLI.md."""
    out = [_HEADER]
    out += [f"- [`{name}`](#rwkv-disha-{name}): {summary}" for name, (_, summary) in COMMANDS.items()]
    out.append("")
    for name in COMMANDS:
        out += _command(name)
    return "\n".join(out).rstrip("\n") + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
