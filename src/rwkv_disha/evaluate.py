"""`rwkv-disha eval`: loss, perplexity and next-token accuracy of a model (base, base + adapter, or
merged) on data; with --compare, of several models side by side on the same tokens.

Uses the training data pipeline (same --data_type / --dataload / --loss_mask), in file order, so two
models evaluated with the same flags see exactly the same tokens.

  rwkv-disha eval --load_model base.pth --compare out/rwkv-3.pth merged.pth --data_file data/x
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from rwkv_disha.choices import DATA_TYPES, DATALOADS, LOSS_MASKS, OPS
from rwkv_disha.config import opt
from rwkv_disha.data.sft import sft_spec
from rwkv_disha.errors import RWKVDishaError


@dataclass
class Config:
    load_model: str = opt("", "base or merged model")
    peft_checkpoint: str = opt("", "adapter file to apply on the fly")
    state: str = opt("", "state file (rwkv-N.pth of --peft state): every sample starts from its states")
    data_file: str = opt("", "data (binidx prefix or file)")
    data_type: str = opt("binidx", "format of data_file", DATA_TYPES)
    ctx_len: int = opt(512, "context length")
    dataload: str = opt("pad", "pad, only or get", DATALOADS)
    loss_mask: str = opt("pad", "none, pad or qa (sft data: pad = qa)", LOSS_MASKS)
    sft_field: list[str] = opt(
        ["query", "response"], "--data_type sft: the query and the response key of each record (RWKV-PEFT's)"
    )
    sft_split: str = opt(
        "train", "--data_type sft: the split, in datasets' syntax: train, train[:1000], train[10%:20%]"
    )
    micro_bsz: int = opt(4, "batch size")
    max_samples: int = opt(256, "evaluate at most this many samples (0: one pass over the data)")
    op: str = opt("auto", "WKV kernel", OPS)
    seed: int = opt(0, "seed (only used by dataload get)")
    compare: list[str] = opt(
        [], "more models on the same tokens: adapter files (applied to --load_model) or merged models"
    )
    json: str = opt("", "also write the results to this JSON file (a new file in an existing folder)")
    overwrite: bool = opt(False, "replace an existing --json file (refused otherwise)")


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
    total, count, correct = 0.0, 0.0, 0.0
    for start in range(0, n, micro_bsz):
        batch = collate([counted_part(dataset[i]) for i in range(start, min(start + micro_bsz, n))])
        logits = model(batch["input_ids"]).float().flatten(0, 1)
        labels, mask = batch["labels"].flatten(), batch["mask"].flatten()
        ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
        total += float((ce * mask).sum())
        correct += float(((logits.argmax(-1) == labels).float() * mask).sum())
        count += float(mask.sum())
    if count == 0:
        raise RWKVDishaError("no token counts towards the loss in these samples (check --loss_mask / data)")
    loss = total / count
    return {"loss": loss, "ppl": perplexity(loss), "acc": correct / count, "tokens": int(count), "samples": n}


def counted_part(sample: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``sample`` cut after its last position that counts (mask > 0): the model is causal, so the cut
    changes no counted logit, and a batch is padded to its longest sample, not to --ctx_len."""
    counted = torch.nonzero(sample["mask"]).flatten()
    end = int(counted[-1]) + 1 if counted.numel() else 1
    return {key: t[:end] for key, t in sample.items()}


