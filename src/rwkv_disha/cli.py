"""``rwkv-disha`` entry point.

Each command lives in its own module, which exposes a ``Config`` dataclass (its options) and
``run(cfg) -> int``. Modules are imported only when their command runs, so ``rwkv-disha init``
does not pay for importing Lightning.

Every user error ends as one line on stderr, ``error: ...``, and exit status 2: a
:class:`RWKVDishaError`, a bad flag (argparse's message, without its usage block), a non-finite float
option, and an OS error about a file the user named (not found, not writable, no space, ...).
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import importlib
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

from rwkv_disha.errors import RWKVDishaError

COMMANDS: dict[str, tuple[str, str]] = {
    "init": ("rwkv_disha.model.init", "write a randomly initialised RWKV-7 / 6 / 5.2 base model (.pth)"),
    "prepare": ("rwkv_disha.data.prepare", "tokenize jsonl / text into binidx (.bin/.idx)"),
    "train": ("rwkv_disha.train.run", "fine-tune: Bone / Bat, MiSS, LoRA, PiSSA, states (RWKV-PEFT flags)"),
    "merge": ("rwkv_disha.adapters.merge", "merge an adapter checkpoint into a plain RWKV .pth"),
    "export": ("rwkv_disha.export", "an adapter as a peft folder / LoRA / .pth; a model as HF (--format hf)"),
    "import": ("rwkv_disha.hf_import", "a Hugging Face RWKV-7 folder (fla layout) -> an official .pth"),
    "generate": ("rwkv_disha.generate", "sample text from a base (+ adapter) or merged model"),
    "eval": ("rwkv_disha.evaluate", "loss / perplexity of a model on binidx or jsonl data"),
    "bench": ("rwkv_disha.bench", "time a training step (tokens/s, MFU, memory) or the WKV kernels"),
    "demo": ("rwkv_disha.demo", "the whole pipeline on a generated corpus and a tiny model (CPU)"),
}

# OS errors that are about a file the user named (a path problem, not a bug in this program)
_USER_FILE_ERRNOS = {
    errno.ENOENT,
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EISDIR,
    errno.ENOTDIR,
    errno.ENAMETOOLONG,
    errno.EIO,
    errno.ELOOP,
}


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as a one-line :class:`RWKVDishaError` instead of usage + exit; a
    flag (or choice) another tool takes and this command spells otherwise gets its fix (a command module's
    ``FOREIGN_FLAGS`` / ``FOREIGN_VALUES``, e.g. RWKV-PEFT's ``--fla``)."""

    foreign_flags: dict[str, str] = {}
    foreign_values: dict[tuple[str, str], str] = {}

    def error(self, message: str):  # type: ignore[override]
        raise RWKVDishaError(f"{self.prog}: {self._foreign(message) or message} (see {self.prog} --help)")

    def _foreign(self, message: str) -> str | None:
        choice = re.match(r"argument --(\w+): invalid choice: '([^']*)'", message)
        if choice and tuple(choice.groups()) in self.foreign_values:
            flag, value = choice.groups()
            return f"--{flag} {value}: {self.foreign_values[(flag, value)]}"
        if message.startswith("unrecognized arguments:"):
            for word in message.split()[2:]:
                name = word.split("=")[0].removeprefix("--")
                if word.startswith("--") and name in self.foreign_flags:
                    return f"--{name} is not a flag of this command: {self.foreign_flags[name]}"
        return None


def _unique_key_loader():
    """yaml's SafeLoader refusing a key given twice in one mapping (it would keep the last silently) and a
    key that is a list or a map (a name cannot be one; SafeLoader's own error does not show the key)."""
    import yaml

    class Loader(yaml.SafeLoader):
        # an unquoted 2001-01-01 stays the text written (YAML 1.1 would make it a date that no option
        # takes and JSON cannot hold); an explicit !!timestamp is still a date, refused by _refuse_type
        yaml_implicit_resolvers = {
            first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
            for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
        }

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)  # deep: a list key is shown filled in
                if isinstance(key, (list, dict)):
                    raise RWKVDishaError(
                        f"line {key_node.start_mark.line + 1}: the key {_shown(key)} is a "
                        f"{'list' if isinstance(key, list) else 'map'}; a key must be a name (text)"
                    )
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"the key {key!r} is given twice", key_node.start_mark
                    )
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return Loader


def _shown(value: Any) -> str:
    """A YAML value as the user wrote it, on one line (``null``, ``[a, b]``, ``{a: 2001-01-01}``)."""
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, width=10**9).removesuffix("...\n")
    text = " ".join(text.split())
    return text if len(text) <= 80 else text[:77] + "..."


