"""Callbacks: per-epoch seeding, adapter files + resume checkpoint, and the logs a user reads."""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from pathlib import Path

import lightning as L
import torch

from rwkv_disha.config import to_dict


def adapter_path(cfg, epoch: int) -> Path:
    return Path(cfg.proj_dir) / f"rwkv-{epoch}.pth"


class SeedBatches(L.Callback):
    """Seed every micro-batch from (seed, epoch, batch, rank): dropout masks do not depend on what else
    drew random numbers before, so a resumed run repeats an uninterrupted one exactly."""

    def __init__(self, cfg):
        self.cfg = cfg

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        from rwkv_disha.train.run import seed_of

        epoch = self.cfg.epoch_begin + trainer.current_epoch
        torch.manual_seed(
            ((seed_of(self.cfg) * 100_003 + epoch) * 1_000_003 + batch_idx) * 64 + trainer.global_rank
        )


class SaveAdapters(L.Callback):
    """Every epoch_save epochs and at the end: proj_dir/rwkv-{epoch}.pth (+ .json sidecar). Every epoch:
    proj_dir/resume.ckpt (trainable tensors, optimizer, scheduler, loop position) for --resume."""

    def __init__(self, cfg, acfg, saved_names: list[str], fingerprint: dict):
        self.cfg, self.acfg = cfg, acfg
        self.saved_names = saved_names
        self.fingerprint = fingerprint
        self.written: list[Path] = []

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            path = Path(self.cfg.proj_dir) / "train_config.json"
            path.write_text(json.dumps(to_dict(self.cfg), indent=1, sort_keys=True) + "\n")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        from rwkv_disha.adapters.files import write_adapter_file
        from rwkv_disha.adapters.inject import adapter_sidecar

        cfg = self.cfg
        epoch = cfg.epoch_begin + trainer.current_epoch
        last = trainer.current_epoch + 1 >= cfg.epoch_count
        save = last or (trainer.current_epoch + 1) % cfg.epoch_save == 0
        # gathers sharded parameters (FSDP / DeepSpeed stage 3); a collective: every rank calls it
        full = trainer.strategy.lightning_module_state_dict() if save else None
        if save and trainer.is_global_zero:
            tensors = {n: full["model." + n].detach().to("cpu", copy=True) for n in self.saved_names}
            sidecar = adapter_sidecar(pl_module.model, self.acfg, self.fingerprint)
            sidecar["trained"] = {
                "epoch": epoch,
                "global_step": trainer.global_step,
                "base_model": cfg.load_model,
            }
            self.written.append(write_adapter_file(adapter_path(cfg, epoch), tensors, sidecar))
        proj = Path(cfg.proj_dir)
        tmp = proj / f".resume.ckpt.{os.getpid()}.tmp"
        trainer.save_checkpoint(tmp)
        if trainer.is_global_zero:
            os.replace(tmp, proj / "resume.ckpt")
        trainer.strategy.barrier()