def validate(cfg: Config) -> None:
    """Every option checked before the model loads (non-finite floats are refused by the CLI)."""
    from rwkv_disha.generate import check_input_file, check_op_for_model
    from rwkv_disha.kernels import resolve_op

    if not cfg.load_model:
        raise RWKVDishaError("--load_model is required")
    check_input_file(cfg.load_model, "--load_model")
    if cfg.peft_checkpoint:
        check_input_file(cfg.peft_checkpoint, "--peft_checkpoint")
    if cfg.state:
        check_input_file(cfg.state, "--state")
    for path in cfg.compare:
        check_input_file(path, "--compare")
    if cfg.json:
        from rwkv_disha.fsio import check_new_file

        check_new_file(cfg.json, "--json", cfg.overwrite)
    if cfg.data_type != "dummy" and not cfg.data_file:
        raise RWKVDishaError("--data_file is required (a binidx prefix, or a file for other data types)")
    for name in ("ctx_len", "micro_bsz"):
        if getattr(cfg, name) < 1:
            raise RWKVDishaError(f"--{name} must be positive, got {getattr(cfg, name)}")
    if cfg.max_samples < 0:
        raise RWKVDishaError(f"--max_samples must be >= 0 (0: one pass over the data), got {cfg.max_samples}")
    if cfg.dataload == "only" and cfg.micro_bsz != 1:
        raise RWKVDishaError(f"--dataload only needs --micro_bsz 1 (got {cfg.micro_bsz})")
    sft_spec(cfg)
    for path in [cfg.load_model, *(p for p in cfg.compare if model_kind(p) == "merged")]:
        check_op_for_model(cfg.op, path)  # every model the kernel will run, before any loads
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
        sft=sft_spec(cfg),
    )
    rows = []
    for i, (name, kind, model_path, adapter_path) in enumerate(models_to_compare(cfg)):
        # --state goes with --load_model (and its --peft_checkpoint), not with the --compare models
        model = load_for_inference(model_path, adapter_path, cfg.op, state=cfg.state if i == 0 else "")
        rows.append({"model": name, "kind": kind, **evaluate_loss(model, ds, cfg.micro_bsz, cfg.max_samples)})
        del model  # one model in memory at a time
    if cfg.json:
        from rwkv_disha.fsio import atomic_write_json

        atomic_write_json(cfg.json, rows if cfg.compare else rows[0], "--json", cfg.overwrite)
    if not cfg.compare:  # one model: the one JSON line scripts (and the demo) read
        print(json.dumps({k: v for k, v in rows[0].items() if k not in ("model", "kind")}))
    else:
        print(format_table(rows))
    return 0


def model_kind(path: str) -> str:
    """``merged`` for a whole model (it has the embedding), ``adapter`` for an adapter file."""
    from rwkv_disha.model.load import load_state_dict

    return "merged" if "emb.weight" in load_state_dict(path) else "adapter"  # mmap: nothing read


def models_to_compare(cfg: Config) -> list[tuple[str, str, str, str]]:
    """``(name, kind, model file, adapter file)`` of every model to evaluate, --load_model first. Files
    given to --compare are checked (an adapter's sidecar, NaN...) before the first evaluation starts."""
    from rwkv_disha.adapters import open_adapter_file

    first = "adapter" if cfg.peft_checkpoint else "base"
    out = [(cfg.peft_checkpoint or cfg.load_model, first, cfg.load_model, cfg.peft_checkpoint)]
    for path in cfg.compare:
        kind = model_kind(path)
        if kind == "adapter":
            open_adapter_file(path)  # a bad adapter is one line now, not after the first model's run
            out.append((path, kind, cfg.load_model, path))
        else:
            out.append((path, kind, path, ""))
    return out


def format_table(rows: list[dict]) -> str:
    """The side-by-side table: one row per model; the loss change is against the first row."""
    width = max(len("model"), *(len(r["model"]) for r in rows))
    head = f"{'model':<{width}}  {'kind':<7}  {'loss':>8}  {'ppl':>10}  {'acc':>6}  {'vs first':>8}  tokens"
    lines = [head, "-" * len(head)]
    for r in rows:
        delta = r["loss"] - rows[0]["loss"]
        lines.append(
            f"{r['model']:<{width}}  {r['kind']:<7}  {r['loss']:>8.4f}  {r['ppl']:>10.3f}  "
            f"{100 * r['acc']:>5.1f}%  {delta:>+8.4f}  {r['tokens']}"
        )
    return "\n".join(lines)
