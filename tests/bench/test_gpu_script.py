"""scripts/gpu_check.sh runs only on a lent GPU, rarely and with minutes to spare: a flag renamed here since
it was written would waste that run (its bench errors go to .err files). These tests read the script and
check, on the CPU, that every command it runs still parses and passes bench's option checks, and that every
file, test and function it names exists."""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest
import torch

import rwkv_disha.bench as bench
from rwkv_disha.cli import parse_config

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = (ROOT / "scripts" / "gpu_check.sh").read_text()


def _logical_lines(text: str) -> list[str]:
    """The script's lines with backslash continuations joined and comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [line.split(" # ")[0].strip() for line in joined.splitlines() if not line.lstrip().startswith("#")]


def _bench_argvs(tmp: Path) -> list[list[str]]:
    """Every `$B ...` command of the script as bench's argv, with bench_01b's calls expanded, $S taking
    each of the loop's shapes and $OUT a scratch folder."""
    lines = _logical_lines(SCRIPT)
    helper = next(line for line in lines if "$B " in line and '"$@"' in line)
    commands = [line for line in lines if "$B " in line and '"$@"' not in line]
    for line in lines:
        if line.startswith("bench_01b ") or " bench_01b " in line:
            name_and_args = line.split("bench_01b ", 1)[1]
            extra = name_and_args.split(" ", 1)[1] if " " in name_and_args else ""
            commands.append(helper.replace('"$@"', extra).replace("$name", name_and_args.split()[0]))
    shapes = re.search(r"for S in ([^;]+);", SCRIPT).group(1).split()
    argvs = []
    for command in commands:
        text = command.split("$B ", 1)[1].split(" > ")[0].split(" 2>")[0]
        for shape in shapes if "$S" in text else [None]:
            filled = text.replace("$OUT", str(tmp)).replace("$S", shape or "")
            argvs.append(["--device", "cuda", *shlex.split(filled)])
    return argvs


def test_the_script_runs_every_kind_of_bench_it_promises(tmp_path):
    argvs = _bench_argvs(tmp_path)
    flags = [" ".join(a) for a in argvs]
    assert len(argvs) >= 12, flags  # 0.1B bone/frozen/op cuda/compile x3, sweep, VRAM x3, kernel x2
    assert any("--sweep micro_bsz" in f and "--shape 1.5B" in f for f in flags)
    assert sum("--shape 0.1B" in f and "--micro_bsz 16" in f and "--grad_cp 1" in f for f in flags) >= 6
    vram_runs = [f for f in flags if "--ctx_len 1024 --micro_bsz 1 " in f]
    vram = {s for f in vram_runs for s in ("0.4B", "1.5B", "3B") if f"--shape {s} " in f}
    assert vram == {"0.4B", "1.5B", "3B"}, flags
    assert sum("--what kernel" in f for f in flags) == 2


@pytest.mark.parametrize("argv", _bench_argvs(Path("/OUT")), ids=lambda a: " ".join(a[2:8]))
def test_each_bench_command_of_the_script_passes_benchs_checks(tmp_path, monkeypatch, argv):
    """Parsed by bench's own parser, then every option check that needs no GPU (the device, --op's and
    the activation-memory checks read the GPU itself and are left out)."""
    _, cfg = parse_config("bench", [a.replace("/OUT", str(tmp_path)) for a in argv])
    assert cfg.device == "cuda"
    bench.check_mode_flags(cfg)
    assert not Path(cfg.json).exists() and Path(cfg.json).parent == tmp_path
    if cfg.what == "kernel":
        assert set(cfg.ops.split(",")) <= set(bench.OPS)
        return
    monkeypatch.setattr(bench, "_check_op_device", lambda *a, **k: None)
    monkeypatch.setattr(bench, "available_bytes", lambda: None)
    monkeypatch.setattr("rwkv_disha.hardware.check_activations_fit", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # --compile / --cuda_graphs: GPU-only
    bench._validate_step(cfg, torch.device("cuda"))


def test_the_script_names_files_tests_and_functions_that_exist():
    """The pytest targets (and -k selections), the benchmark script and its flags, and the functions its
    inline Python imports."""
    for target in ("tests/gpu", "tests/adapters/test_cuda.py", "tests/bench/test_speed_paths.py"):
        assert target in SCRIPT and (ROOT / target).exists(), target
    speed_tests = (ROOT / "tests/bench/test_speed_paths.py").read_text()
    assert "-k compiled" in SCRIPT and re.search(r"def test_\w*compiled", speed_tests)

    profile = re.search(r"python3 (benchmarks/profile_step\.py) ([^>]*)>", " ".join(_logical_lines(SCRIPT)))
    source = (ROOT / profile.group(1)).read_text()
    known = set(re.findall(r'add_argument\("(--\w+)"', source))
    used = set(re.findall(r"--\w+", profile.group(2)))
    assert used and used <= known, used - known

    for module, name in re.findall(r"from (rwkv_disha[\w.]*) import (\w+)", SCRIPT):
        path = ROOT / "src" / Path(*module.split("."))
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        tree = ast.parse(path.read_text())
        assert name in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, f"{module}.{name}"
