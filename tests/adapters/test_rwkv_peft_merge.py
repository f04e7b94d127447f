"""RWKV-PEFT's merge scripts and PiSSA runs. Its PiSSA rwkv-N.pth holds lora_A / lora_B only, and
PROJ_DIR/init_pissa.pth the factors they started from (``<layer>.init_lora_A`` / ``.init_lora_B``).
``merge --lora_init`` (RWKV-PEFT merge.py's flag), ``export --lora_init`` and train's ``pissa_init`` read the
pair as one PiSSA adapter; checked against RWKV-PEFT's merge formula written out here: W - init_B @ init_A +
B @ A, no scaling. Its scripts/merge_*.sh run unchanged but for the command."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from adapter_helpers import logits, rel_err, tokens

from rwkv_disha import load_model
from rwkv_disha.adapters import AdapterConfig
from rwkv_disha.cli import main
from rwkv_disha.model.load import load_state_dict

R = 4
LAYERS = ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value")


def _rwkv_peft_pissa_run(base_path: Path, folder: Path, seed: int = 5) -> tuple[Path, Path]:
    """What an RWKV-PEFT --peft pissa run leaves: rwkv-3.pth (trained A, B + the ln tensors) and
    init_pissa.pth (the start, here random factors: the merge formula holds for any)."""
    base = load_state_dict(base_path)
    g = torch.Generator().manual_seed(seed)
    ckpt, init = {}, {}
    for i in range(2):
        for layer in LAYERS:
            out_f, in_f = base[f"blocks.{i}.{layer}.weight"].shape
            a0, b0 = torch.randn(R, in_f, generator=g) * 0.2, torch.randn(out_f, R, generator=g) * 0.2
            init[f"blocks.{i}.{layer}.init_lora_A"], init[f"blocks.{i}.{layer}.init_lora_B"] = a0, b0
            ckpt[f"blocks.{i}.{layer}.lora_A"] = a0 + torch.randn(R, in_f, generator=g) * 0.05
            ckpt[f"blocks.{i}.{layer}.lora_B"] = b0 + torch.randn(out_f, R, generator=g) * 0.05
    ckpt.update({k: v + 0.1 for k, v in base.items() if "ln" in k})  # --train_parts ln: every ln tensor
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, folder / "rwkv-3.pth")
    torch.save(init, folder / "init_pissa.pth")
    return folder / "rwkv-3.pth", folder / "init_pissa.pth"


def _rwkv_peft_merge(base_path: Path, ckpt_path: Path, init_path: Path) -> dict[str, torch.Tensor]:
    """RWKV-PEFT merge.py --type pissa, in fp32: W - init_B @ init_A + B @ A; other tensors replaced."""
    w = {k: v.float() for k, v in load_state_dict(base_path).items()}
    ckpt, init = torch.load(ckpt_path, weights_only=True), torch.load(init_path, weights_only=True)
    for k in [k for k in ckpt if k.endswith(".lora_A")]:
        p = k.removesuffix(".lora_A")
        w[f"{p}.weight"] += (
            ckpt[f"{p}.lora_B"] @ ckpt[k] - init[f"{p}.init_lora_B"] @ init[f"{p}.init_lora_A"]
        )
    w.update({k: v for k, v in ckpt.items() if not k.endswith((".lora_A", ".lora_B"))})
    return w


@pytest.fixture
def run(make_checkpoint, tmp_path):
    base = make_checkpoint(2, 128, 300, seed=7)
    ckpt, init = _rwkv_peft_pissa_run(base, tmp_path / "peft_run")
    return base, ckpt, init


def test_merge_with_lora_init_is_rwkv_peft_merge(run, tmp_path):
    base, ckpt, init = run
    out = tmp_path / "merged.pth"
    argv = ["merge", "--base_model", str(base), "--peft_checkpoint", str(ckpt), "--lora_init", str(init)]
    assert main([*argv, "--output", str(out)]) == 0
    merged, ref = load_state_dict(out), _rwkv_peft_merge(base, ckpt, init)
    assert list(merged) == list(load_state_dict(base))  # exactly the base's keys, in its order
    for k, v in ref.items():
        torch.testing.assert_close(merged[k].float(), v, rtol=1e-5, atol=1e-6, msg=k)
    assert not torch.equal(
        merged["blocks.1.att.key.weight"], load_state_dict(base)["blocks.1.att.key.weight"]
    )


def test_export_with_lora_init_writes_one_pissa_file(run, tmp_path, capsys):
    """The pair becomes one of our PiSSA files (sidecar without the init path): merge, generate and eval
    then need nothing else, and the model equals RWKV-PEFT's merge."""
    base, ckpt, init = run
    ours = tmp_path / "ours.pth"
    argv = ["export", "--peft_checkpoint", str(ckpt), "--lora_init", str(init), "--format", "pth"]
    assert main([*argv, "--output", str(ours)]) == 0
    tensors = torch.load(ours, weights_only=True)
    assert torch.equal(tensors["blocks.1.ffn.key.pissa_A0"], torch.load(init)["blocks.1.ffn.key.init_lora_A"])
    side = json.loads(ours.with_suffix(".json").read_text())
    assert (
        side["adapter"]["peft"] == "pissa"
        and side["adapter"]["r"] == R
        and "pissa_init" not in side["adapter"]
    )
    assert (
        main(
            [
                "merge",
                "--base_model",
                str(base),
                "--peft_checkpoint",
                str(ours),
                "--output",
                str(tmp_path / "m.pth"),
            ]
        )
        == 0
    )
    ref_path = tmp_path / "ref.pth"
    torch.save(_rwkv_peft_merge(base, ckpt, init), ref_path)
    idx = tokens(300)
    assert (
        rel_err(
            logits(load_model(tmp_path / "m.pth", op="torch"), idx),
            logits(load_model(ref_path, op="torch"), idx),
        )
        <= 1e-5
    )


