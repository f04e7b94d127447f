"""docs/CLI.md documents every option of every command, generated from the option dataclasses."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

from rwkv_disha.cli import COMMANDS, build_parser
from rwkv_disha.cli_reference import reference_markdown

ROOT = Path(__file__).resolve().parents[2]
ROW = r"^\| `--(\w+)` \| [^|]*(?:\\\|[^|]*)* \| `([^`]*)` \|"  # (option, default) of a row; \| inside cells


def test_cli_md_is_up_to_date():
    on_disk = (ROOT / "docs" / "CLI.md").read_text(encoding="utf-8")
    assert on_disk == reference_markdown(), "regenerate: python -m rwkv_disha.cli_reference > docs/CLI.md"


def test_every_flag_of_every_parser_has_a_row():
    """Independent of the generator: walk the argparse parsers the CLI really uses."""
    text = (ROOT / "docs" / "CLI.md").read_text(encoding="utf-8")
    sections = dict(re.findall(r"^## `rwkv-disha (\w+)`\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S))
    assert set(sections) == set(COMMANDS)
    for name, (module, _) in COMMANDS.items():
        parser = build_parser(name, importlib.import_module(module))
        flags = {o for a in parser._actions for o in a.option_strings} - {"-h", "--help", "--config"}
        rows = set(re.findall(r"^\| `(--\w+)` \|", sections[name], flags=re.M))
        assert rows == flags, name


def test_documented_defaults_typed_as_flags_give_the_default_config():
    """Typing a row's default as the flag gives the same config as leaving the flag out (every command)."""
    from rwkv_disha.cli import parse_config
    from rwkv_disha.config import flat_dict

    text = reference_markdown()
    for name in COMMANDS:
        section = text.split(f"## `rwkv-disha {name}`")[1].split("\n## ")[0]
        default = flat_dict(parse_config(name, [])[1])
        for flag, value in re.findall(ROW, section, flags=re.M):
            if value == "(none)":
                assert default[flag] == [], (name, flag)
                continue
            argv = [f"--{flag}", *(value.split() if isinstance(default[flag], list) else [value.strip("'")])]
            assert flat_dict(parse_config(name, argv)[1])[flag] == default[flag], (name, flag, value)


def test_readme_links_the_reference():
    assert "docs/CLI.md" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_rwkv_peft_merge_flags_get_their_fix(capsys):
    from rwkv_disha.cli import main

    for argv, fix in [
        (["--quant", "4bit"], "use --quant fp4"),
        (["--device", "cuda"], "merge runs on the CPU"),
    ]:
        assert main(["merge", "--base_model", "b.pth", *argv, "--output", "m.pth"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: rwkv-disha merge: ") and err.count("\n") == 1 and fix in err, err


def test_an_output_over_the_config_file_is_refused(tmp_path, capsys, monkeypatch):
    """The --config file is an input: even with --overwrite 1 no command writes over it."""
    from rwkv_disha.cli import main

    monkeypatch.chdir(tmp_path)
    cases = [
        ("ic.yaml", "n_layer: 1\nn_embd: 64\n", ["init", "--output", "ic.yaml", "--overwrite", "1"]),
        (
            "ev.yaml",
            "ctx_len: 16\n",
            ["eval", "--load_model", "m.pth", "--json", "ev.yaml", "--overwrite", "1"],
        ),
        ("p.bin", "input: [a.jsonl]\n", ["prepare", "--output", "p", "--overwrite", "1"]),
    ]
    for name, text, argv in cases:
        (tmp_path / name).write_text(text)
        assert main([*argv, "--config", name]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"would write over the --config file {name}" in err, err
        assert (tmp_path / name).read_text() == text
