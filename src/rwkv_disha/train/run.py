"""`rwkv-disha train`: DiSHA (Bone / Bat) or LoRA fine-tuning of an RWKV model, on Lightning.

Takes the flags of RWKV-PEFT's train.py as used by the DiSHA tutorial's run_disha.sh (same names;
defaults are the tutorial's values): replace `python train.py` with `rwkv-disha train`.
n_layer / n_embd / vocab_size / my_testing are read from --load_model and may be omitted.
Every epoch_save epochs and at the end, proj_dir/rwkv-{epoch}.pth holds the adapter (+ train_parts)
tensors; merge it with `rwkv-disha merge`. `--resume proj_dir` continues an interrupted run exactly
(SIGTERM / Ctrl-C save resume.ckpt first). docs/TRAINING.md has the details.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from rwkv_disha.errors import RWKVDishaError
from rwkv_disha.train.config import ADAPTER_JSON as JSON_OPTIONS  # the options a YAML map may give
from rwkv_disha.train.config import RESUME_FILE, Config
from rwkv_disha.train.rwkv_peft_flags import UNSUPPORTED as FOREIGN_FLAGS
from rwkv_disha.train.rwkv_peft_flags import VALUES as FOREIGN_VALUES

if TYPE_CHECKING:  # Lightning and torch load when training starts, not for `train --help`
    import lightning as L

__all__ = ["Config", "run", "setup", "main", "fit", "FOREIGN_FLAGS", "FOREIGN_VALUES", "JSON_OPTIONS"]


def run(cfg: Config) -> int:
    return setup(cfg)


def _first_process() -> bool:
    """The process a user started (global rank 0), not one Lightning or a launcher started for another
    rank: only it locks proj_dir and checks what is in it."""
    ranks = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")
    return all(os.environ.get(v, "0") == "0" for v in ranks)


def setup(cfg: Config, extra_callbacks: list | None = None) -> int:
    """Resolve --resume, check every option, the model's shape, the data and the resume checkpoint (one
    line each, nothing loaded or written yet), then lock proj_dir, seed, and hand over to :func:`main`.

    ``extra_callbacks`` (tests, embedding) are added to Lightning's list."""
    import lightning as L
    import torch

    from rwkv_disha.config import given_options
    from rwkv_disha.data.fingerprint import check_data_fingerprint, data_fingerprint
    from rwkv_disha.fsio import clean_stale_temps, folder_lock
    from rwkv_disha.train.build import build_adapter_config, build_dataset
    from rwkv_disha.train.checks import (
        check_adapter_load,
        check_fresh_folder,
        check_model_shape,
        check_proj_dir,
        check_resume_folder,
        trainable_shapes,
        uses_gpu,
        validate,
    )
    from rwkv_disha.train.config import SAVED_CONFIG, load_run_record, new_run_fix, resolve_resume
    from rwkv_disha.train.resume import (
        check_resume_base,
        check_resume_checkpoint,
        check_resume_epochs,
        read_resume_checkpoint,
    )

    cfg = resolve_resume(cfg)
    validate(cfg)
    if not uses_gpu(cfg):  # bf16 on a CPU without bf16 instructions would crawl: fp32, said once
        from rwkv_disha.hardware import cpu_precision

        cfg.engine.precision, notice = cpu_precision(cfg.engine.precision)
        if notice and _first_process():
            print(notice, file=sys.stderr)
    record = load_run_record(Path(cfg.resume) / SAVED_CONFIG) if cfg.resume else {}
    if cfg.resume:  # the data position in resume.ckpt counts samples of the data the run started on
        d = cfg.data
        fix = new_run_fix(cfg.resume, cfg.adapter.peft)
        check_data_fingerprint(record.get("data"), d.data_file, d.data_type, d.loss_mask, cfg.resume, fix)
    if "chunk_ctx" in given_options(cfg) and cfg.engine.train_type != "infctx" and _first_process():
        # RWKV-PEFT's scripts pass it with or without infctx: said, not refused, so they still run
        print(
            f"note: --chunk_ctx {cfg.engine.chunk_ctx} is read with --train_type infctx only; this run "
            f"trains on whole --ctx_len {cfg.data.ctx_len} samples",
            file=sys.stderr,
        )
    mcfg = check_model_shape(cfg)
    checkpoint = read_resume_checkpoint(Path(cfg.resume) / RESUME_FILE) if cfg.resume else None
    if cfg.resume and "load_model" in given_options(cfg):  # another base: named before its r or tensors are
        check_resume_base(cfg.resume, cfg.load_model, record.get("base"), checkpoint)
    acfg = build_adapter_config(cfg)
    shapes = trainable_shapes(mcfg, acfg, cfg.engine.op)  # refuses an r the layers cannot take
    if uses_gpu(cfg) and (acfg.train_state or cfg.engine.train_type == "infctx"):
        from rwkv_disha.train.modes import check_state_gradients

        check_state_gradients(cfg.engine.op, torch.device("cuda"))  # both need the initial state's gradient
    if acfg.load:  # the adapter to start from: refused before any write unless it fits this run
        check_adapter_load(cfg, mcfg, acfg)
    if checkpoint is not None:
        path = Path(cfg.resume) / RESUME_FILE
        check_resume_checkpoint(checkpoint, shapes, str(path))
        check_resume_epochs(checkpoint, cfg.optim.epoch_count, cfg.resume)
        check_resume_folder(cfg)
    dataset = build_dataset(cfg, mcfg.vocab_size)  # once per run: tokenised / scanned here only
    if cfg.dry_run:  # checked above; report instead of training, before anything is created or locked
        from rwkv_disha.train.dry_run import dry_run

        return dry_run(cfg, mcfg, acfg, dataset, checkpoint)
    if "data" not in record:  # what the run starts on, for later --resume checks (train_config.json)
        d = cfg.data
        record = {**record, "data": data_fingerprint(d.data_file, d.data_type, d.loss_mask)}
    check_proj_dir(cfg)
    first = _first_process()
    lock = folder_lock(cfg.proj_dir, "train") if first else contextlib.nullcontext()
    with lock:
        if first:
            check_fresh_folder(cfg)
            clean_stale_temps(cfg.proj_dir)
        if cfg.engine.precision == "tf32":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        L.seed_everything(cfg.optim.seed, workers=True, verbose=False)
        return main(cfg, acfg, dataset, checkpoint, extra_callbacks or [], record)


