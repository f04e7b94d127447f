"""docs/BENCHMARKS.md gives each table the command that reproduces it, and those commands run the scripts
in benchmarks/, which the suite never runs otherwise: a function renamed or a flag dropped since would
only show when someone tries to reproduce a table. These tests import every script (without running it),
check that every `rwkv_disha` name it imports (its inline child-process code included) still exists, that
every flag the docs and the scripts' docstrings show is one the script (or `rwkv-disha bench`) takes, and
run the cheapest three at tiny sizes."""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import rwkv_disha.bench as bench
from rwkv_disha.cli import parse_config

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((ROOT / "benchmarks").glob("*.py"))
DOC = (ROOT / "docs" / "BENCHMARKS.md").read_text()
# scripts that hand their arguments to `rwkv-disha bench --what kernel` instead of parsing them
BENCH_KERNEL = {"bench_wkv7"}


def _by_stem(path: Path) -> str:
    return path.stem


def _code_trees(path: Path) -> list[ast.AST]:
    """The script's syntax tree, and those of the Python source it runs in child processes (strings)."""
    tree = ast.parse(path.read_text())
    trees = [tree]
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and "import" in node.value:
            with contextlib.suppress(SyntaxError):  # a string that only mentions "import"
                trees.append(ast.parse(node.value))
    return trees


@pytest.mark.parametrize("path", SCRIPTS, ids=_by_stem)
def test_each_script_imports_without_running(path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # convergence_seeds puts benchmarks/ on it
    before = set(sys.modules)
    spec = importlib.util.spec_from_file_location(f"_benchmark_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    finally:
        for name in set(sys.modules) - before:  # the sibling scripts it imported, not the packages
            if str(getattr(sys.modules[name], "__file__", "")).startswith(str(ROOT / "benchmarks")):
                del sys.modules[name]
    assert callable(module.main)


@pytest.mark.parametrize("path", SCRIPTS, ids=_by_stem)
def test_each_rwkv_disha_name_a_script_imports_exists(path):
    """Function-level and child-process imports included: most scripts import lazily."""
    missing = []
    for tree in _code_trees(path):
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rwkv_disha"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    if not hasattr(module, alias.name):
                        try:
                            importlib.import_module(f"{node.module}.{alias.name}")
                        except ImportError:
                            missing.append(f"{node.module}.{alias.name}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("rwkv_disha"):
                        importlib.import_module(alias.name)
    assert not missing, missing


def _shown_commands() -> list[tuple[str, str, str]]:
    """(where, script stem, its arguments) for every `benchmarks/X.py ...` line of the docs and of the
    scripts' docstrings; comments and `[ ]` around optional flags dropped."""
    found = []
    sources = [("docs/BENCHMARKS.md", DOC)] + [
        (p.name, ast.get_docstring(ast.parse(p.read_text())) or "") for p in SCRIPTS
    ]
    for where, text in sources:
        for stem, args in re.findall(r"benchmarks/(\w+)\.py([^`\n]*)", text):
            args = args.split("#")[0].replace("[", " ").replace("]", " ")
            found.append((where, stem, args.strip()))
    return found


def _bench_argvs_in_doc() -> list[list[str]]:
    """Every `rwkv-disha bench ...` of the docs (code blocks and inline, which may wrap), each `a|b`
    alternative a command of its own."""
    lines = re.findall(r"^rwkv-disha bench (.*)$", DOC, re.M)
    lines += [" ".join(m.split()) for m in re.findall(r"`rwkv-disha bench ([^`]*)`", DOC)]
    argvs = []
    for line in dict.fromkeys(lines):
        base = shlex.split(line.split(" #")[0])
        n_alt = max((len(a.split("|")) for a in base), default=1)
        for i in range(n_alt):
            argvs.append([a.split("|")[min(i, len(a.split("|")) - 1)] for a in base])
    return argvs


def test_the_docs_show_commands_of_scripts_that_exist():
    commands = _shown_commands()
    stems = {p.stem for p in SCRIPTS}
    assert len({s for _, s, _ in commands}) >= 12, commands
    assert {s for _, s, _ in commands} <= stems, {s for _, s, _ in commands} - stems


@pytest.mark.parametrize("where,stem,args", _shown_commands(), ids=lambda x: str(x)[:40])
def test_each_shown_command_uses_flags_the_script_takes(where, stem, args):
    argv = shlex.split(args)
    if stem in BENCH_KERNEL:
        _, cfg = parse_config("bench", ["--what", "kernel", *argv])
        bench.check_mode_flags(cfg)
        return
    source = (ROOT / "benchmarks" / f"{stem}.py").read_text()
    known = set(re.findall(r'add_argument\(\s*"(--[\w-]+)"', source))
    used = {a for a in argv if a.startswith("--")}
    assert used <= known, f"{where}: {stem}.py has no {sorted(used - known)}"


def test_the_docs_show_bench_commands():
    assert len(_bench_argvs_in_doc()) >= 7


@pytest.mark.parametrize("argv", _bench_argvs_in_doc(), ids=lambda a: " ".join(a[:6]))
def test_each_bench_command_of_the_docs_parses(argv):
    _, cfg = parse_config("bench", argv)
    bench.check_mode_flags(cfg)


def _run(*argv: str) -> str:
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_bench_loss_runs_and_reports_each_variant():
    out = json.loads(
        _run(
            "benchmarks/bench_loss.py", "--T", "32", "--C", "16", "--V", "64", "--rounds", "1", "--rows", "16"
        )
    )
    for field in ("ms_median", "time_over_plain_paired_median", "step_peak_mib"):
        assert set(out[field]) == {"plain", "chunked", "chunked rows=16"}, out


def test_bench_pad_trim_runs_and_reports_both_steps():
    argv = [
        "--n_layer",
        "1",
        "--n_embd",
        "64",
        "--ctx_len",
        "32",
        "--bsz",
        "1",
        "--doc",
        "8",
        "--rounds",
        "1",
    ]
    out = json.loads(_run("benchmarks/bench_pad_trim.py", *argv))
    assert out["padded_s"] > 0 and out["trimmed_s"] > 0 and out["speedup"] > 0, out


def test_bench_wkv6_runs_and_prints_its_table():
    argv = ["--threads", "1", "--strong", "0.1", "--T", "16", "--H", "1", "--N", "8", "--repeat", "1"]
    out = _run("benchmarks/bench_wkv6.py", *argv)
    assert "| `torch` |" in out and "| `loop` |" in out, out