def test_train_continues_an_rwkv_peft_pissa_run(run, tmp_path):
    """pissa_load + pissa_init: the run starts from the pair; the frozen initial factors come through
    unchanged into the new rwkv-N.pth (which then holds them, so its sidecar records no init file)."""
    base, ckpt, init = run
    proj = tmp_path / "proj"
    cfg = json.dumps({"pissa_load": str(ckpt), "pissa_init": str(init), "pissa_r": R})
    argv = ["train", "--load_model", str(base), "--proj_dir", str(proj), "--data_type", "dummy"]
    argv += ["--ctx_len", "32", "--micro_bsz", "1", "--epoch_steps", "2"]
    argv += ["--epoch_count", "1", "--lr_init", "1e-3", "--lr_final", "1e-3", "--accelerator", "cpu"]
    argv += ["--precision", "fp32", "--progress_bar", "0", "--peft", "pissa", "--pissa_config", cfg]
    argv += ["--train_parts", "ln"]
    assert main(argv) == 0
    saved = torch.load(proj / "rwkv-0.pth", weights_only=True)
    start_a, start_b = (
        torch.load(init)["blocks.0.att.value.init_lora_A"],
        torch.load(init)["blocks.0.att.value.init_lora_B"],
    )
    assert torch.equal(saved["blocks.0.att.value.pissa_A0"], start_a)
    assert torch.equal(saved["blocks.0.att.value.pissa_B0"], start_b)
    trained = torch.load(ckpt)["blocks.0.att.value.lora_A"]
    moved = (saved["blocks.0.att.value.lora_A"] - trained).abs().max().item()
    assert 0 < moved < 0.05  # started from RWKV-PEFT's A (a fresh SVD start would be far from it)
    assert "pissa_init" not in json.loads((proj / "rwkv-0.json").read_text())["adapter"]


def _refused(capsys, argv, folder: Path, fragment: str) -> None:
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