class TrainLog(L.Callback):
    """proj_dir/train_log.txt (config, then one line per epoch), proj_dir/metrics.csv (one row per step),
    proj_dir/loss.png at the end, and the final summary on stdout."""

    def __init__(self, cfg, n_train: int, n_total: int, describe: str):
        self.cfg = cfg
        self.n_train, self.n_total, self.describe = n_train, n_total, describe
        self.proj = Path(cfg.proj_dir)
        self._epoch_losses: list[float] = []
        self._t_epoch = 0.0
        self.first_loss: float | None = None
        self.epoch_lines: list[tuple[int, float]] = []

    def on_train_start(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        with open(self.proj / "train_log.txt", "a") as f:
            f.write(f"# rwkv-disha train, {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            f.write(f"# command: {' '.join(sys.argv)}\n")
            f.write(
                f"# adapter: {self.describe}; trainable {self.n_train:,} of {self.n_total:,} parameters\n"
            )
            f.write(json.dumps(to_dict(self.cfg), sort_keys=True) + "\n")
        new = not (self.proj / "metrics.csv").exists()
        self._csv = open(self.proj / "metrics.csv", "a", newline="")  # noqa: SIM115 (closed in on_train_end)
        self._writer = csv.writer(self._csv)
        if new:
            self._writer.writerow(["global_step", "epoch", "batch", "loss", "lr", "tokens", "time"])

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_losses = []
        self._t_epoch = time.time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = float(outputs["loss"] if isinstance(outputs, dict) else outputs)
        self._epoch_losses.append(loss)
        if self.first_loss is None:
            self.first_loss = loss
        if trainer.is_global_zero and batch_idx % max(self.cfg.log_every_n_steps, 1) == 0:
            lr = trainer.optimizers[0].param_groups[0]["lr"]
            epoch = self.cfg.epoch_begin + trainer.current_epoch
            self._writer.writerow(
                [
                    trainer.global_step,
                    epoch,
                    batch_idx,
                    f"{loss:.6f}",
                    f"{lr:.4e}",
                    pl_module.tokens_seen,
                    f"{time.time():.3f}",
                ]
            )
            self._csv.flush()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero or not self._epoch_losses:
            return
        epoch = self.cfg.epoch_begin + trainer.current_epoch
        mean = sum(self._epoch_losses) / len(self._epoch_losses)
        self.epoch_lines.append((epoch, mean))
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        line = (
            f"epoch {epoch} loss {mean:.4f} ppl {math.exp(min(mean, 50)):.2f} lr {lr:.3e} "
            f"tokens {pl_module.tokens_seen} time {time.time() - self._t_epoch:.1f}s"
        )
        with open(self.proj / "train_log.txt", "a") as f:
            f.write(line + "\n")

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and getattr(self, "_csv", None):
            self._csv.close()

    def finish(self, trainer, module, seconds: float) -> None:
        from rwkv_disha.train.trainer import merge_command

        plot = plot_loss(self.proj / "metrics.csv", self.proj / "loss.png")
        saved = next((cb.written for cb in trainer.callbacks if isinstance(cb, SaveAdapters)), [])
        last = saved[-1] if saved else None
        share = 100.0 * self.n_train / max(self.n_total, 1)
        lines = [
            "",
            "training finished",
            f"  adapter      {self.describe}",
            f"  trainable    {self.n_train:,} of {self.n_total:,} parameters ({share:.3f} %)",
            f"  tokens seen  {module.tokens_seen:,} in {seconds:.1f} s "
            f"({module.tokens_seen / max(seconds, 1e-9):,.0f} tok/s)",
        ]
        if self.epoch_lines:
            lines.append(
                f"  loss         {self.epoch_lines[0][1]:.4f} (first epoch) -> "
                f"{self.epoch_lines[-1][1]:.4f} (last)"
            )
        lines.append(f"  logs         {self.proj / 'train_log.txt'}, {self.proj / 'metrics.csv'}")
        if plot:
            lines.append(f"  loss curve   {plot}")
        if last is not None:
            lines.append(f"  checkpoint   {last}")
            lines.append(f"  next         {merge_command(self.cfg, last)}")
        print("\n".join(lines), flush=True)


def plot_loss(csv_path: Path, png_path: Path) -> Path | None:
    """loss.png from metrics.csv (None when matplotlib is not installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps, losses = [], []
    with open(csv_path) as f:
        for row in csv.DictReader(f):
            steps.append(len(steps))
            losses.append(float(row["loss"]))
    if not losses:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="micro-batch loss")
    k = max(1, len(losses) // 20)
    if k > 1:
        smooth = [
            sum(losses[max(0, i - k + 1) : i + 1]) / len(losses[max(0, i - k + 1) : i + 1])
            for i in range(len(losses))
        ]
        ax.plot(steps, smooth, lw=1.5, label=f"mean of {k}")
    ax.set_xlabel("micro-batch")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png_path.with_name(".loss.png.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path
