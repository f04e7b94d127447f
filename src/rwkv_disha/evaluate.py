"""`rwkv-disha eval`: loss, perplexity and next-token accuracy of a model (base, base + adapter, or
merged) on data; with --compare, of several models side by side on the same tokens.

Uses the training data pipeline (same --data_type / --dataload / --loss_mask): documents in file order,
--dataload get windows in the order (and from the offset) --seed draws, as training's shuffle does; so two
models evaluated with the same flags see exactly the same tokens.

  rwkv-disha eval --load_model base.pth --compare out/rwkv-3.pth merged.pth --data_file data/x
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from rwkv_disha.choices import DATA_TYPES, DATALOADS, LOSS_MASKS, OPS
from rwkv_disha.config import given_options, opt
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
    seed: int = opt(
        0,
        "--dataload get (or dummy data): the seed, in [0, 2**32), of the windows' order and offset, as "
        "training draws them (one seed: the same windows); pad / only read the documents in file order",
    )
    lora_alpha: float = opt(
        0.0,
        "LoRA alpha of the LoRA adapter files (--peft_checkpoint, --compare): needed without their .json "
        "sidecar, and replaces the sidecar's value when given (0 = from the sidecar; refused for other "
        "adapter kinds)",
    )
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
    from rwkv_disha.data.dataset import collate, trim_padding

    n = len(dataset) if max_samples <= 0 else min(max_samples, len(dataset))
    if getattr(dataset, "dataload", "get") != "get":
        n = min(n, dataset.n_items)  # one document at most once
    total, count, correct = 0.0, 0.0, 0.0
    for start in range(0, n, micro_bsz):
        # cut after the batch's last counted position: the model is causal, no counted logit changes
        batch = trim_padding(collate([dataset[i] for i in range(start, min(start + micro_bsz, n))]))
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


def validate(cfg: Config) -> None:
    """Every option checked before the model loads (non-finite floats are refused by the CLI)."""
    from rwkv_disha.generate import check_adapters, check_input_file, check_op_for_model
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

        check_json_not_input(cfg)  # first: --overwrite 1 must not make it replace a model or the data
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
    check_seed(cfg)
    sft_spec(cfg, given_options(cfg))
    adapters = [cfg.peft_checkpoint] if cfg.peft_checkpoint else []
    adapters += [p for p in cfg.compare if model_kind(p) == "adapter"]
    check_adapters(adapters, cfg.lora_alpha, "--peft_checkpoint or --compare")
    for path in [cfg.load_model, *(p for p in cfg.compare if model_kind(p) == "merged")]:
        check_op_for_model(cfg.op, path)  # every model the kernel will run, before any loads
    check_batch_fits(cfg)
    resolve_op(cfg.op)


def check_seed(cfg: Config) -> None:
    """--seed: in training's range, and refused where nothing reads it (documents go in file order)."""
    if not 0 <= cfg.seed < 2**32:
        raise RWKVDishaError(f"--seed must be in [0, 2**32), got {cfg.seed}")
    if cfg.seed and cfg.dataload != "get" and cfg.data_type != "dummy":
        raise RWKVDishaError(
            f"--seed draws the windows of --dataload get; --dataload {cfg.dataload} reads the documents in "
            "file order: drop --seed, or use --dataload get"
        )


def check_batch_fits(cfg: Config) -> None:
    """Refuse, before the data opens or a model loads, a --ctx_len x --micro_bsz batch that cannot fit in
    this machine's memory (eval runs on the CPU, without gradients). Counted per position: --dataload pad
    builds every sample at --ctx_len (input and label ids in int64, the mask in fp32: 20 bytes) before eval
    cuts it after its last counted token; get runs whole windows through the model, whose fp32 logits alone
    take 4 bytes per vocabulary entry. only reads each document at its own length: nothing to check."""
    from rwkv_disha.hardware import memory_bytes
    from rwkv_disha.model.load import infer_config, load_state_dict

    if cfg.dataload == "only":
        return
    per_position = 20
    if cfg.dataload == "get":
        per_position += 4 * infer_config(load_state_dict(cfg.load_model)).vocab_size
    need, have = cfg.micro_bsz * cfg.ctx_len * per_position, memory_bytes(on_gpu=False)
    if have is not None and need > have:
        what = "logits of" if cfg.dataload == "get" else "samples padded to"
        raise RWKVDishaError(
            f"--ctx_len {cfg.ctx_len} x --micro_bsz {cfg.micro_bsz} needs more than {need / 2**30:.0f} GiB "
            f"for a batch ({what} --ctx_len tokens), above this machine's {have / 2**30:.0f} GiB: lower "
            "--ctx_len or --micro_bsz"
        )


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
        shuffle=cfg.dataload == "get",  # windows in --seed's order; documents in file order
        sft=sft_spec(cfg, given_options(cfg)),
    )
    rows = []
    for i, (name, kind, model_path, adapter_path) in enumerate(models_to_compare(cfg)):
        # --state goes with --load_model (and its --peft_checkpoint), not with the --compare models
        state = cfg.state if i == 0 else ""
        model = load_for_inference(model_path, adapter_path, cfg.op, cfg.lora_alpha, state)
        rows.append({"model": name, "kind": kind, **evaluate_loss(model, ds, cfg.micro_bsz, cfg.max_samples)})
        del model  # one model in memory at a time
    bad = next((r for r in rows if not math.isfinite(r["loss"])), None)
    if bad:  # NaN is no result (and no JSON): say which model overflows instead of printing it
        raise RWKVDishaError(
            f"the loss of {bad['model']} is {bad['loss']} on this data: the model overflows (a diverged "
            "adapter, or a --lora_alpha far too large); nothing written"
        )
    if cfg.json:
        from rwkv_disha.fsio import atomic_write_json

        atomic_write_json(cfg.json, rows if cfg.compare else rows[0], "--json", cfg.overwrite)
    if not cfg.compare:  # one model: the one JSON line scripts (and the demo) read
        print(json.dumps({k: v for k, v in rows[0].items() if k not in ("model", "kind")}))
    else:
        print(format_table(rows))
    return 0