def main(
    cfg: Config, acfg, dataset, checkpoint: dict | None, extra_callbacks: list, record: dict | None = None
) -> int:
    """Build the model (base + adapter), its Lightning module, the data module and the trainer, then fit.
    ``record``: the fingerprints train_config.json keeps (a resumed run's own; the base's is added here)."""
    from rwkv_disha.adapters import adapter_parameters, adapter_state_dict
    from rwkv_disha.train.build import build_model, build_trainer
    from rwkv_disha.train.callbacks import SaveAdapters, SeedBatches, StopOnSignal, TrainLog
    from rwkv_disha.train.checks import uses_gpu
    from rwkv_disha.train.module import DishaData, DishaModule
    from rwkv_disha.train.resume import PreloadedCheckpointIO

    model, fingerprint, n_base = build_model(cfg, acfg, uses_gpu(cfg))
    module = DishaModule(model, cfg, cfg.optim.epoch_steps // cfg.optim.accumulate_grad_batches)
    saved_names = list(adapter_state_dict(model, acfg))
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = n_base + sum(p.numel() for p in adapter_parameters(model).values())
    callbacks = [
        SeedBatches(cfg),
        SaveAdapters(cfg, acfg, saved_names, fingerprint, {"base": fingerprint, **(record or {})}),
        TrainLog(cfg, n_train=n_train, n_total=n_total, describe=acfg.describe(layers=True)),
        StopOnSignal(cfg),  # after SaveAdapters: at an epoch's end, resume.ckpt is written first
        *extra_callbacks,
    ]
    # only when resuming: some strategies (DeepSpeed) take no checkpoint I/O plugin
    plugins = [PreloadedCheckpointIO(checkpoint)] if checkpoint is not None else []
    with _quiet_lightning():
        trainer = build_trainer(cfg, callbacks, plugins=plugins)
    ckpt_path = str(Path(cfg.resume) / RESUME_FILE) if checkpoint is not None else None
    return fit(trainer, module, DishaData(cfg, dataset), ckpt_path)


class _NoAdverts(logging.Filter):
    """Drops Lightning's tip that advertises its cloud logger: a line about nothing this run does."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in str(record.msg)


@contextlib.contextmanager
def _quiet_lightning():
    """Keep Lightning's lines that say nothing about this run off the terminal (building and fitting)."""
    rank_zero_log, no_adverts = logging.getLogger("lightning.pytorch.utilities.rank_zero"), _NoAdverts()
    rank_zero_log.addFilter(no_adverts)
    try:
        with warnings.catch_warnings():
            # a run stopped mid-epoch resumes at the next micro-batch: DishaData positions the loader itself
            warnings.filterwarnings("ignore", message=".*ended before the epoch ended.*")
            # Lightning's own use of a torch API that torch deprecates: nothing a user can act on
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
            yield
    finally:
        rank_zero_log.removeFilter(no_adverts)


def fit(trainer: L.Trainer, module, data, ckpt_path: str | None) -> int:
    """Run the epochs; the callbacks save, log and summarise (the summary is their on_train_end)."""
    import torch

    try:
        with _quiet_lightning():
            trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError (CUDA) is a RuntimeError
        # the CPU allocator's failure is a plain RuntimeError: told apart by its message
        if not isinstance(e, (torch.OutOfMemoryError, MemoryError)) and "can't allocate memory" not in str(e):
            raise
        cfg = module.cfg
        raise RWKVDishaError(
            f"out of memory at --ctx_len {cfg.data.ctx_len} x --micro_bsz {cfg.data.micro_bsz}: lower them, "
            f"or add --grad_cp 1 (the adapters of finished epochs are saved in {cfg.proj_dir})"
        ) from e
    except Exception as e:
        if not _is_wandb_error(e):
            raise
        # W&B starts when Lightning sets the loggers up: no login and no terminal to ask on is a UsageError
        raise RWKVDishaError(
            f"--wandb {module.cfg.logging.wandb}: W&B could not start ({str(e).strip()}): log in with "
            "`wandb login` (or set WANDB_API_KEY), or log offline with WANDB_MODE=offline"
        ) from e
    return 0


def _is_wandb_error(e: BaseException) -> bool:
    """An error raised by the wandb package itself (its ``wandb.errors`` classes), told apart by module so
    that wandb need not be imported (it is optional)."""
    return any(c.__module__.startswith("wandb.errors") for c in type(e).__mro__)
