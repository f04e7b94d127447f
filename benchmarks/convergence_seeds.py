"""Seed spread of the convergence study (issue 14): re-run each method's fine-tuning at its best lr with
other seeds (data order, LoRA / PiSSA randomness), on the base and corpora a finished study left in --out.

    .venv/bin/python benchmarks/convergence.py --out /tmp/conv/work          # the study, keeps its folder
    .venv/bin/python benchmarks/convergence_seeds.py --out /tmp/conv/work --seeds 1 2

A seed whose last adapter file is already in --out (an earlier call) is only evaluated again.

Writes per-seed final held-out losses and curves next to the study's seed-0 numbers, so a difference
between methods can be read against the difference between seeds of one method.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import convergence as study  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="the finished study's scratch folder (base.pth, man_*)")
    ap.add_argument("--study", default="benchmarks/results/convergence.json")
    ap.add_argument("--results", default="benchmarks/results/convergence_seeds.json")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    a = ap.parse_args()
    res = json.loads(Path(a.study).read_text())
    s = argparse.Namespace(**res["settings"])
    out, t0 = Path(a.out), time.perf_counter()
    finals: dict[str, dict[int, float]] = {}
    curves: dict[str, list] = {}
    for method in study.METHODS:
        lr = res["best_lr"][method]
        finals[method] = {0: res["final_heldout_loss"][f"{method} lr {lr:g}"]}
        for seed in a.seeds:
            s.seed = seed
            proj = out / f"{method}-{lr:g}-seed{seed}"
            last = proj / f"rwkv-{s.steps // s.eval_every - 1}.pth"
            if not last.is_file():  # a seed trained by an earlier call is evaluated again, not retrained
                study.train(out / "base.pth", out / "man_train", proj, s.steps, s.eval_every, lr, s,
                            study.adapter_flags(method, s.r))  # fmt: skip
            pts = [(0, res["heldout_loss_base"])]
            for k in range(s.steps // s.eval_every):
                base, adapter, held = out / "base.pth", proj / f"rwkv-{k}.pth", out / "man_heldout"
                loss = study.heldout_loss(base, adapter, held, s.ctx, s.eval_samples)
                pts.append(((k + 1) * s.eval_every, loss))
            finals[method][seed] = pts[-1][1]
            curves[f"{method} lr {lr:g} seed {seed}"] = pts
            print(f"{method} lr {lr:g} seed {seed}: {pts[-1][1]:.4f}", file=sys.stderr, flush=True)
    summary = {
        m: {"mean": statistics.mean(v.values()), "min": min(v.values()), "max": max(v.values())}
        for m, v in finals.items()
    }
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "study": a.study,
        "best_lr": res["best_lr"],
        "final_heldout_loss_by_seed": finals,
        "summary": summary,
        "curves": curves,
        "wall_minutes": (time.perf_counter() - t0) / 60,
    }
    from rwkv_disha.fsio import atomic_write_json

    atomic_write_json(a.results, result, what="results")
    print(json.dumps({k: v for k, v in result.items() if k != "curves"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
