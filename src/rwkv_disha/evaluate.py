"""`rwkv-disha eval`: mean loss and perplexity of a model (base, base + adapter, or merged) on data.

Uses the training data pipeline (same --data_type / --dataload / --loss_mask), in file order, so two
models evaluated with the same flags see exactly the same tokens.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from rwkv_disha.choices import DATA_TYPES, DATALOADS, LOSS_MASKS, OPS
from rwkv_disha.config import opt
from rwkv_disha.errors import RWKVDishaError


@dataclass
class Config:
    load_model: str = opt("", "base or merged model")
    peft_checkpoint: str = opt("", "adapter file to apply on the fly")
    data_file: str = opt("", "data (binidx prefix or file)")
    data_type: str = opt("binidx", "format of data_file", DATA_TYPES)
    ctx_len: int = opt(512, "context length")
    dataload: str = opt("pad", "pad, only or get", DATALOADS)
    loss_mask: str = opt("pad", "none, pad or qa", LOSS_MASKS)
    micro_bsz: int = opt(4, "batch size")
    max_samples: int = opt(256, "evaluate at most this many samples (0: one pass over the data)")
    op: str = opt("auto", "WKV kernel", OPS)
    seed: int = opt(0, "seed (only used by dataload get)")


def perplexity(loss: float) -> float:
    """exp(loss), capped so a diverged loss prints as a large number instead of overflowing."""
    return math.exp(min(loss, 50.0))


@torch.no_grad()
def evaluate_loss(model, dataset, micro_bsz: int, max_samples: int) -> dict:
    """Token-weighted mean loss over the first ``max_samples`` samples of ``dataset``."""
    from rwkv_disha.data.dataset import collate

    n = len(dataset) if max_samples <= 0 else min(max_samples, len(dataset))
    if getattr(dataset, "dataload", "get") != "get":
        n = min(n, dataset.n_items)  # one document at most once
    total, count = 0.0, 0.0
    for start in range(0, n, micro_bsz):
        batch = collate([dataset[i] for i in range(start, min(start + micro_bsz, n))])
        logits = model(batch["input_ids"]).float()
        ce = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), batch["labels"].flatten(), reduction="none"
        )
        mask = batch["mask"].flatten()
        total += float((ce * mask).sum())
        count += float(mask.sum())
    if count == 0:
        raise RWKVDishaError("no token counts towards the loss in these samples (check --loss_mask / data)")
    loss = total / count
    return {"loss": loss, "ppl": perplexity(loss), "tokens": int(count), "samples": n}


def validate(cfg: Config) -> None:
    """Every option checked before the model loads (non-finite floats are refused by the CLI)."""
    from rwkv_disha.generate import check_input_file
    from rwkv_disha.kernels import resolve_op

    if not cfg.load_model:
        raise RWKVDishaError("--load_model is required")
    check_input_file(cfg.load_model, "--load_model")
    if cfg.peft_checkpoint:
        check_input_file(cfg.peft_checkpoint, "--peft_checkpoint")
    if cfg.data_type != "dummy" and not cfg.data_file:
        raise RWKVDishaError("--data_file is required (a binidx prefix, or a file for other data types)")
    for name in ("ctx_len", "micro_bsz"):
        if getattr(cfg, name) < 1:
            raise RWKVDishaError(f"--{name} must be positive, got {getattr(cfg, name)}")
    if cfg.max_samples < 0:
        raise RWKVDishaError(f"--max_samples must be >= 0 (0: one pass over the data), got {cfg.max_samples}")
    if cfg.dataload == "only" and cfg.micro_bsz != 1:
        raise RWKVDishaError(f"--dataload only needs --micro_bsz 1 (got {cfg.micro_bsz})")
    resolve_op(cfg.op)


def run(cfg: Config) -> int:
    from rwkv_disha.data.dataset import make_dataset
    from rwkv_disha.generate import load_for_inference
    from rwkv_disha.model.load import infer_config, load_state_dict

    validate(cfg)
    vocab = infer_config(load_state_dict(cfg.load_model)).vocab_size
    steps = max(1, math.ceil(max(cfg.max_samples, 1) / cfg.micro_bsz)) if cfg.max_samples > 0 else 0
    ds = make_dataset(
        cfg.data_file,
        cfg.data_type,
        cfg.dataload,
        cfg.ctx_len,
        cfg.micro_bsz,
        steps,
        cfg.loss_mask,
        cfg.seed,
        vocab,
        shuffle=False,
    )
    model = load_for_inference(cfg.load_model, cfg.peft_checkpoint, cfg.op)
    print(json.dumps(evaluate_loss(model, ds, cfg.micro_bsz, cfg.max_samples)))
    return 0
