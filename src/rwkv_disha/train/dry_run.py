"""`rwkv-disha train --dry_run 1`: every check of a real run, then a report instead of training.

The report: the adapted layers, the trainable parameters, the memory the run needs (weights, gradients +
AdamW state, activations at this ctx_len x micro_bsz with and without --grad_cp, the logits), a throughput
estimate from a few timed steps on the run's own batches, and the schedule (steps, tokens, warmup, lr).
Nothing is written: proj_dir is checked for writability without being created, and no lock is taken.

Memory model (per device), each term measured or counted, not guessed:

    runtime      the process before the model loads (Python, torch, Lightning, the data); CPU only: RSS
    weights      every parameter and buffer, in the dtype training holds it
    optimizer    gradients + AdamW's two moments: 12 bytes per trainable (fp32) parameter
    activations  the bytes autograd saves for backward in one forward pass of a real batch (counted with
                 saved-tensor hooks, shared storage once, weights left out); with grad_cp: the block inputs
                 it keeps plus one block's activations, recomputed during backward
    logits       the chunked head + cross-entropy's working set: at most one chunk of rows (256 at V = 65536
                 on a CPU, 512 on a GPU) x vocab fp32 logits, reused for the softmax and its gradient
                 (train/loss.py), never micro_bsz x T x vocab
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from rwkv_disha.fsio import check_folder_creatable
from rwkv_disha.measure import rss_bytes
from rwkv_disha.train.config import Config

TIMED_STEPS = 2  # after one untimed step per grad_cp setting (the first step pays for lazy setup)
MIB = 2**20


def check_proj_dir_writable(proj_dir: str) -> bool:
    """Refuse a proj_dir that could not be created or written, without creating it. Returns whether
    it exists already."""
    check_folder_creatable(proj_dir, f"--proj_dir {proj_dir} is not writable:")
    return Path(proj_dir).is_dir()


def saved_activation_bytes(model, batch: dict, loss_fn) -> int:
    """Bytes autograd keeps for backward in one forward pass + loss: every saved tensor's storage counted
    once, the model's own parameters and buffers left out. The graph is dropped without a backward."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_fn(model, batch)
    return sum(seen.values())


def _loss_fn(cfg: Config, trim: bool = True):
    """The loss training computes for a batch (--train_type: one pass, or infctx chunks); ``trim`` False:
    on the whole padded batch (the widest a batch gets, for the memory bound)."""
    from rwkv_disha.train.modes import sample_loss

    def loss(model, batch):
        e = cfg.engine
        return sample_loss(e.train_type, model, batch, e.chunk_ctx, trim=trim and not e.compile)

    return loss


def _autocast(cfg: Config, device: torch.device):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.engine.precision)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def _batches(cfg: Config, dataset, n: int, device: torch.device) -> list[dict]:
    """The first ``n`` micro-batches this run would train on (rank 0)."""
    from rwkv_disha.data.dataset import collate

    bsz = cfg.data.micro_bsz
    dataset.set_epoch(cfg.optim.epoch_begin)
    out = []
    for k in range(n):
        items = [dataset[(k * bsz + i) % len(dataset)] for i in range(bsz)]
        out.append({key: v.to(device) for key, v in collate(items).items()})
    return out


def _human(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / MIB:.0f} MiB"


def _layers_line(model) -> str:
    """``12 layers: att.key att.value ... in blocks 0-1``."""
    from rwkv_disha.adapters import adapter_modules

    names = [name for name, _ in adapter_modules(model)]
    if not names:
        return "none"
    blocks = sorted({int(n.split(".")[1]) for n in names if n.startswith("blocks.")})
    targets = list(dict.fromkeys(n.split(".", 2)[2] if n.startswith("blocks.") else n for n in names))
    where = f"blocks {blocks[0]}-{blocks[-1]}" if blocks else "the model"
    return f"{len(names)} layers: {' '.join(targets)} in {where}"


def _time_steps(cfg: Config, model, trainable, loss_fn, batches, device) -> tuple[float, int]:
    """(seconds per timed step, peak CUDA bytes or 0): one untimed step, then the rest timed."""
    on_gpu = device.type == "cuda"
    opt = torch.optim.AdamW(trainable, lr=cfg.optim.lr_init, betas=(cfg.optim.beta1, cfg.optim.beta2))

    def step(batch) -> None:
        with _autocast(cfg, device):
            loss = loss_fn(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    step(batches[0])  # untimed: the first step allocates the optimizer state and warms the kernels
    if on_gpu:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for batch in batches[1:]:
        step(batch)
    if on_gpu:
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - t0) / TIMED_STEPS
    measured = torch.cuda.max_memory_allocated(device) if on_gpu else 0
    return seconds, measured


