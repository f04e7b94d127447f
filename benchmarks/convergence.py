"""Convergence study (issue 14): Bone, Bat, MiSS bat, LoRA and PiSSA at equal trainable parameters, real text.

1. pretrain a small RWKV-7 (`--peft none`, byte-level vocabulary of 256) on the Python standard library's
   sources found on this machine;
2. fine-tune it on a different real corpus, the machine's English man pages (troff markup stripped),
   with Bone, Bat, MiSS bat, LoRA and PiSSA at equal trainable parameters (Bone / Bat / MiSS bat r on
   every default target layer hold 9 x n_embd x r values per block, LoRA / PiSSA r/2 hold the same), the
   same steps, a small lr grid;
3. held-out loss every --eval_every steps (a held-out slice of the man pages), one PNG of the curves,
   the steps each method needs to reach LoRA's final held-out loss, wall time per step, and the merged
   model's held-out loss against the adapter applied on the fly.

The texts are read at run time and never written outside --out (a scratch folder). Every step goes through
the rwkv-disha commands (init, train, merge) and the eval code, so this measures the tool as users run it.

    .venv/bin/python benchmarks/convergence.py                  # the full study (27 min on 2 quiet vCPUs)
    .venv/bin/python benchmarks/convergence.py --quick          # a <= 10 min version (tiny: a smoke run)
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gzip
import io
import json
import random
import re
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

METHODS = ("bone", "bat", "miss_bat", "lora", "pissa")
# MiSS's default ("balance") mode is Bone itself, so it is not run twice; MiSS mini trains (r, mini_r)
# per layer and cannot hold Bone's parameter count without becoming Bone (mini_r = out), so it is left out.
_TROFF_ESCAPES = re.compile(r"\\f[BIRP]|\\f\(..|\\\(..|\\[-&|^e]|\\s[-+]?\d")


def stdlib_documents(limit_bytes: int) -> list[bytes]:
    """The .py files of this interpreter's standard library (tests left out), in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs, total = [], 0
    for p in sorted(root.rglob("*.py")):
        if "test" in p.parts or "site-packages" in p.parts:
            continue
        try:
            data = p.read_bytes()
        except OSError:
            continue
        data = data.replace(b"\x00", b"")  # byte 0 is the end-of-document token
        if data:
            docs.append(data)
            total += len(data)
        if total >= limit_bytes:
            break
    return docs


def man_documents(limit_bytes: int) -> list[bytes]:
    """English man pages (section 1), troff requests and font escapes stripped: running prose."""
    docs, total = [], 0
    for p in sorted(Path("/usr/share/man/man1").glob("*.gz")):
        try:
            raw = gzip.decompress(p.read_bytes()).decode("utf-8")
        except (OSError, UnicodeDecodeError, EOFError):
            continue
        lines = [_TROFF_ESCAPES.sub("", line) for line in raw.splitlines() if not line.startswith((".", "'"))]
        text = "\n".join(line for line in lines if line.strip()).encode("utf-8").replace(b"\x00", b"")
        if len(text) > 200:
            docs.append(text)
            total += len(text)
        if total >= limit_bytes:
            break
    return docs


def write_bytes_dataset(prefix: Path, docs: list[bytes]) -> int:
    from rwkv_disha.data.binidx import write_binidx

    arrays = [np.append(np.frombuffer(d, dtype=np.uint8).astype(np.int32), 0) for d in docs]
    return write_binidx(prefix, arrays)[1]


def cli(*args) -> str:
    """One rwkv-disha command in this process; its stdout (progress and logs stay on stderr)."""
    from rwkv_disha.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main([str(a) for a in args])
    if rc != 0:
        raise SystemExit(f"rwkv-disha {args[0]} failed (exit {rc})")
    return buf.getvalue()


def heldout_loss(base: Path, adapter: Path | None, data: Path, ctx: int, samples: int) -> float:
    from rwkv_disha.data.dataset import make_dataset
    from rwkv_disha.evaluate import evaluate_loss
    from rwkv_disha.generate import load_for_inference

    ds = make_dataset(str(data), "binidx", "get", ctx, 8, 0, "none", 0, 256, shuffle=False)
    model = load_for_inference(str(base), str(adapter) if adapter else "", "torch")
    return evaluate_loss(model, ds, 8, samples)["loss"]


