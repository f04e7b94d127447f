"""Callbacks: per-batch seeding, adapter files + resume checkpoint, a clean stop on SIGTERM / SIGINT, and
the logs a user reads (the end-of-run summary included)."""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import lightning as L
import torch

from rwkv_disha.errors import RWKVDishaError
from rwkv_disha.fsio import atomic_write_json, os_error_cause
from rwkv_disha.train.config import RESUME_FILE, RUN_RECORD, SAVED_CONFIG, Config, config_json
from rwkv_disha.train.logs import MetricsCsv, append_text, plot_loss, summary_lines
from rwkv_disha.train.module import DishaModule, Diverged, divergence_advice


def adapter_path(cfg: Config, epoch: int) -> Path:
    return Path(cfg.proj_dir) / f"rwkv-{epoch}.pth"


class SeedBatches(L.Callback):
    """Seed every micro-batch from (seed, epoch, batch, rank): dropout masks do not depend on what else
    drew random numbers before, so a resumed run repeats an uninterrupted one exactly."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        epoch = self.cfg.optim.epoch_begin + trainer.current_epoch
        seed = ((self.cfg.optim.seed * 100_003 + epoch) * 1_000_003 + batch_idx) * 64 + trainer.global_rank
        torch.manual_seed(seed % (1 << 63))  # large --random_seed values stay in torch's seed range


def _check_finite(module: DishaModule, trainer, cfg: Config) -> None:
    """Refuse to save trained tensors that are no longer finite (the loss of the last step was)."""
    trained = ((n, p) for n, p in module.model.named_parameters() if p.requires_grad)
    bad = next((n for n, p in trained if not bool(torch.isfinite(p).all())), None)
    if trainer.strategy.reduce_boolean_decision(bad is not None, all=False):
        last = module.last_finite_loss
        shown = "none" if last is None else f"{last:.4f}"
        raise Diverged(
            f"training diverged at step {trainer.global_step}: the trained tensor {bad or 'on another rank'} "
            f"is no longer finite (last finite loss {shown}); it was not saved; {divergence_advice(cfg)}"
        )


def save_resume_checkpoint(trainer, module: DishaModule, cfg: Config, epoch_batches: int) -> Path:
    """Write proj_dir/resume.ckpt atomically on every rank's behalf (a collective: every rank calls it).

    ``epoch_batches``: micro-batches done in the current epoch (0 at an epoch's end); a resumed run skips
    them. The temporary file is ``.resume.ckpt.<pid>.<random>.tmp`` (removed on error; a killed run's is
    removed by the next run's fsio.clean_stale_temps).
    """
    _check_finite(module, trainer, cfg)
    module.epoch_batches = epoch_batches
    final = Path(cfg.proj_dir) / RESUME_FILE
    # fsio's temporary-file pattern (so clean_stale_temps finds a killed run's); not created here:
    # Lightning writes a file there, DeepSpeed a folder
    name = f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp" if trainer.is_global_zero else ""
    tmp = final.with_name(trainer.strategy.broadcast(name, src=0))
    try:
        # weights_only here is what to SAVE: False keeps optimizer, scheduler and loops (reading it back is
        # always weights_only=True, resume.py); said explicitly so Lightning does not log a scary default
        trainer.save_checkpoint(tmp, weights_only=False)
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            if tmp.is_dir() and final.is_dir():
                shutil.rmtree(final)  # a folder cannot be renamed over a folder
            os.replace(tmp, final)
    except BaseException as e:
        if trainer.is_global_zero:
            _remove(tmp)
        if isinstance(e, RWKVDishaError) or not isinstance(e, Exception):
            raise
        raise RWKVDishaError(f"cannot write resume checkpoint {final}: {os_error_cause(e)}") from None
    return final


def _remove(path: Path) -> None:
    if path.is_dir():  # DeepSpeed writes a checkpoint folder
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# what a run writes in proj_dir (besides the lock): an --overwrite 1 run moves an earlier run's aside
RUN_FILES = (
    "rwkv-*.pth", "rwkv-*.json", RESUME_FILE, SAVED_CONFIG, "train_log.txt", "metrics.csv", "loss.png",
    "samples-rank*.txt",
)  # fmt: skip


def set_aside_earlier_run(proj: Path) -> Path | None:
    """Move an earlier run's files (adapters, sidecars, resume.ckpt, its config and logs) from ``proj``
    into a new ``proj/previous-<time>/``, never deleting one; None when ``proj`` holds no earlier run
    (no rwkv-*.pth, no resume.ckpt: what :func:`checks.check_fresh_folder` asks --overwrite 1 for)."""
    from rwkv_disha.train.checks import earlier_run_files

    if not earlier_run_files(proj):
        return None
    found = sorted({p for pattern in RUN_FILES for p in proj.glob(pattern)})
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside, n = proj / f"previous-{stamp}", 1
    while aside.exists():
        n += 1
        aside = proj / f"previous-{stamp}-{n}"
    try:
        aside.mkdir()
        for p in found:
            os.rename(p, aside / p.name)
    except OSError as e:
        raise RWKVDishaError(
            f"--overwrite 1: cannot move the earlier run in {proj} aside into {aside} ({os_error_cause(e)}); "
            "move or remove its files yourself, or choose another --proj_dir"
        ) from None
    print(f"--overwrite 1: the earlier run's files in {proj} are moved to {aside}", flush=True)
    return aside


class SaveAdapters(L.Callback):
    """Every epoch_save epochs and at the end: proj_dir/rwkv-{epoch}.pth (+ .json sidecar). Every epoch:
    proj_dir/resume.ckpt (trainable tensors, optimizer, scheduler, loop position) for --resume. Nothing
    non-finite is ever written."""

    def __init__(
        self, cfg: Config, acfg, saved_names: list[str], fingerprint: dict, record: dict | None = None
    ):
        self.cfg, self.acfg = cfg, acfg
        self.saved_names = saved_names
        self.fingerprint = fingerprint
        self.record = {k: v for k, v in (record or {}).items() if v is not None}  # train_config.json's
        self.written: list[Path] = []

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            if not self.cfg.resume:
                # an --overwrite 1 run sets the earlier run aside: its resume.ckpt beside this run's
                # train_config.json would have --resume continue it under this run's options, and its
                # higher-numbered rwkv-N.pth would pass for this run's newest
                set_aside_earlier_run(Path(self.cfg.proj_dir))
            saved = {**config_json(self.cfg), RUN_RECORD: self.record}
            atomic_write_json(Path(self.cfg.proj_dir) / SAVED_CONFIG, saved, "train config")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        from rwkv_disha.adapters import adapter_sidecar, write_adapter_file

        cfg, o = self.cfg, self.cfg.optim
        epoch = o.epoch_begin + trainer.current_epoch
        last = trainer.current_epoch + 1 >= o.epoch_count
        save = last or (trainer.current_epoch + 1) % o.epoch_save == 0
        _check_finite(pl_module, trainer, cfg)
        # gathers sharded parameters (FSDP / DeepSpeed stage 3); a collective: every rank calls it
        full = trainer.strategy.lightning_module_state_dict() if save else None
        if save and trainer.is_global_zero:
            tensors = {n: full["model." + n].detach().to("cpu", copy=True) for n in self.saved_names}
            sidecar = adapter_sidecar(pl_module.model, self.acfg, self.fingerprint)
            step = trainer.global_step
            sidecar["trained"] = {"epoch": epoch, "global_step": step, "base_model": cfg.load_model}
            self.written.append(write_adapter_file(adapter_path(cfg, epoch), tensors, sidecar))
        save_resume_checkpoint(trainer, pl_module, cfg, epoch_batches=0)


class Interrupted(RWKVDishaError):
    """SIGTERM / SIGINT: training stopped at a step boundary after saving resume.ckpt."""


class StopOnSignal(L.Callback):
    """On SIGTERM or SIGINT (a cluster's pre-emption, Ctrl-C): finish the current optimizer step, write
    resume.ckpt, and stop with the ``--resume`` command. A second signal stops at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.received: int | None = None
        self._original = {s: signal.getsignal(s) for s in self.SIGNALS}

    def _handler(self, signum, frame) -> None:
        if self.received is not None:  # asked twice: stop now (the last resume.ckpt stays)
            self._restore()
            raise KeyboardInterrupt
        self.received = signum

    def _restore(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for s, h in self._original.items():
                signal.signal(s, h)

    def on_train_start(self, trainer, pl_module) -> None:
        # after Lightning's own SIGTERM handler is installed: ours replaces it while training runs
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                signal.signal(s, self._handler)
        connector = getattr(trainer, "_signal_connector", None)
        if getattr(connector, "received_sigterm", False):
            # a SIGTERM caught by Lightning's handler before ours (while the run set up) is ours to act
            # on: Lightning's own flag would end the run after the next micro-batch with exit status 0
            connector.received_sigterm = False
            self.received = self.received or signal.SIGTERM

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % self.cfg.optim.accumulate_grad_batches:
            return  # in the middle of an optimizer step: its accumulated gradients are not saved
        if batch_idx + 1 >= trainer.num_training_batches:
            # the epoch's last step: its end writes rwkv-N.pth and resume.ckpt, then on_train_epoch_end
            # stops (a resume.ckpt saved here would resume past the epoch's end and never write rwkv-N.pth)
            return
        if trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            save_resume_checkpoint(trainer, pl_module, self.cfg, epoch_batches=batch_idx + 1)
            self._stop(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # runs after SaveAdapters (callback order): resume.ckpt for the epoch's end is written
        if trainer.current_epoch + 1 >= self.cfg.optim.epoch_count:
            return  # the last epoch: the run is complete, and finishes as one (no --resume to give)
        if trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            self._stop(trainer)

    def _stop(self, trainer) -> None:
        name = signal.Signals(self.received).name if self.received else "a signal on another rank"
        raise Interrupted(
            f"stopped by {name} after step {trainer.global_step}; {Path(self.cfg.proj_dir) / RESUME_FILE} "
            f"is saved: continue with `rwkv-disha train --resume {shlex.quote(str(self.cfg.proj_dir))}`"
        )

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()

    def teardown(self, trainer, pl_module, stage) -> None:
        self._restore()


class TrainLog(L.Callback):
    """proj_dir/train_log.txt (config, then one line per epoch), proj_dir/metrics.csv (one row per step),
    and at the end of training proj_dir/loss.png and the summary on stdout."""

    def __init__(self, cfg: Config, n_train: int, n_total: int, describe: str):
        self.cfg = cfg
        self.n_train, self.n_total, self.describe = n_train, n_total, describe
        self.proj = Path(cfg.proj_dir)
        self._epoch_losses: list[float] = []
        self._t_epoch = self._t_start = 0.0
        self.epoch_lines: list[tuple[int, float]] = []
        self._csv: MetricsCsv | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._t_start = self._t_epoch = time.time()  # a resumed epoch gets no on_train_epoch_start
        if not trainer.is_global_zero:
            return
        counts = f"trainable {self.n_train:,} of {self.n_total:,} parameters"
        header = [
            f"# rwkv-disha train, {time.strftime('%Y-%m-%d %H:%M:%S')}",
            f"# command: {' '.join(sys.argv)}",
            f"# adapter: {self.describe}; {counts}",
            json.dumps(config_json(self.cfg), sort_keys=True),
        ]
        append_text(self.proj / "train_log.txt", "\n".join(header) + "\n")
        self._csv = MetricsCsv(self.proj / "metrics.csv")

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_losses = []
        self._t_epoch = time.time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = float(outputs["loss"] if isinstance(outputs, dict) else outputs)
        self._epoch_losses.append(loss)
        if self._csv is not None and batch_idx % max(self.cfg.logging.log_every_n_steps, 1) == 0:
            lr = trainer.optimizers[0].param_groups[0]["lr"]
            epoch = self.cfg.optim.epoch_begin + trainer.current_epoch
            self._csv.row(trainer.global_step, epoch, batch_idx, loss, lr, pl_module.tokens_seen)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        from rwkv_disha.evaluate import perplexity

        if not trainer.is_global_zero or not self._epoch_losses:
            return
        epoch = self.cfg.optim.epoch_begin + trainer.current_epoch
        mean = sum(self._epoch_losses) / len(self._epoch_losses)
        self.epoch_lines.append((epoch, mean))
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        line = (
            f"epoch {epoch} loss {mean:.4f} ppl {perplexity(mean):.2f} lr {lr:.3e} "
            f"tokens {pl_module.tokens_seen} time {time.time() - self._t_epoch:.1f}s"
        )
        append_text(self.proj / "train_log.txt", line + "\n")

    def _close(self) -> None:
        if self._csv is not None:
            self._csv.close()
            self._csv = None

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._close()

    def on_train_end(self, trainer, pl_module) -> None:
        """The end-of-run summary: loss curve, what was trained, where the adapter is, what to run next."""
        self._close()
        if not trainer.is_global_zero:
            return
        plot = plot_loss(self.proj / "metrics.csv", self.proj / "loss.png")
        saved = next((cb.written for cb in trainer.callbacks if isinstance(cb, SaveAdapters)), [])
        lines = summary_lines(
            self.cfg,
            describe=self.describe,
            counts=(self.n_train, self.n_total),
            tokens=pl_module.tokens_seen,
            seconds=time.time() - self._t_start,
            epoch_lines=self.epoch_lines,
            plot=plot,
            last=saved[-1] if saved else None,
        )
        print("\n".join(lines), flush=True)
