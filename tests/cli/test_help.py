"""`--help` of every command exits 0 and shows every option with its help text, as written."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys

import pytest

from rwkv_disha.cli import COMMANDS, build_parser, main


def _flat(text: str) -> str:
    """Text without whitespace: argparse wraps lines, and breaks words longer than a line."""
    return "".join(text.split())


def _help_text(action) -> str:
    """An option's help as the reader should see it (argparse's %% escape and %(default)s resolved)."""
    return action.help.replace("%(default)s", str(action.default)).replace("%%", "%")


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_exits_0_and_renders_every_option(name, capsys):
    with pytest.raises(SystemExit) as info:
        main([name, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: rwkv-disha {name}")
    flat = _flat(out)
    parser = build_parser(name, importlib.import_module(COMMANDS[name][0]))
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(options) >= 2  # --config and the command's own options
    for action in options:
        assert action.help and action.help.strip(), f"{action.option_strings[0]} has no help"
        assert action.option_strings[0] in out
        assert _flat(_help_text(action)) in flat, f"help of {action.option_strings[0]} is garbled"
    assert not re.search(r"\{'[a-z_]+': ", out)  # a %-format gone wrong prints argparse's dict


def test_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, (_, description) in COMMANDS.items():
        assert f"  {name}" in out and description in out


def test_help_in_a_real_process():
    proc = subprocess.run(
        [sys.executable, "-m", "rwkv_disha.cli", "train", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "--grad_cp" in proc.stdout and _flat("30 % slower") in _flat(proc.stdout)
    assert proc.stderr == ""
