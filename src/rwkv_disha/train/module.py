"""The Lightning module: one adapted RWKV model, masked next-token loss, Adam(W) + LR schedule.

Only trainable tensors (adapters + train_parts) go into Lightning checkpoints; the frozen base is
reloaded from ``--load_model`` on resume, so a resume file is megabytes, not gigabytes.
"""

from __future__ import annotations

import time

import lightning as L
import torch

from rwkv_disha.data.dataset import masked_lm_loss
from rwkv_disha.errors import RWKVDishaError
from rwkv_disha.train.schedule import lr_at


class DishaModule(L.LightningModule):
    def __init__(self, model: torch.nn.Module, cfg, steps_per_epoch: int):
        """``cfg`` is the train Config; ``steps_per_epoch`` counts optimizer steps per epoch."""
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.steps_per_epoch = steps_per_epoch
        self._t_last = None
        self.tokens_seen = 0

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.cfg.log_samples:
            self._log_samples(batch["input_ids"])
        logits = self.model(batch["input_ids"])
        loss = masked_lm_loss(logits, batch["labels"], batch["mask"])
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

    def _log_samples(self, idx: torch.Tensor) -> None:
        from pathlib import Path

        path = Path(self.cfg.proj_dir) / f"samples-rank{self.global_rank}.txt"
        with open(path, "a") as f:
            for row in idx[:, :8].tolist():
                f.write(" ".join(map(str, row)) + "\n")

    def configure_optimizers(self):
        cfg = self.cfg
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise RWKVDishaError("nothing to train: no adapter or train_parts parameter requires grad")
        opt = torch.optim.AdamW(
            params,
            lr=cfg.lr_init,
            betas=(cfg.beta1, cfg.beta2),
            eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay,
        )
        total = self.steps_per_epoch * (cfg.epoch_begin + cfg.epoch_count)
        # epoch_begin shifts the schedule: continuing at epoch N starts at step N * steps_per_epoch
        offset = self.steps_per_epoch * cfg.epoch_begin

        def factor(step: int) -> float:  # LambdaLR multiplies lr_init by this
            lr = lr_at(
                step + offset, total, cfg.lr_init, cfg.lr_final, cfg.warmup_steps, cfg.lr_schedule,
                cfg.wsd_decay_frac,
            )  # fmt: skip
            return lr / cfg.lr_init

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    # -- keep checkpoints small: only what trains ------------------------------------------------------
    def _trainable_keys(self) -> set[str]:
        return {"model." + n for n, p in self.model.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = self._trainable_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["rwkv_disha"] = {"tokens_seen": self.tokens_seen}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        keep = self._trainable_keys()
        have = set(checkpoint["state_dict"])
        if have != keep:
            raise RWKVDishaError(
                "resume checkpoint does not match this run's trainable tensors: "
                f"missing {sorted(keep - have)[:3]}, unexpected {sorted(have - keep)[:3]}; "
                "resume with the same --peft / config / train_parts"
            )
        # Lightning's own load is non-strict (the frozen base is not in the file); fill it in here so
        # every base tensor keeps its loaded value and every trainable one is checked above.
        full = self.state_dict()
        full.update(checkpoint["state_dict"])
        checkpoint["state_dict"] = full
        self.tokens_seen = checkpoint.get("rwkv_disha", {}).get("tokens_seen", 0)