def check_json_not_input(cfg: Config) -> None:
    """Refuse a --json that is one of eval's inputs (even with --overwrite 1): a model, adapter or state
    file, their .json sidecars, a file of the data. Compared resolved (a symlink or ../ spelling is the same
    file), and by inode where both exist (a hard link)."""
    target = Path(cfg.json).resolve()
    for what, path in eval_inputs(cfg):
        p = path.resolve()
        if p == target or (p.exists() and target.exists() and os.path.samefile(p, target)):
            raise RWKVDishaError(f"--json {cfg.json} would overwrite {what}: write the results elsewhere")
        if p.is_dir() and target.is_relative_to(p):  # a data folder: the results would join its files
            raise RWKVDishaError(f"--json {cfg.json} is inside {what}: write the results elsewhere")


def eval_inputs(cfg: Config) -> list[tuple[str, Path]]:
    """(description, path) of every file eval reads: the models, adapters and state files with their
    .json sidecars (a peft folder's two files), and the data (binidx: PREFIX.bin / .idx and the answer
    masks PREFIX.mask.bin / .idx)."""
    from rwkv_disha.adapters.adapter_file import sidecar_path
    from rwkv_disha.adapters.peft_folder import CONFIG_NAME, WEIGHTS_NAME, is_peft_folder
    from rwkv_disha.data.binidx import FILE_SUFFIXES, split_prefix

    given = [("--load_model", cfg.load_model), ("--peft_checkpoint", cfg.peft_checkpoint)]
    given += [("--state", cfg.state)] + [("--compare", c) for c in cfg.compare]
    out: list[tuple[str, Path]] = []
    for flag, name in given:
        if not name:
            continue
        p = Path(name)
        # a peft folder, or its weights file (read as the folder): both of the folder's files are inputs
        folder = p.parent if p.name == WEIGHTS_NAME else p
        if is_peft_folder(folder):
            out += [(f"the {flag} file {folder / n}", folder / n) for n in (CONFIG_NAME, WEIGHTS_NAME)]
        else:
            out += [(f"the {flag} file {p}", p), (f"the .json sidecar of {flag} {p}", sidecar_path(p))]
    if cfg.data_type == "binidx" and cfg.data_file:
        prefix = split_prefix(cfg.data_file)
        names = [prefix + suffix for suffix in FILE_SUFFIXES]
        out += [(f"the data file {n} (--data_file {cfg.data_file})", Path(n)) for n in names]
    elif cfg.data_type != "dummy" and cfg.data_file:
        out.append((f"the data {cfg.data_file}", Path(cfg.data_file)))
    return out


def model_kind(path: str) -> str:
    """``merged`` for a whole model (it has the embedding), ``adapter`` for an adapter file."""
    from rwkv_disha.model.load import load_state_dict

    return "merged" if "emb.weight" in load_state_dict(path) else "adapter"  # mmap: nothing read


def models_to_compare(cfg: Config) -> list[tuple[str, str, str, str]]:
    """``(name, kind, model file, adapter file)`` of every model to evaluate, --load_model first (the
    adapter files were opened and checked by :func:`validate`)."""
    first = "adapter" if cfg.peft_checkpoint else "state" if cfg.state else "base"
    name = cfg.peft_checkpoint or cfg.load_model
    name = f"{name} + {cfg.state}" if cfg.state else name  # --state goes with the first model only
    out = [(name, first, cfg.load_model, cfg.peft_checkpoint)]
    for path in cfg.compare:
        kind = model_kind(path)
        out.append((path, kind, cfg.load_model, path) if kind == "adapter" else (path, kind, path, ""))
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