def adapter_flags(method: str, r: int) -> list[str]:
    """The train flags of one method; LoRA and PiSSA at r/2 hold as many trained values as Bone at r."""
    if method == "lora":  # r/2 x (in + out) per layer = Bone's r x out summed over the block's targets
        cfg = {"lora_load": "", "lora_r": r // 2, "lora_alpha": r, "lora_dropout": 0.0}
        return ["--peft", "lora", "--lora_config", json.dumps(cfg)]
    if method == "pissa":
        cfg = {"pissa_load": "", "pissa_init": "", "pissa_r": r // 2, "svd_niter": 4}
        return ["--peft", "pissa", "--pissa_config", json.dumps(cfg)]
    if method == "miss_bat":  # (out/r, r, r) per layer: Bone's count, one r x r block per output block
        return ["--peft", "miss", "--peft_config", json.dumps({"r": r, "init_weights": "bat"})]
    return ["--peft", "disha", "--disha_config", json.dumps({"mode": method, "load": "", "r": r})]


def train(base: Path, data: Path, proj: Path, steps: int, every: int, lr: float, a, flags: list) -> float:
    """Train ``steps`` micro-batches, an adapter file every ``every``; returns the median seconds per
    micro-batch from metrics.csv (start-up, saving and evaluation left out)."""
    cli("train", "--load_model", base, "--proj_dir", proj, "--data_file", data, "--data_type", "binidx",
        "--dataload", "get", "--ctx_len", a.ctx, "--micro_bsz", a.bsz, "--epoch_steps", every,
        "--epoch_count", steps // every, "--epoch_save", 1, "--lr_init", lr, "--lr_final", lr / 10,
        "--warmup_steps", max(steps // 20, 1), "--accelerator", "cpu", "--precision", "fp32",
        "--op", "torch", "--grad_clip", 1.0, "--random_seed", a.seed, "--progress_bar", 0,
        "--train_parts", *flags)  # fmt: skip
    with open(proj / "metrics.csv") as f:
        times = [float(row["time"]) for row in csv.DictReader(f)]
    return float(np.median(np.diff(times))) if len(times) > 1 else float("nan")


def plot(curves: dict, best: dict, path: Path, lora_final: float) -> None:
    """Held-out loss curves: each method's best lr bold, its other lrs thin and dotted, in its colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rwkv_disha.fsio import atomic_write

    fig, ax = plt.subplots(figsize=(8, 4.8))
    colours = dict(zip(METHODS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for (method, lr), pts in sorted(curves.items()):
        xs, ys = [s for s, _ in pts], [v for _, v in pts]
        if lr == best[method]:
            ax.plot(xs, ys, color=colours[method], marker="o", ms=3, label=f"{method} lr {lr:g} (best)")
        else:
            ax.plot(xs, ys, color=colours[method], lw=0.7, ls=":", label=f"{method} lr {lr:g}")
    ax.axhline(lora_final, color="grey", lw=0.8, ls="--", label="LoRA's final (best lr)")
    ax.set_xlabel("fine-tuning step (micro-batches)")
    ax.set_ylabel("held-out loss (nats / byte)")
    ax.set_title("man pages after a stdlib-pretrained RWKV-7, equal trainable params")
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110), what="plot")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the short version (<= 10 min)")
    ap.add_argument("--out", default="", help="scratch folder (default: a temporary one)")
    ap.add_argument("--results", default="benchmarks/results/convergence.json")
    ap.add_argument("--png", default="docs/convergence.png")
    ap.add_argument("--n_layer", type=int, default=4)
    ap.add_argument("--n_embd", type=int, default=128)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--bsz", type=int, default=8)
    ap.add_argument("--pretrain_steps", type=int, default=1500)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval_every", type=int, default=25)
    ap.add_argument("--r", type=int, default=16, help="Bone / Bat r (LoRA gets r/2: same parameters)")
    ap.add_argument("--lrs", default="3e-3,1e-2,3e-2")
    ap.add_argument("--eval_samples", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.quick:
        a.n_layer, a.n_embd, a.ctx, a.pretrain_steps, a.steps, a.eval_every = 2, 64, 64, 90, 30, 10
        a.lrs, a.eval_samples = "3e-3,1e-2", 16
    lrs = [float(x) for x in a.lrs.split(",")]
    t_all = time.perf_counter()
    with contextlib.ExitStack() as stack:
        out = Path(a.out) if a.out else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        out.mkdir(parents=True, exist_ok=True)
        random.seed(a.seed)
        code = stdlib_documents(8 << 20)
        man = man_documents(4 << 20)
        random.shuffle(man)
        n_held = max(len(man) // 10, 1)
        sizes = {
            "stdlib_tokens": write_bytes_dataset(out / "stdlib", code),
            "man_train_tokens": write_bytes_dataset(out / "man_train", man[n_held:]),
            "man_heldout_tokens": write_bytes_dataset(out / "man_heldout", man[:n_held]),
            "stdlib_files": len(code),
            "man_pages": len(man),
        }
        print(f"corpora: {sizes}", file=sys.stderr)
        cli("init", "--output", out / "init.pth", "--n_layer", a.n_layer, "--n_embd", a.n_embd,
            "--vocab_size", 256, "--seed", a.seed)  # fmt: skip
        pre_every = a.pretrain_steps // 3
        pre_s = train(out / "init.pth", out / "stdlib", out / "pre", pre_every * 3, pre_every, 3e-3, a,
                      ["--peft", "none"])  # fmt: skip
        # --peft none saves the whole model: the last file is the pretrained base
        base = Path(shutil.copy(out / "pre" / "rwkv-2.pth", out / "base.pth"))
        held = out / "man_heldout"
        base_loss = heldout_loss(base, None, held, a.ctx, a.eval_samples)
        curves, seconds = {}, {}
        for method in METHODS:
            for lr in lrs:
                proj = out / f"{method}-{lr:g}"
                flags = adapter_flags(method, a.r)  # no --train_parts: the adapters alone, equal in size
                seconds[(method, lr)] = train(
                    base, out / "man_train", proj, a.steps, a.eval_every, lr, a, flags
                )
                pts = [(0, base_loss)]
                for k in range(a.steps // a.eval_every):
                    loss = heldout_loss(base, proj / f"rwkv-{k}.pth", held, a.ctx, a.eval_samples)
                    pts.append(((k + 1) * a.eval_every, loss))
                curves[(method, lr)] = pts
                print(
                    f"{method} lr {lr:g}: {pts[-1][1]:.4f} ({seconds[(method, lr)]:.2f} s/step)",
                    file=sys.stderr,
                )
        best = {m: min((lr for lr in lrs), key=lambda lr, m=m: curves[(m, lr)][-1][1]) for m in METHODS}
        lora_final = curves[("lora", best["lora"])][-1][1]
        reach = {
            m: next((s for s, v in curves[(m, best[m])] if v <= lora_final), None) for m in METHODS
        }  # fmt: skip
        merged = {}
        last = a.steps // a.eval_every - 1
        for m in METHODS:
            proj = out / f"{m}-{best[m]:g}"
            cli("merge", "--base_model", base, "--peft_checkpoint", proj / f"rwkv-{last}.pth",
                "--output", proj / "merged.pth")  # fmt: skip
            merged[m] = {
                "adapter": curves[(m, best[m])][-1][1],
                "merged": heldout_loss(proj / "merged.pth", None, held, a.ctx, a.eval_samples),
            }
        from rwkv_disha.adapters.registry import ADAPTER_KINDS
        from rwkv_disha.model.load import load_state_dict

        # tensors a kind saves but never trains (PiSSA's starting factors)
        frozen = {n for kind in ADAPTER_KINDS.values() for n in kind.frozen_adapter_names}
        counts = {}  # trainable parameters = what the adapter file holds (no --train_parts here)
        for m in METHODS:
            sd = load_state_dict(out / f"{m}-{best[m]:g}" / f"rwkv-{last}.pth")
            counts[m] = int(sum(t.numel() for k, t in sd.items() if k.rsplit(".", 1)[-1] not in frozen))
        png = Path(a.png)
        plot(curves, best, png, lora_final)
        result = {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "settings": {
                k: getattr(a, k)
                for k in (
                    "n_layer",
                    "n_embd",
                    "ctx",
                    "bsz",
                    "pretrain_steps",
                    "steps",
                    "eval_every",
                    "r",
                    "eval_samples",
                    "seed",
                )
            },  # fmt: skip
            "lrs": lrs,
            "corpora": sizes,
            "pretrain_seconds_per_step": pre_s,
            "heldout_loss_base": base_loss,
            "trainable_params": counts,
            "best_lr": best,
            "final_heldout_loss": {f"{m} lr {lr:g}": c[-1][1] for (m, lr), c in curves.items()},
            "curves": {f"{m} lr {lr:g}": c for (m, lr), c in curves.items()},
            "lora_final": lora_final,
            "steps_to_lora_final": reach,
            "seconds_per_step": {f"{m} lr {lr:g}": s for (m, lr), s in seconds.items()},
            "merged_vs_adapter": merged,
            "wall_minutes": (time.perf_counter() - t_all) / 60,
        }
        from rwkv_disha.fsio import atomic_write_json

        Path(a.results).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(a.results, result, what="results")
        print(json.dumps({k: v for k, v in result.items() if k != "curves"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
