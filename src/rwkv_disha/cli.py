"""``rwkv-disha`` entry point.

Each command lives in its own module, which exposes a ``Config`` dataclass (its options) and
``run(cfg) -> int``. Modules are imported only when their command runs, so ``rwkv-disha init``
does not pay for importing Lightning.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from rwkv_disha.errors import RWKVDishaError

COMMANDS: dict[str, tuple[str, str]] = {
    "init": ("rwkv_disha.model.init", "write a randomly initialised RWKV-7 base model (.pth)"),
    "prepare": ("rwkv_disha.data.prepare", "tokenize jsonl / text into binidx (.bin/.idx)"),
    "train": ("rwkv_disha.train.run", "fine-tune with Bone / Bat / LoRA (RWKV-PEFT flags)"),
    "merge": ("rwkv_disha.adapters.merge", "merge an adapter checkpoint into a plain RWKV .pth"),
    "generate": ("rwkv_disha.generate", "sample text from a base (+ adapter) or merged model"),
    "eval": ("rwkv_disha.evaluate", "loss / perplexity of a model on binidx or jsonl data"),
    "bench": ("rwkv_disha.bench", "time the WKV kernels and this machine's matmul peak"),
    "demo": ("rwkv_disha.demo", "the whole pipeline on a generated corpus and a tiny model (CPU)"),
}


def _load_yaml(path: str) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise RWKVDishaError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise RWKVDishaError(f"config file {path} is not valid YAML: {e}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise RWKVDishaError(f"config file {path} must hold a mapping of option: value")
    return data


def build_parser(name: str, module) -> argparse.ArgumentParser:
    from rwkv_disha.config import add_dataclass_arguments

    parser = argparse.ArgumentParser(
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
    return parser


def parse_config(name: str, argv: list[str]):
    """Parse ``argv`` for command ``name`` into its ``Config`` (YAML file first, then flags)."""
    from rwkv_disha.config import from_mapping

    module = importlib.import_module(COMMANDS[name][0])
    ns = build_parser(name, module).parse_args(argv)
    values = _load_yaml(ns._config) if getattr(ns, "_config", None) else {}
    values.update({k: v for k, v in vars(ns).items() if not k.startswith("_")})
    return module, from_mapping(module.Config, values, source=f"option(s) for `{name}`")


def _usage() -> str:
    lines = ["usage: rwkv-disha COMMAND [options]   (rwkv-disha COMMAND --help for its options)", ""]
    lines += [f"  {n:<9} {d}" for n, (_, d) in COMMANDS.items()]
    return "\n".join(lines)


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
        print(f"error: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        module, cfg = parse_config(name, argv)
        return int(module.run(cfg) or 0)
    except RWKVDishaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
