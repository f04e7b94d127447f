"""The pieces of a training run, each built once: adapter config, dataset, model, Lightning trainer."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from rwkv_disha.choices import PRECISIONS
from rwkv_disha.train.config import Config


def build_adapter_config(cfg: Config):
    from rwkv_disha.adapters import AdapterConfig

    a = cfg.adapter
    return AdapterConfig.from_cli(
        a.peft,
        a.disha_config,
        a.lora_config,
        a.train_parts,
        a.quant,
        train_state=a.train_state,
        peft_config=a.peft_config,
        bone_config=a.bone_config,
        pissa_config=a.pissa_config,
    )


def build_dataset(cfg: Config, vocab_size: int):
    """The run's dataset (every data problem surfaces here, before the model loads). Built for rank 0 of
    1; DishaData.setup gives it this process's rank once the engine knows it."""
    from rwkv_disha.config import given_options
    from rwkv_disha.data.dataset import make_dataset
    from rwkv_disha.data.sft import sft_spec

    d = cfg.data
    return make_dataset(
        d.data_file,
        d.data_type,
        d.dataload,
        d.ctx_len,
        d.micro_bsz,
        cfg.optim.epoch_steps,
        d.loss_mask,
        cfg.optim.seed,
        vocab_size,
        shuffle=d.data_shuffle,
        sft=sft_spec(d, given_options(cfg)),
    )


def base_dtype_for(precision: str, file_dtype: torch.dtype, on_gpu: bool) -> torch.dtype:
    """dtype of the frozen base: fp32 for fp32/tf32; for bf16/fp16 the file's dtype when it already is
    16-bit, else bf16/fp16 on GPU (half the memory) and bf16 on CPU (a CPU trains bf16 only when it has
    native bf16, hardware.cpu_precision; an fp32 base there costs a cast of every weight each step under
    autocast: 10 % of a 0.1B step), fp16 on CPU stays fp32 (few CPUs have fp16 matmuls)."""
    if precision in ("fp32", "tf32"):
        return torch.float32
    low = torch.bfloat16 if precision == "bf16" else torch.float16
    if file_dtype in (torch.bfloat16, torch.float16) or on_gpu or precision == "bf16":
        return low
    return torch.float32


def build_model(cfg: Config, acfg, on_gpu: bool):
    """Load the base, inject adapters (optionally quantized base), load an adapter to continue from,
    and freeze all but the adapter + train_parts tensors (kept in fp32).

    Returns (model, base fingerprint, base parameter count before quantization)."""
    from rwkv_disha.adapters import base_fingerprint
    from rwkv_disha.model.load import load_model

    model = load_model(cfg.load_model, op=cfg.engine.op)
    fingerprint = base_fingerprint(model)
    n_base = sum(p.numel() for p in model.parameters())  # before --quant turns weights into codes
    adapt_model(model, cfg, acfg, on_gpu)
    return model, fingerprint, n_base


def adapt_model(model: torch.nn.Module, cfg: Config, acfg, on_gpu: bool) -> torch.nn.Module:
    """A loaded base made ready to train, in place (``train``, and ``bench`` on random weights): base
    dtype for the precision, grad_cp, adapters (+ --quant), trainable tensors in fp32, --compile."""
    from rwkv_disha.adapters import inject_adapters, load_adapter_file, mark_trainable, open_adapter_file

    model.to(base_dtype_for(cfg.engine.precision, model.emb.weight.dtype, on_gpu))
    model.grad_cp = bool(cfg.engine.grad_cp)
    inject_adapters(model, acfg)
    mark_trainable(model, acfg)
    if acfg.load:
        load_adapter_file(model, open_adapter_file(acfg.load, acfg.lora_alpha, acfg.pissa_init), acfg)
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()  # Adam on 16-bit parameters loses small updates
    if cfg.engine.compile:
        compile_blocks(model, mode="reduce-overhead" if cfg.engine.cuda_graphs else None)
    return model


def compile_blocks(model: torch.nn.Module, backend: str = "inductor", mode: str | None = None) -> None:
    """torch.compile each block in place: block 0 (ln0, v_first) gets one graph and blocks 1..L-1 share
    another (tests/bench/test_speed_paths.py); grad_cp's checkpoint wraps the compiled block. Compiles
    lazily, at the first step. ``mode="reduce-overhead"`` (--cuda_graphs 1) has inductor record each
    compiled graph as a CUDA graph and replay it: one launch per graph instead of one per kernel, for
    the launch-bound small shapes; it re-records when a shape changes (the last, shorter infctx chunk)."""
    for block in model.blocks:
        block.compile(backend=backend, mode=mode)


def build_loggers(cfg: Config) -> list:
    from rwkv_disha.config import flat_dict

    proj, loggers = Path(cfg.proj_dir), []
    if cfg.logging.wandb:
        from lightning.pytorch.loggers import WandbLogger

        loggers.append(WandbLogger(project=cfg.logging.wandb, save_dir=str(proj), config=flat_dict(cfg)))
    if cfg.logging.tensorboard:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=str(proj), name="tb", version=""))
    return loggers


def build_trainer(cfg: Config, callbacks: list, plugins: list) -> L.Trainer:
    from rwkv_disha.train.module import clips_itself

    e = cfg.engine
    loggers = build_loggers(cfg)
    return L.Trainer(
        accelerator={"cuda": "gpu"}.get(e.accelerator, e.accelerator),
        devices=e.devices,
        num_nodes=e.num_nodes,
        strategy=e.strategy,  # ddp on CPU uses the gloo backend (Lightning picks it)
        precision=PRECISIONS[e.precision],
        plugins=plugins,
        max_epochs=cfg.optim.epoch_count,
        # bf16 clips in DishaModule so AdamW can stay fused (train.module.clips_itself)
        gradient_clip_val=None if clips_itself(cfg) else (cfg.optim.grad_clip or None),
        accumulate_grad_batches=cfg.optim.accumulate_grad_batches,
        use_distributed_sampler=False,  # the dataset splits samples by rank itself
        reload_dataloaders_every_n_epochs=1,  # a loader per epoch, positioned at that epoch's samples
        enable_checkpointing=False,  # SaveAdapters writes adapter files and resume.ckpt
        logger=loggers or False,
        callbacks=callbacks,
        log_every_n_steps=cfg.logging.log_every_n_steps,
        enable_progress_bar=cfg.logging.progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=False,
    )
