"""A/B of the training step against an older commit's WKV-7 chunked kernel and chunked head + CE.

    .venv/bin/python benchmarks/ab_step.py --ref 1d855ed --precision bf16 --rounds 12

Loads ``src/rwkv_disha/kernels/wkv7.py`` and ``src/rwkv_disha/train/loss.py`` as they were at ``--ref``
(``git show``) next to today's, builds `bench`'s TrainStep once (0.1B, ctx 512, Bone r64) and times its
step with each version swapped in, in interleaved rounds whose order alternates; prints each version's
median step and the paired median of new / old (a shared machine's drift cancels in the pairs).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def module_at(ref: str, path: str, name: str):
    src = subprocess.run(["git", "show", f"{ref}:{path}"], capture_output=True, text=True, check=True).stdout
    file = Path(tempfile.mkdtemp()) / f"{name}.py"
    file.write_text(src)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", required=True, help="the older commit")
    ap.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    ap.add_argument("--rounds", type=int, default=12)
    args = ap.parse_args()

    import rwkv_disha.kernels as kernels
    import rwkv_disha.train.loss as loss
    from rwkv_disha.bench import Config, TrainStep

    old_wkv = module_at(args.ref, "src/rwkv_disha/kernels/wkv7.py", "old_wkv7")
    old_loss = module_at(args.ref, "src/rwkv_disha/train/loss.py", "old_loss")
    new = (kernels._WKV7["torch"], kernels._WKV7["auto"], loss._HeadCE)
    old = (old_wkv.wkv7_chunked, old_wkv.wkv7_chunked, old_loss._HeadCE)

    def use(version):
        kernels._WKV7["torch"], kernels._WKV7["auto"], loss._HeadCE = version
        ts.model.set_op(ts.model.blocks[0].att.op)  # attention takes its kernel when its op is set

    cfg = Config(shape="0.1B", ctx_len=512, precision=args.precision, adapter="bone", r=64, device="cpu")
    ts = TrainStep(cfg, torch.device("cpu"), args.precision)
    batch = ts.batch(1)
    versions = {"new": new, "old": old}
    times: dict[str, list[float]] = {k: [] for k in versions}
    for v in versions.values():  # warm-up
        use(v)
        ts.step(batch)
    for rnd in range(args.rounds):
        for name in list(versions) if rnd % 2 == 0 else list(reversed(versions)):
            use(versions[name])
            t = time.perf_counter()
            ts.step(batch)
            times[name].append(time.perf_counter() - t)
    use(new)
    result = {
        "ref": args.ref,
        "precision": args.precision,
        "rounds": args.rounds,
        "step_s_median": {k: round(statistics.median(v), 3) for k, v in times.items()},
        "new_over_old_paired_median": round(
            statistics.median(a / b for a, b in zip(times["new"], times["old"])), 3
        ),
    }
    json.dump(result, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