def plan(cfg: Config, mcfg, acfg, dataset, done_steps: int = 0) -> dict:
    """Build the model as training would, measure memory and speed on real batches, count the schedule.
    ``done_steps``: the optimizer steps a resumed run has taken already (resume.ckpt's global_step); the
    steps, tokens and time reported are the ones left to train."""
    from rwkv_disha.adapters import adapter_parameters
    from rwkv_disha.data.dataset import trim_padding
    from rwkv_disha.train.build import build_model
    from rwkv_disha.train.checks import uses_gpu
    from rwkv_disha.train.loss import chunk_rows, loss_workspace_bytes

    on_gpu = uses_gpu(cfg)
    device = torch.device("cuda" if on_gpu else "cpu")
    runtime = 0 if on_gpu else rss_bytes()  # before the model: the interpreter, torch, Lightning, the data
    model, _, n_base = build_model(cfg, acfg, on_gpu)
    model.to(device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in trainable)
    n_adapter = sum(p.numel() for p in adapter_parameters(model).values())
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    optimizer_bytes = 12 * n_train  # fp32 gradient + AdamW exp_avg + exp_avg_sq
    loss_fn = _loss_fn(cfg)
    batches = _batches(cfg, dataset, 1 + TIMED_STEPS, device)
    T = batches[0]["input_ids"].shape[1]  # memory: a batch as wide as any can be (ctx_len with pad)
    # the positions each timed step computes: padding cut as training cuts it (not under --compile)
    widths = [(trim_padding(b) if not cfg.engine.compile else b)["input_ids"].shape[1] for b in batches]
    T_logits = min(T, cfg.engine.chunk_ctx) if cfg.engine.train_type == "infctx" else T  # one chunk's
    low = cfg.engine.precision in ("bf16", "fp16")  # the autocast _autocast() opens
    logits_rows = min(cfg.data.micro_bsz * T_logits, chunk_rows(mcfg.vocab_size, device))
    logits_bytes = loss_workspace_bytes(logits_rows, mcfg.vocab_size, device, low)

    activations = {}
    untrimmed = _loss_fn(cfg, trim=False)
    with _autocast(cfg, device):
        for cp in (False, True):
            model.grad_cp = cp
            activations[cp] = saved_activation_bytes(model, batches[0], untrimmed)
    # grad_cp keeps each block's input; during backward one block at a time is recomputed, so its
    # activations come back: (all blocks' saved bytes - the block inputs) / n_layer on top
    activations[True] += max(activations[False] - activations[True], 0) // max(mcfg.n_layer, 1)

    model.grad_cp = bool(cfg.engine.grad_cp)
    seconds, measured = _time_steps(cfg, model, trainable, loss_fn, batches, device)

    def total(cp: bool) -> int:
        return runtime + weights + optimizer_bytes + activations[cp] + logits_bytes

    o, world = cfg.optim, cfg.engine.devices * cfg.engine.num_nodes
    steps = o.epoch_steps * o.epoch_count // o.accumulate_grad_batches
    left = max(steps - done_steps, 0) * o.accumulate_grad_batches  # micro-batches still to train
    return {
        "device": str(device),
        "layers": _layers_line(model),
        "params": n_base,
        "trainable": n_train,
        "adapter_params": n_adapter,
        "memory": {
            "runtime": runtime,
            "weights": weights,
            "optimizer": optimizer_bytes,
            "activations": activations[bool(cfg.engine.grad_cp)],
            "activations_grad_cp": activations[True],
            "activations_no_grad_cp": activations[False],
            "logits": logits_bytes,
            "total": total(bool(cfg.engine.grad_cp)),
            "total_grad_cp": total(True),
            "total_no_grad_cp": total(False),
            "measured_peak": measured,
        },
        "seconds_per_step": seconds,
        "tokens_per_second": cfg.data.micro_bsz * sum(widths[1:]) / TIMED_STEPS * world / seconds,
        "schedule": {
            "micro_batches": left,
            "optimizer_steps": steps,
            "done_steps": done_steps,
            "tokens": left * cfg.data.micro_bsz * T * world,
            "warmup_steps": o.warmup_steps,
            "seconds": seconds * left,
        },
        "T": T,
        "T_logits": T_logits,
        "logits_rows": logits_rows,
    }


