"""The Lightning pieces: one adapted RWKV model with its loss and optimizer, and the data it reads.

Only trainable tensors (adapters + train_parts) go into Lightning checkpoints; the frozen base is
reloaded from ``--load_model`` on resume, so a resume file is megabytes, not gigabytes.
"""

from __future__ import annotations

import atexit
import functools
import math
import multiprocessing
import multiprocessing.util  # noqa: F401 - its exit handler must be registered before _end_workers_at_exit
import os
import time
from pathlib import Path

import lightning as L
import torch

from rwkv_disha.data.dataset import collate
from rwkv_disha.errors import RWKVDishaError
from rwkv_disha.train.config import Config
from rwkv_disha.train.modes import sample_loss, trim_padding
from rwkv_disha.train.resume import KEY
from rwkv_disha.train.schedule import lr_at


class Diverged(RWKVDishaError):
    """The loss or the trained tensors stopped being finite: training stops, nothing more is saved."""


def divergence_advice(cfg: Config) -> str:
    """What to try after a divergence, given this run's settings."""
    clip = cfg.optim.grad_clip
    tips = [f"a lower --lr_init (now {cfg.optim.lr_init:g})"]
    tips.append("--grad_clip 1" if clip == 0 or clip > 1 else f"a lower --grad_clip (now {clip:g})")
    if cfg.engine.precision in ("bf16", "fp16"):
        alt = "fp32" if cfg.engine.precision == "bf16" else "bf16 or fp32"
        tips.append(f"--precision {alt} (now {cfg.engine.precision})")
    return "try " + ", ".join(tips[:-1]) + " or " + tips[-1]


def clips_itself(cfg: Config) -> bool:
    """Whether the module clips the gradient norm itself (in ``on_before_optimizer_step``) instead of
    Lightning: bf16 with --grad_clip on a strategy whose gradients are whole on every process (not
    DeepSpeed, not FSDP). Lightning's mixed-precision plugin refuses to clip a fused optimizer, and bf16
    has no loss scaler, so the gradients the hook sees are final and AdamW can stay fused."""
    e = cfg.engine
    sharded = e.strategy.startswith(("deepspeed", "fsdp"))
    return e.precision == "bf16" and cfg.optim.grad_clip > 0 and not sharded