def test_an_init_file_that_does_not_belong_is_refused(run, tmp_path, capsys, random_adapter, make_checkpoint):
    base, ckpt, init = run
    merge = ["merge", "--base_model", str(base), "--output", str(tmp_path / "m.pth")]
    init_sd = torch.load(init)
    # another run's init file: a layer missing, one extra, another shape
    for name, change, fragment in [
        (
            "missing",
            lambda d: d.pop("blocks.1.ffn.value.init_lora_B"),
            "lacks blocks.1.ffn.value.init_lora_B",
        ),
        (
            "extra",
            lambda d: d.update({"blocks.5.att.key.init_lora_A": torch.zeros(R, 128)}),
            "does not adapt (blocks.5.att.key)",
        ),
        (
            "shape",
            lambda d: d.update({"blocks.0.att.key.init_lora_A": torch.zeros(R + 1, 128)}),
            "is (5, 128) but",
        ),
        (
            "not-init",
            lambda d: d.update({"emb.weight": torch.zeros(3, 3)}),
            "is not RWKV-PEFT's init_pissa.pth",
        ),
    ]:
        bad = dict(init_sd)
        change(bad)
        path = tmp_path / f"init-{name}.pth"
        torch.save(bad, path)
        _refused(
            capsys, [*merge, "--peft_checkpoint", str(ckpt), "--lora_init", str(path)], tmp_path, fragment
        )
    # an init file for a file that holds its own factors, or for a file that is no PiSSA checkpoint
    ours = tmp_path / "ours.pth"
    assert (
        main(
            [
                "export",
                "--peft_checkpoint",
                str(ckpt),
                "--lora_init",
                str(init),
                "--format",
                "pth",
                "--output",
                str(ours),
            ]
        )
        == 0
    )
    _refused(
        capsys,
        [*merge, "--peft_checkpoint", str(ours), "--lora_init", str(init)],
        tmp_path,
        "is not an RWKV-PEFT checkpoint",
    )
    bare = tmp_path / "bare.pth"
    torch.save(torch.load(ours), bare)  # our tensors without the sidecar: the factors are in the file
    _refused(
        capsys,
        [*merge, "--peft_checkpoint", str(bare), "--lora_init", str(init)],
        tmp_path,
        "already holds PiSSA's initial factors",
    )
    bone_cfg = AdapterConfig.from_cli("disha", '{"mode":"bone","r":8}')
    bone = torch.load(random_adapter(base, bone_cfg, tmp_path / "bone.pth"))
    torch.save(bone, tmp_path / "bone-bare.pth")
    _refused(
        capsys,
        [*merge, "--peft_checkpoint", str(tmp_path / "bone-bare.pth"), "--lora_init", str(init)],
        tmp_path,
        "holds no lora_A / lora_B",
    )
    # the init file is an input: never an output
    argv = ["merge", "--base_model", str(base), "--peft_checkpoint", str(ckpt), "--lora_init", str(init)]
    _refused(capsys, [*argv, "--output", str(init), "--overwrite", "1"], tmp_path, "would overwrite an input")
    argv = ["export", "--peft_checkpoint", str(ckpt), "--lora_init", str(init), "--format", "pth"]
    _refused(capsys, [*argv, "--output", str(init), "--overwrite", "1"], tmp_path, "is the input")
    _refused(
        capsys,
        [
            "export",
            "--format",
            "hf",
            "--load_model",
            str(base),
            "--lora_init",
            str(init),
            "--output",
            str(tmp_path / "hf"),
        ],
        tmp_path,
        "reads no --lora_init",
    )
    assert os.path.getsize(init) > 0


MERGE_PISSA_SH = """
base_model='{base}'
pissa_init='{init}'
pissa_checkpoint='{ckpt}'
output='{out}'
TYPE='pissa'

python merge/merge.py --base_model $base_model \\
--lora_init $pissa_init \\
--lora_checkpoint $pissa_checkpoint \\
--output $output \\
--type $TYPE
"""
MERGE_LORA_SH = """base_model='{base}'
lora_checkpoint='{ckpt}'
output='{out}'
TYPE='lora'
Lora_alpha=32

python merge/merge.py --base_model $base_model \\
--lora_checkpoint $lora_checkpoint \\
--output $output \\
--type $TYPE \\
--lora_alpha $Lora_alpha"""


def _run_script(text: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """RWKV-PEFT's merge script with `python merge/merge*.py` replaced by `rwkv-disha merge`, nothing else."""
    script = tmp_path / "merge.sh"
    command = f"{sys.executable} -m rwkv_disha.cli merge"
    script.write_text(re.sub(r"python merge/merge\w*\.py", lambda _: command, text))
    return subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=300)