def _duration(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"


def format_report(cfg: Config, mcfg, acfg, dataset, p: dict) -> str:
    from rwkv_disha.train.schedule import lr_at

    m, s, o, d = p["memory"], p["schedule"], cfg.optim, cfg.data
    cp = int(bool(cfg.engine.grad_cp))
    share = 100 * p["trainable"] / max(p["params"] + p["adapter_params"], 1)
    total_steps = s["optimizer_steps"] + o.epoch_begin * o.epoch_steps // o.accumulate_grad_batches
    first = o.epoch_begin * o.epoch_steps // o.accumulate_grad_batches + s["done_steps"]  # a resumed run's

    def lr(step: int) -> float:
        return lr_at(
            step, total_steps, o.lr_init, o.lr_final, o.warmup_steps, o.lr_schedule, o.wsd_decay_frac
        )

    runtime = f"{_human(m['runtime']):>9}  Python, torch, Lightning, the data (RSS before the model loaded)"
    if p["device"] != "cpu":
        runtime = "      n/a  plus the CUDA context (about 0.3-1 GiB, not counted)"
    if p["device"] != "cpu":  # exact on CUDA; on CPU this process's RSS mixes in the measuring passes
        runtime += (
            f"\n  measured   {_human(m['measured_peak']):>9}  peak CUDA memory allocated by the timed steps"
        )
    # --dataload pad: training trims each batch's padding (trim_padding, unless --compile), so the run
    # computes fewer positions than micro_bsz x ctx_len whenever a batch's documents are all shorter
    trims = d.dataload == "pad" and not cfg.engine.compile
    bound = " at most (--dataload pad: each batch is trimmed to its longest document)" if trims else ""
    lines = [
        f"dry run: everything checked; nothing trained, nothing written ({cfg.proj_dir} is left as it is)",
        f"model        {mcfg.summary()}, {p['params'] / 1e6:.2f}M params, on {p['device']}",
        f"adapter      {acfg.describe()}; adapted {p['layers']}",
        f"trainable    {p['trainable']:,} params ({share:.2f} %): adapters {p['adapter_params']:,}, "
        f"train_parts {p['trainable'] - p['adapter_params']:,}",
        f"data         {dataset.n_items:,} {'windows' if d.dataload == 'get' else 'documents'}, "
        f"--dataload {d.dataload}, ctx_len {d.ctx_len}, micro_bsz {d.micro_bsz}, --loss_mask {d.loss_mask}",
        f"schedule     {o.epoch_count} epochs x {o.epoch_steps} micro-batches = "
        f"{s['optimizer_steps']:,} optimizer steps (accumulate {o.accumulate_grad_batches}); "
        + (
            f"resumed after step {s['done_steps']:,}: {s['optimizer_steps'] - s['done_steps']:,} left; "
            if s["done_steps"]
            else ""
        )
        + f"{s['tokens']:,} token positions{' left' if s['done_steps'] else ''}{bound}; "
        f"warmup {o.warmup_steps} steps",
        f"             lr ({o.lr_schedule}) {lr(first):.3g} at the first step, "
        + (f"{lr(o.warmup_steps):.3g} after warmup, " if o.warmup_steps > first else "")
        + f"{lr(total_steps - 1):.3g} at the last",
        "memory       estimate per device:",
        f"  runtime    {runtime}",
        f"  weights    {_human(m['weights']):>9}  every parameter and buffer as training holds it",
        f"  optimizer  {_human(m['optimizer']):>9}  gradients + AdamW moments, 12 bytes x {p['trainable']:,}",
        f"  activations{_human(m['activations']):>9}  saved for backward at {d.micro_bsz} x {p['T']} tokens "
        f"(grad_cp {cp}); grad_cp 0: {_human(m['activations_no_grad_cp'])}, "
        f"grad_cp 1: {_human(m['activations_grad_cp'])}",
        f"  logits     {_human(m['logits']):>9}  one chunk of the head + loss: {p['logits_rows']} of "
        f"{d.micro_bsz} x {p['T_logits']} rows x {mcfg.vocab_size} at a time",
        f"  total      {_human(m['total']):>9}  (grad_cp {cp}); grad_cp 0: {_human(m['total_no_grad_cp'])}, "
        f"grad_cp 1: {_human(m['total_grad_cp'])}",
        f"throughput   {p['seconds_per_step']:.3g} s per micro-batch, {p['tokens_per_second']:,.0f} tokens/s "
        f"(mean of {TIMED_STEPS} timed steps); the {'rest of the' if s['done_steps'] else 'whole'} run: "
        f"about {_duration(s['seconds'])}",
    ]
    return "\n".join(lines)


def dry_run(cfg: Config, mcfg, acfg, dataset, checkpoint: dict | None = None) -> int:
    """Called by ``setup`` after every check that reads the inputs, instead of locking and training.
    ``checkpoint``: the resume.ckpt of a --resume run (checked), whose position the schedule starts at."""
    from rwkv_disha.train.checks import check_fresh_folder

    if check_proj_dir_writable(cfg.proj_dir):
        check_fresh_folder(cfg)  # reads only: a folder holding an earlier run is refused here too
    p = plan(cfg, mcfg, acfg, dataset, int(checkpoint["global_step"]) if checkpoint is not None else 0)
    print(format_report(cfg, mcfg, acfg, dataset, p))
    sys.stdout.flush()
    return 0 if math.isfinite(p["seconds_per_step"]) else 2