def _load_yaml(path: str) -> dict:
    """The file's mapping of option: value; a key that is not text is refused with its line's key."""
    import yaml

    p = Path(path)
    if p.is_dir():
        raise RWKVDishaError(f"config file {path} is a directory; give the .yaml file")
    if not p.is_file():
        raise RWKVDishaError(f"config file not found: {path}")
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_unique_key_loader()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise RWKVDishaError(f"config file {path} is not valid YAML: {e}".replace("\n", " ")) from None
    except RWKVDishaError as e:
        raise RWKVDishaError(f"config file {path}, {e}") from None
    if not isinstance(data, dict):
        raise RWKVDishaError(f"config file {path} must hold a mapping of option: value")
    for key in data:
        if not isinstance(key, str):  # YAML reads 1, null, true, 2001-01-01 as other types
            raise RWKVDishaError(
                f"config file {path}: the key {_shown(key)} is not an option name; keys are the "
                "command's option names, such as n_layer"
            )
    return data


def _check_json_value(value: Any, where: str) -> None:
    """Refuse what JSON cannot hold inside a map given for a JSON option: keys other than text, dates,
    binary data, sets, infinities (json.dumps would fail, or write what no JSON reader takes)."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise RWKVDishaError(f"{where}: the key {_shown(k)} is not a name; quote it in YAML")
            _check_json_value(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_json_value(v, f"{where}[{i}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise RWKVDishaError(f"{where}: must be a finite number, got {_shown(value)}")
    elif value is not None and not isinstance(value, (str, int, float)):
        _refuse_type(value, where)


def _refuse_type(value: Any, where: str) -> None:
    """A YAML value no option takes (a date, binary data, a set), named with the fix."""
    import datetime

    if isinstance(value, (datetime.date, datetime.datetime)):
        kind = f"the date {_shown(value)}"
    elif isinstance(value, bytes):
        kind = "binary data (!!binary)"
    else:
        kind = f"a YAML {type(value).__name__} ({_shown(value)})"
    raise RWKVDishaError(f"{where}: takes a number, text, true / false or a list, not {kind}")


def _yaml_argv(values: dict, parser: argparse.ArgumentParser, json_options: frozenset[str]) -> list[str]:
    """YAML values as flags, so they are type-checked (and choice-checked) exactly like flags. A value is
    never split into flags of its own: a list only for an option that takes several values, none of its
    items starting with '-'; true / false only for a 0|1 option; a map only for an option that takes JSON
    text (``json_options``, a command module's ``JSON_OPTIONS``), written out as JSON; an
    empty value is refused, not dropped."""
    actions = {a.dest: a for a in parser._actions}
    argv: list[str] = []
    for key, value in values.items():
        action = actions.get(key)
        takes_list = action is not None and action.nargs in ("*", "+")
        takes_bool = action is not None and action.const is True  # the 0|1 options
        choices = action.choices if action is not None else None
        if value is None:
            raise RWKVDishaError(f"{key}: has no value; give one, or leave the key out for its default")
        if isinstance(value, (list, tuple)):
            if not takes_list or any(isinstance(v, (list, dict)) or str(v).startswith("-") for v in value):
                raise RWKVDishaError(f"{key}: takes one value, not the list {value!r}")
            for v in value:
                if v is None or isinstance(v, bool) or not isinstance(v, (str, int, float)):
                    raise RWKVDishaError(
                        f"{key}: the item {_shown(v)} of {_shown(value)} is not a value; give text or numbers"
                    )
            argv += [f"--{key}", *map(str, value)]
        elif type(value) is int and choices and str(value) not in choices:
            # version: 070 arrives as 56: YAML reads unquoted digits as a number (a leading 0 as octal)
            raise RWKVDishaError(
                f"{key}: {value} is not one of {', '.join(map(str, choices))}; quote the value in "
                f'YAML ({key}: "...") so it stays text'
            )
        elif isinstance(value, bool):
            if not takes_bool:
                raise RWKVDishaError(f"{key}: takes a value, not {str(value).lower()}")
            argv.append(f"--{key}={int(value)}")
        elif isinstance(value, dict):
            if key not in json_options:  # str(map) would be its text
                many = "values" if takes_list else "one value"
                raise RWKVDishaError(f"{key}: takes {many}, not the map {_shown(value)}")
            _check_json_value(value, key)
            argv.append(f"--{key}={json.dumps(value)}")
        elif isinstance(value, (str, int, float)):
            argv.append(f"--{key}={value}")
        else:
            _refuse_type(value, key)
    return argv


def build_parser(name: str, module) -> argparse.ArgumentParser:
    from rwkv_disha.config import add_dataclass_arguments

    parser = _Parser(
        prog=f"rwkv-disha {name}",
        description=(module.__doc__ or COMMANDS[name][1]).strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        dest="_config",
        metavar="FILE.yaml",
        help="read options from a YAML file (keys are the option names); flags given here override it",
    )
    add_dataclass_arguments(parser, module.Config)
    parser.foreign_flags = getattr(module, "FOREIGN_FLAGS", {})
    parser.foreign_values = getattr(module, "FOREIGN_VALUES", {})
    return parser


def _non_finite(obj: Any) -> tuple[str, float] | None:
    """The first float option (nested dataclasses and lists included) that is NaN or infinite."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        items = value if isinstance(value, (list, tuple)) else [value]
        for v in items:
            if dataclasses.is_dataclass(v) and not isinstance(v, type):
                found = _non_finite(v)
                if found:
                    return found
            elif isinstance(v, float) and not math.isfinite(v):
                return f.name, v
    return None


def parse_config(name: str, argv: list[str]):
    """Parse ``argv`` for command ``name`` into its ``Config`` (YAML file first, then flags)."""
    from rwkv_disha.config import from_mapping

    module = importlib.import_module(COMMANDS[name][0])
    parser = build_parser(name, module)
    ns = parser.parse_args(argv)
    values: dict[str, Any] = {}
    if getattr(ns, "_config", None):
        path = ns._config
        raw = _load_yaml(path)
        foreign = next((k for k in raw if k in parser.foreign_flags), None)
        if foreign:
            raise RWKVDishaError(
                f"config file {path}: {foreign} is not an option of `{name}`: {parser.foreign_flags[foreign]}"
            )
        from_mapping(module.Config, raw, source=f"option(s) for `{name}`")  # unknown keys, named
        json_options = frozenset(getattr(module, "JSON_OPTIONS", ()))
        try:
            values = {
                k: v
                for k, v in vars(parser.parse_args(_yaml_argv(raw, parser, json_options))).items()
                if k[0] != "_"
            }
        except RWKVDishaError as e:
            raise RWKVDishaError(f"config file {path}: {e}") from None
    values.update({k: v for k, v in vars(ns).items() if not k.startswith("_")})
    cfg = from_mapping(module.Config, values, source=f"option(s) for `{name}`")
    bad = _non_finite(cfg)
    if bad:
        raise RWKVDishaError(f"--{bad[0]} must be a finite number, got {bad[1]}")
    if getattr(ns, "_config", None):
        _refuse_config_as_output(cfg, ns._config, getattr(module, "OUTPUT_SUFFIXES", ("",)))
    return module, cfg


_OUTPUT_OPTIONS = ("output", "json")  # the options that name a file a command writes


def _refuse_config_as_output(cfg, config_path: str, suffixes: tuple[str, ...]) -> None:
    """The --config file is an input: an output that would write over it is refused, --overwrite or not.
    ``suffixes``: the files an output option names (a command module's ``OUTPUT_SUFFIXES``; prepare's
    --output is a prefix of four files)."""
    from rwkv_disha.config import flat_dict

    options = flat_dict(cfg)
    target = os.path.realpath(config_path)
    for name in _OUTPUT_OPTIONS:
        value = options.get(name)
        if not isinstance(value, str) or not value:
            continue
        if any(os.path.realpath(value + s) == target for s in ("", *suffixes)):
            raise RWKVDishaError(
                f"--{name} {value} would write over the --config file {config_path}: choose another"
            )


def _usage() -> str:
    lines = ["usage: rwkv-disha COMMAND [options]   (rwkv-disha COMMAND --help for its options)", ""]
    lines += [f"  {n:<9} {d}" for n, (_, d) in COMMANDS.items()]
    return "\n".join(lines)


def _fail(message: str) -> int:
    print("error: " + " ".join(message.split("\n")), file=sys.stderr)
    return 2


def _os_error(e: OSError) -> int:
    """One line for an OS error about a user's file; re-raise anything else (a bug keeps its traceback)."""
    from rwkv_disha.fsio import os_error_cause

    if e.errno not in _USER_FILE_ERRNOS or not e.filename:
        raise e
    cause = "no such file or directory" if e.errno == errno.ENOENT else os_error_cause(e)
    return _fail(f"{e.filename}: {cause}")


def _broken_pipe() -> int:
    """``rwkv-disha generate ... | head``: the reader left; stop quietly, as other CLI tools do."""
    with contextlib.suppress(OSError, ValueError):  # the interpreter's final flush goes nowhere
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by a closed pipe


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from rwkv_disha import __version__

        print(__version__)
        return 0
    name = argv.pop(0)
    if name not in COMMANDS:
        return _fail(f"unknown command {name!r}; commands: {', '.join(COMMANDS)} (rwkv-disha --help)")
    try:
        module, cfg = parse_config(name, argv)
        return int(module.run(cfg) or 0)
    except RWKVDishaError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _broken_pipe()
    except OSError as e:
        return _os_error(e)
    except RuntimeError as e:
        return _symlink_loop(e)


def _symlink_loop(e: RuntimeError) -> int:
    """One line for a path that is a symbolic link loop: Python before 3.13 raises ``RuntimeError("Symlink
    loop from '...'")`` from ``Path.resolve()``, which the commands use to compare outputs with inputs;
    re-raise any other RuntimeError (a bug keeps its traceback)."""
    m = re.fullmatch(r"Symlink loop from (['\"])(.*)\1", str(e))
    if not m:
        raise e
    return _fail(f"{m[2]}: a loop of symbolic links (it leads to no file); fix or remove the link")


if __name__ == "__main__":
    sys.exit(main())