def test_rwkv_peft_merge_scripts_run_unchanged(run, tmp_path):
    """scripts/merge_pissa.sh and merge_lora.sh of RWKV-PEFT: --lora_checkpoint, --lora_init, --type and
    --lora_alpha as its merge.py takes them; the results equal its merge formulas."""
    base, ckpt, init = run
    out = tmp_path / "pissa.pth"
    done = _run_script(MERGE_PISSA_SH.format(base=base, init=init, ckpt=ckpt, out=out), tmp_path)
    assert done.returncode == 0, done.stderr
    ref = _rwkv_peft_merge(base, ckpt, init)
    merged = load_state_dict(out)
    for k, v in ref.items():
        torch.testing.assert_close(merged[k].float(), v, rtol=1e-5, atol=1e-6, msg=k)
    # LoRA: W + B @ A * alpha / r, the same lora_A / lora_B file read without an init file
    out = tmp_path / "lora.pth"
    done = _run_script(MERGE_LORA_SH.format(base=base, ckpt=ckpt, out=out), tmp_path)
    assert done.returncode == 0, done.stderr
    w, lora = load_state_dict(base), torch.load(ckpt, weights_only=True)
    merged = load_state_dict(out)
    for k in [k for k in lora if k.endswith(".lora_A")]:
        p = k.removesuffix(".lora_A")
        expect = w[f"{p}.weight"].float() + lora[f"{p}.lora_B"] @ lora[k] * (32 / R)
        torch.testing.assert_close(merged[f"{p}.weight"].float(), expect, rtol=1e-5, atol=1e-5, msg=p)


def test_type_names_the_kind_the_file_must_hold(run, tmp_path, capsys):
    """--type pissa on a PiSSA checkpoint given without its init file (which reads as LoRA, the silent
    wrong merge) names the missing file; any other mismatch names both kinds."""
    base, ckpt, init = run
    merge = ["merge", "--base_model", str(base), "--output", str(tmp_path / "m.pth")]
    _refused(
        capsys,
        [*merge, "--lora_checkpoint", str(ckpt), "--type", "pissa", "--lora_alpha", "8"],
        tmp_path,
        "add --lora_init PROJ_DIR/init_pissa.pth",
    )
    argv = [*merge, "--lora_checkpoint", str(ckpt), "--lora_init", str(init), "--type", "lora"]
    _refused(capsys, argv, tmp_path, "holds PiSSA r=4 svd_niter=4, not LoRA")
    argv = [*merge, "--lora_checkpoint", str(ckpt), "--peft_checkpoint", str(ckpt)]
    _refused(capsys, argv, tmp_path, "give one of --peft_checkpoint / --lora_checkpoint")


MERGE_BONE_SH = """
base_model='{base}'
bone_checkpoint='{ckpt}'
output='{out}'


python merge/merge_bone.py --base_model $base_model \\
--lora_checkpoint $bone_checkpoint \\
--output $output \\
"""


def test_rwkv_peft_merge_bone_script_runs_unchanged(make_checkpoint, tmp_path, random_adapter):
    """scripts/merge_bone.sh on an RWKV-PEFT Bone file (its older ``.bone`` tensor names, no sidecar)
    gives W + ΔW with ΔW[o, i] = bone[i mod r, o], written out here."""
    base = make_checkpoint(2, 128, 300, seed=7)
    ours = random_adapter(base, AdapterConfig.from_cli("disha", '{"mode":"bone","r":16}'), tmp_path / "a.pth")
    bone = {k.replace(".disha", ".bone"): v for k, v in torch.load(ours, weights_only=True).items()}
    torch.save(bone, tmp_path / "rwkv-0.pth")
    out = tmp_path / "merged.pth"
    script = MERGE_BONE_SH.format(base=base, ckpt=tmp_path / "rwkv-0.pth", out=out)
    done = _run_script(script, tmp_path)
    assert done.returncode == 0, done.stderr
    w, merged = load_state_dict(base), load_state_dict(out)
    for k in [k for k in bone if k.endswith(".bone")]:
        p, b = k.removesuffix(".bone"), bone[k]  # (r, out)
        in_f = w[f"{p}.weight"].shape[1]
        delta = b[torch.arange(in_f) % b.shape[0]].t()  # (out, in)
        torch.testing.assert_close(merged[f"{p}.weight"].float(), w[f"{p}.weight"].float() + delta, msg=p)