class DishaModule(L.LightningModule):
    def __init__(self, model: torch.nn.Module, cfg: Config, steps_per_epoch: int):
        """``steps_per_epoch`` counts optimizer steps per epoch."""
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.steps_per_epoch = steps_per_epoch
        self._t_last = None
        self.tokens_seen = 0
        self.last_finite_loss: float | None = None
        self.epoch_batches = 0  # micro-batches finished in the current epoch (saved for --resume)
        self.resume_batches = 0  # set from a checkpoint written mid-epoch: the data loader skips these

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def on_before_optimizer_step(self, optimizer) -> None:
        if clips_itself(self.cfg):
            grads = [p for p in self.model.parameters() if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(grads, self.cfg.optim.grad_clip)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.cfg.logging.log_samples:
            self._log_samples(batch["input_ids"])
        e = self.cfg.engine
        if not e.compile:  # here, so that tok/s counts the positions the step really computes
            batch = trim_padding(batch)
        loss = sample_loss(e.train_type, self.model, batch, e.chunk_ctx, trim=False)
        self._stop_if_not_finite(loss)
        now = time.perf_counter()
        n_tok = int(batch["input_ids"].numel()) * self.trainer.world_size
        self.tokens_seen += n_tok
        if self._t_last is not None:
            self.log(
                "tok/s", n_tok / max(now - self._t_last, 1e-9), prog_bar=True, on_step=True, on_epoch=False
            )
        self._t_last = now
        self.log("loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        self.log("lr", self.optimizers().param_groups[0]["lr"], prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def _stop_if_not_finite(self, loss: torch.Tensor) -> None:
        """Stop before the backward pass of a non-finite loss (every rank decides together)."""
        value = float(loss.detach())
        bad = self.trainer.strategy.reduce_boolean_decision(not math.isfinite(value), all=False)
        if not bad:
            self.last_finite_loss = value
            return
        last = "none yet" if self.last_finite_loss is None else f"{self.last_finite_loss:.4f}"
        epoch = self.cfg.optim.epoch_begin + self.trainer.current_epoch
        raise Diverged(
            f"training diverged at step {self.trainer.global_step} (epoch {epoch}): the loss is {value} "
            f"(last finite loss {last}); nothing from this step was saved; {divergence_advice(self.cfg)}"
        )

    def _log_samples(self, idx: torch.Tensor) -> None:
        path = Path(self.cfg.proj_dir) / f"samples-rank{self.global_rank}.txt"
        with open(path, "a") as f:
            for row in idx[:, :8].tolist():
                f.write(" ".join(map(str, row)) + "\n")

    def configure_optimizers(self):
        o = self.cfg.optim
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise RWKVDishaError("nothing to train: no adapter or train_parts parameter requires grad")
        opt = torch.optim.AdamW(
            self._param_groups(params), lr=o.lr_init, betas=(o.beta1, o.beta2), eps=o.adam_eps,
            weight_decay=o.weight_decay, **self._adamw_kernel(params),
        )  # fmt: skip
        total = self.steps_per_epoch * (o.epoch_begin + o.epoch_count)
        # epoch_begin shifts the schedule: continuing at epoch N starts at step N * steps_per_epoch
        offset = self.steps_per_epoch * o.epoch_begin

        def factor(step: int) -> float:  # LambdaLR multiplies lr_init by this
            lr = lr_at(
                step + offset, total, o.lr_init, o.lr_final, o.warmup_steps, o.lr_schedule, o.wsd_decay_frac
            )
            return lr / o.lr_init

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    def on_train_start(self) -> None:
        """Give the optimizer this run's learning rates and Adam settings. On --resume, Lightning has just
        restored the optimizer and the LR scheduler from resume.ckpt, their settings included (each param
        group's lr, initial_lr, betas, eps, weight_decay; the scheduler's base_lrs), so a --lr_init,
        --lr_final, --state_lr_scale, --beta1/2, --adam_eps or --weight_decay given at resume (accepted and
        recorded in train_config.json) was silently ignored. Adam's moments and the step count stay; the
        schedule continues at the restored step with the values given now. A fresh run: no change."""
        o = self.cfg.optim
        opt = self.trainer.optimizers[0]
        fresh = self._param_groups([p for p in self.model.parameters() if p.requires_grad])
        if len(fresh) != len(opt.param_groups):  # resume.check_resume_checkpoint compared them already
            return
        betas, eps = (o.beta1, o.beta2), o.adam_eps
        for group, new in zip(opt.param_groups, fresh):
            lr0, decay = new.get("lr", o.lr_init), new.get("weight_decay", o.weight_decay)
            group.update(initial_lr=lr0, betas=betas, eps=eps, weight_decay=decay)
        if not self.trainer.lr_scheduler_configs:
            return
        sched = self.trainer.lr_scheduler_configs[0].scheduler
        sched.base_lrs = [group["initial_lr"] for group in opt.param_groups]
        lrs = [lr0 * fn(sched.last_epoch) for lr0, fn in zip(sched.base_lrs, sched.lr_lambdas)]
        for group, lr in zip(opt.param_groups, lrs):
            group["lr"] = lr
        sched._last_lr = lrs

    def _adamw_kernel(self, params: list[torch.nn.Parameter]) -> dict[str, bool]:
        """AdamW's fused kernel (one pass over all tensors) on CPU and CUDA where Lightning allows it,
        instead of torch's CPU default, a Python loop of ~10 ops per tensor (148 tensors for a 0.1B Bone
        run; on a quiet CPU the whole step did not measurably change, docs/BENCHMARKS.md). Lightning
        refuses gradient clipping with a fused optimizer under its mixed-precision plugin, so fp16 (and bf16
        under FSDP) with clipping take the multi-tensor (foreach) kernel; bf16 elsewhere clips in this
        module (:func:`clips_itself`) and stays fused (on a CPU: 4 against 13 ms per step for a 0.1B Bone
        run's 5.4 M trained values). DeepSpeed keeps torch's default."""
        from rwkv_disha.choices import PRECISIONS

        e = self.cfg.engine
        if e.strategy.startswith("deepspeed") or not {p.device.type for p in params} <= {"cpu", "cuda"}:
            return {}
        mixed = PRECISIONS[e.precision].endswith("-mixed")
        if mixed and self.cfg.optim.grad_clip > 0 and not clips_itself(self.cfg):
            return {"foreach": True}
        return {"fused": True}

    def _param_groups(self, params: list[torch.nn.Parameter]) -> list[dict]:
        """One group at --lr_init; with --train_state next to other trained tensors, the initial states
        form a second group at lr_init * --state_lr_scale (LambdaLR scales both by the same schedule)."""
        from rwkv_disha.adapters.state import time_state_parameters

        states = {id(p) for p in time_state_parameters(self.model).values()}
        rest = [p for p in params if id(p) not in states]
        mine = [p for p in params if id(p) in states]
        if not (rest and mine):
            return [{"params": params}]
        lr = self.cfg.optim.lr_init * self.cfg.adapter.state_lr_scale
        return [{"params": rest}, {"params": mine, "lr": lr, "weight_decay": 0.0}]

    # -- keep checkpoints small: only what trains ------------------------------------------------------
    def _trainable_keys(self) -> set[str]:
        return {"model." + n for n, p in self.model.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = self._trainable_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint[KEY] = {"tokens_seen": self.tokens_seen, "epoch_batches": self.epoch_batches}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # resume.check_resume_checkpoint compared names and shapes before the model was loaded; Lightning's
        # own load is non-strict (the frozen base is not in the file): fill the base in so every base
        # tensor keeps its loaded value
        full = self.state_dict()
        full.update(checkpoint["state_dict"])
        checkpoint["state_dict"] = full
        ours = checkpoint.get(KEY, {})
        self.tokens_seen = int(ours.get("tokens_seen", 0))
        self.resume_batches = int(ours.get("epoch_batches", 0))


class _Positioned(torch.utils.data.Sampler):
    """Indices ``start .. length-1`` while claiming ``length``: a run resumed mid-epoch continues with the
    next micro-batch, and Lightning (which counts the epoch's batches from where it stopped) ends the
    epoch after the same number of batches as an uninterrupted run."""

    def __init__(self, start: int, length: int):
        self.start, self.length = start, length

    def __iter__(self):
        return iter(range(self.start, self.length))

    def __len__(self) -> int:
        return self.length


def _worker_init(worker_id: int, rank: int) -> None:
    """A DataLoader worker ignores SIGTERM / SIGINT: a cluster's SIGTERM or a terminal's Ctrl-C reaches the
    whole process group, and a worker killed by it fails the main process at once (torch's SIGCHLD check),
    before StopOnSignal can finish the step and save resume.ckpt. The main process ends its workers itself
    (torch's shutdown), and a worker whose parent died exits on its own (torch's watchdog)."""
    import signal

    from lightning.fabric.utilities.seed import pl_worker_init_function

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)
    if int(os.environ.get("PL_SEED_WORKERS", 0)):  # what Lightning adds when no worker_init_fn is given
        pl_worker_init_function(worker_id, rank=rank)


def _end_workers_at_exit() -> None:
    """Kill the DataLoader workers still running when the process exits. After an error raised in a worker
    (bad data met mid-run) torch never shuts them down, and multiprocessing's own exit handler ends them
    with SIGTERM, which :func:`_worker_init` makes them ignore: the run printed its error and then waited
    for them forever. atexit runs this first (last registered, first run); it kills only daemonic
    children (DataLoader workers are), which multiprocessing would end anyway."""
    for p in multiprocessing.active_children():
        if p.daemon:
            p.kill()
            p.join(5)


atexit.register(_end_workers_at_exit)


class DishaData(L.LightningDataModule):
    """The dataset is built once per run; each epoch gets a DataLoader positioned at that epoch's samples
    for this rank (``set_epoch``), so epochs continue through the data and a resumed run starts where it
    stopped."""

    def __init__(self, cfg: Config, dataset):
        super().__init__()
        self.cfg, self.dataset = cfg, dataset

    def setup(self, stage: str) -> None:
        # built before the engine knew the ranks: each process takes its own share of the samples
        self.dataset.rank, self.dataset.world_size = self.trainer.global_rank, self.trainer.world_size

    def train_dataloader(self):
        trainer, ds = self.trainer, self.dataset
        ds.set_epoch(self.cfg.optim.epoch_begin + trainer.current_epoch)
        module = trainer.lightning_module
        skip, module.resume_batches = module.resume_batches, 0
        bsz = self.cfg.data.micro_bsz
        return torch.utils.data.DataLoader(
            ds,
            batch_size=bsz,
            sampler=_Positioned(skip * bsz, len(ds)),
            collate_fn=collate,
            num_workers=self.cfg.data.num_workers,
            worker_init_fn=functools.partial(_worker_init, rank=trainer.global_rank),
            drop_last=True,
        )
