"""What cutting a padded batch after its last counted position saves (data/dataset.py ``trim_padding``).

    .venv/bin/python benchmarks/bench_pad_trim.py               # L4 C768 V65536, 4 x 512, docs of 96
    .venv/bin/python benchmarks/bench_pad_trim.py --n_layer 12 --doc 64 --rounds 3

`--dataload pad` pads every document to ctx_len. A forward + backward of train's loss (Bone r64, fp32,
random weights) on a batch of ``--bsz`` documents of ``--doc`` tokens padded to ``--ctx_len``, with and
without the trim, interleaved round by round; prints the medians and their ratio as JSON. The loss and
gradients are the same either way (tests/train/test_infctx.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from rwkv_disha.adapters import AdapterConfig, inject_adapters, mark_trainable
from rwkv_disha.model.init import init_state_dict
from rwkv_disha.model.load import infer_config, model_from_state_dict
from rwkv_disha.train.modes import sample_loss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n_layer", type=int, default=4)
    ap.add_argument("--n_embd", type=int, default=768)
    ap.add_argument("--ctx_len", type=int, default=512)
    ap.add_argument("--bsz", type=int, default=4)
    ap.add_argument("--doc", type=int, default=96, help="tokens per document (the rest is padding)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    sd = init_state_dict(args.n_layer, args.n_embd, 65536, 64, seed=0)
    model = model_from_state_dict(sd, infer_config(sd), op="torch")
    cfg = AdapterConfig.from_cli("disha", '{"mode":"bone","r":64}')
    inject_adapters(model, cfg)
    mark_trainable(model, cfg)
    B, T = args.bsz, args.ctx_len
    mask = torch.zeros(B, T)
    mask[:, : args.doc] = 1
    batch = {
        "input_ids": torch.randint(0, 65536, (B, T)),
        "labels": torch.randint(0, 65536, (B, T)),
        "mask": mask,
    }

    def step(trim: bool) -> float:
        model.zero_grad()
        t = time.perf_counter()
        sample_loss("none", model, batch, T, trim=trim).backward()
        return time.perf_counter() - t

    times: dict[bool, list[float]] = {False: [], True: []}
    step(True)  # warm-up
    for _ in range(args.rounds):
        for trim in (False, True):
            times[trim].append(step(trim))
    full, cut = statistics.median(times[False]), statistics.median(times[True])
    result = {**vars(args), "padded_s": round(full, 3), "trimmed_s": round(cut, 3)}
    result.update(speedup=round(full / cut, 2), threads=torch.get_num_threads())
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
