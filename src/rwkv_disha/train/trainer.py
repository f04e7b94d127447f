"""Assemble and run training: setup (engine, precision) -> model (load, adapt) -> data -> fit -> report."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import lightning as L
import torch

from rwkv_disha.train.run import PRECISIONS, Config, seed_of


def build_adapter_config(cfg: Config):
    from rwkv_disha.adapters.inject import AdapterConfig

    return AdapterConfig.from_cli(cfg.peft, cfg.disha_config, cfg.lora_config, cfg.train_parts, cfg.quant)


def build_dataset(cfg: Config, vocab_size: int, rank: int = 0, world_size: int = 1):
    from rwkv_disha.data.dataset import make_dataset

    return make_dataset(
        cfg.data_file,
        cfg.data_type,
        cfg.dataload,
        cfg.ctx_len,
        cfg.micro_bsz,
        cfg.epoch_steps,
        cfg.loss_mask,
        seed_of(cfg),
        vocab_size,
        rank=rank,
        world_size=world_size,
    )


def base_dtype_for(precision: str, file_dtype: torch.dtype, on_gpu: bool) -> torch.dtype:
    """dtype of the frozen base: fp32 for fp32/tf32; for bf16/fp16 the file's dtype when it already is
    16-bit, else bf16/fp16 on GPU (half the memory) and fp32 on CPU (faster there, same result)."""
    if precision in ("fp32", "tf32"):
        return torch.float32
    low = torch.bfloat16 if precision == "bf16" else torch.float16
    if file_dtype in (torch.bfloat16, torch.float16):
        return low
    return low if on_gpu else torch.float32


def build_model(cfg: Config, acfg, on_gpu: bool):
    """Load the base, inject adapters (optionally quantized base), load an adapter to continue from,
    and freeze all but the adapter + train_parts tensors (kept in fp32)."""
    from rwkv_disha.adapters.files import base_fingerprint
    from rwkv_disha.adapters.inject import inject_adapters, load_adapter_file, mark_trainable
    from rwkv_disha.model.load import load_model

    model = load_model(cfg.load_model, op=cfg.op)
    fingerprint = base_fingerprint(model)
    n_base = sum(p.numel() for p in model.parameters())  # before --quant turns weights into codes
    file_dtype = model.emb.weight.dtype
    model.to(base_dtype_for(cfg.precision, file_dtype, on_gpu))
    model.grad_cp = bool(cfg.grad_cp)
    inject_adapters(model, acfg)
    mark_trainable(model, acfg)
    if acfg.load:
        load_adapter_file(model, acfg.load, acfg)
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()  # Adam on 16-bit parameters loses small updates
    return model, fingerprint, n_base


def _resume_config(cfg: Config) -> Config:
    """With --resume, options left at their defaults take the values of the run being resumed."""
    import dataclasses

    saved = Path(cfg.resume) / "train_config.json"
    if not saved.is_file():
        return cfg
    old = json.loads(saved.read_text())
    defaults = Config()
    merged = {}
    for f in dataclasses.fields(Config):
        mine = getattr(cfg, f.name)
        merged[f.name] = old.get(f.name, mine) if mine == getattr(defaults, f.name) else mine
    merged["resume"] = cfg.resume
    return Config(**merged)


def fit(cfg: Config, extra_callbacks: list | None = None) -> int:
    """Train as ``cfg`` says; ``extra_callbacks`` (tests, embedding) are added to Lightning's list."""
    from rwkv_disha.adapters.inject import adapter_parameters, adapter_state_dict
    from rwkv_disha.train.callbacks import SaveAdapters, SeedBatches, TrainLog
    from rwkv_disha.train.module import DishaModule
    from rwkv_disha.train.run import check_model_shape, check_proj_dir, uses_gpu, validate

    if cfg.resume:
        cfg = _resume_config(cfg)
    validate(cfg)
    mcfg = check_model_shape(cfg)
    seed = seed_of(cfg)
    acfg = build_adapter_config(cfg)
    vocab = mcfg.vocab_size
    build_dataset(cfg, vocab)  # every data problem surfaces here, before the model is loaded
    check_proj_dir(cfg)
    if cfg.precision == "tf32":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    L.seed_everything(seed, workers=True, verbose=False)

    model, fingerprint, n_base = build_model(cfg, acfg, uses_gpu(cfg))
    steps_per_epoch = cfg.epoch_steps // cfg.accumulate_grad_batches
    module = DishaModule(model, cfg, steps_per_epoch)
    saved_names = list(adapter_state_dict(model, acfg))
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = n_base + sum(p.numel() for p in adapter_parameters(model).values())

    proj = Path(cfg.proj_dir)
    loggers = []
    if cfg.wandb:
        from lightning.pytorch.loggers import WandbLogger

        loggers.append(WandbLogger(project=cfg.wandb, save_dir=str(proj), config=dict(vars(cfg))))
    if cfg.tensorboard:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=str(proj), name="tb", version=""))

    log = TrainLog(cfg, n_train=n_train, n_total=n_total, describe=acfg.describe())
    callbacks = [
        SeedBatches(cfg),
        SaveAdapters(cfg, acfg, saved_names, fingerprint),
        log,
        *(extra_callbacks or []),
    ]
    accelerator = {"cuda": "gpu"}.get(cfg.accelerator, cfg.accelerator)
    strategy = cfg.strategy  # ddp on CPU uses the gloo backend (Lightning picks it)
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=strategy,
        precision=PRECISIONS[cfg.precision],
        max_epochs=cfg.epoch_count,
        gradient_clip_val=cfg.grad_clip or None,
        accumulate_grad_batches=cfg.accumulate_grad_batches,
        use_distributed_sampler=False,  # the dataset splits samples by rank itself
        reload_dataloaders_every_n_epochs=1,  # each epoch continues through the data
        enable_checkpointing=False,  # SaveAdapters writes adapter files and resume.ckpt
        logger=loggers or False,
        callbacks=callbacks,
        log_every_n_steps=cfg.log_every_n_steps,
        enable_progress_bar=cfg.progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=False,
    )
    datamodule = DishaData(cfg, vocab)
    ckpt = str(Path(cfg.resume) / "resume.ckpt") if cfg.resume else None
    t0 = time.time()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    if trainer.is_global_zero:
        log.finish(trainer, module, time.time() - t0)
    return 0


class DishaData(L.LightningDataModule):
    """A fresh DataLoader each epoch (reload_dataloaders_every_n_epochs=1), positioned at that epoch's
    samples for this rank: epochs continue through the data, and a resumed run starts where it stopped."""

    def __init__(self, cfg: Config, vocab: int):
        super().__init__()
        self.cfg, self.vocab = cfg, vocab

    def train_dataloader(self):
        from rwkv_disha.data.dataset import collate

        trainer = self.trainer
        ds = build_dataset(self.cfg, self.vocab, trainer.global_rank, trainer.world_size)
        ds.set_epoch(self.cfg.epoch_begin + trainer.current_epoch)
        return torch.utils.data.DataLoader(
            ds,
            batch_size=self.cfg.micro_bsz,
            shuffle=False,
            collate_fn=collate,
            num_workers=self.cfg.num_workers,
            drop_last=True,
        )


def merge_command(cfg: Config, adapter_path: Path) -> str:
    q = f" --quant {cfg.quant}" if cfg.quant != "none" else ""
    out = adapter_path.with_name(adapter_path.stem + "-merged.pth")
    return (
        f"rwkv-disha merge --base_model {cfg.load_model} --peft_checkpoint {adapter_path} --output {out}{q}"
    )


def fmt_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def ppl(loss: float) -> float:
    return math.exp(min(loss, 50.0))
