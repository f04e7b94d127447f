"""What a user reads after training: metrics.csv, loss.png and the end-of-run summary."""

from __future__ import annotations

import contextlib
import csv
import shlex
import time
from pathlib import Path

from rwkv_disha.errors import RWKVDishaError
from rwkv_disha.fsio import os_error_cause
from rwkv_disha.train.config import Config

COLUMNS = ["global_step", "epoch", "batch", "loss", "lr", "tokens", "time"]


def _write_error(path: Path, e: OSError) -> RWKVDishaError:
    return RWKVDishaError(f"cannot write {path}: {os_error_cause(e)}")


def append_text(path: Path, text: str) -> None:
    """Append to a log file; a full disk or a read-only folder is one error line naming the file."""
    try:
        with open(path, "a") as f:
            f.write(text)
    except OSError as e:
        raise _write_error(path, e) from None


class MetricsCsv:
    """proj_dir/metrics.csv, one row per logged micro-batch; a resumed run appends to it."""

    def __init__(self, path: Path):
        self.path = path
        new = not path.exists()
        try:
            self._file = open(path, "a", newline="")  # noqa: SIM115 (closed by close())
        except OSError as e:
            raise _write_error(path, e) from None
        self._writer = csv.writer(self._file)
        if new:
            self._writer.writerow(COLUMNS)

    def row(self, step: int, epoch: int, batch: int, loss: float, lr: float, tokens: int) -> None:
        try:
            self._writer.writerow(
                [step, epoch, batch, f"{loss:.6f}", f"{lr:.4e}", tokens, f"{time.time():.3f}"]
            )
            self._file.flush()
        except OSError as e:
            raise _write_error(self.path, e) from None

    def close(self) -> None:
        with contextlib.suppress(OSError):  # already reported by row(), or nothing left to flush
            self._file.close()


def merge_command(cfg: Config, adapter_path: Path) -> str:
    q = f" --quant {cfg.adapter.quant}" if cfg.adapter.quant != "none" else ""
    out = adapter_path.with_name(adapter_path.stem + "-merged.pth")
    base, adapter, out = (shlex.quote(str(p)) for p in (cfg.load_model, adapter_path, out))  # to paste
    return f"rwkv-disha merge --base_model {base} --peft_checkpoint {adapter} --output {out}{q}"


def summary_lines(
    cfg: Config,
    *,
    describe: str,
    counts: tuple[int, int],
    tokens: int,
    seconds: float,
    epoch_lines: list[tuple[int, float]],
    plot: Path | None,
    last: Path | None,
) -> list[str]:
    """The summary printed when training finishes."""
    proj = Path(cfg.proj_dir)
    n_train, n_total = counts
    share = 100.0 * n_train / max(n_total, 1)
    lines = [
        "",
        "training finished",
        f"  adapter      {describe}",
        f"  trainable    {n_train:,} of {n_total:,} parameters ({share:.3f} %)",
        f"  tokens seen  {tokens:,} in {seconds:.1f} s ({tokens / max(seconds, 1e-9):,.0f} tok/s)",
    ]
    if epoch_lines:
        first, last_loss = epoch_lines[0][1], epoch_lines[-1][1]
        lines.append(f"  loss         {first:.4f} (first epoch) -> {last_loss:.4f} (last)")
    lines.append(f"  logs         {proj / 'train_log.txt'}, {proj / 'metrics.csv'}")
    if plot:
        lines.append(f"  loss curve   {plot}")
    if last is not None:
        lines.append(f"  checkpoint   {last}")
        lines.append(f"  next         {merge_command(cfg, last)}")
    return lines


def plot_loss(csv_path: Path, png_path: Path) -> Path | None:
    """loss.png from metrics.csv (None when matplotlib is not installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from rwkv_disha.fsio import atomic_write

    with open(csv_path) as f:
        losses = [float(row["loss"]) for row in csv.DictReader(f)]
    if not losses:
        return None
    steps = list(range(len(losses)))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="micro-batch loss")
    k = max(1, len(losses) // 20)
    if k > 1:
        window = [losses[max(0, i - k + 1) : i + 1] for i in steps]
        smooth = [sum(w) / len(w) for w in window]
        ax.plot(steps, smooth, lw=1.5, label=f"mean of {k}")
    ax.set_xlabel("micro-batch")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        atomic_write(png_path, lambda tmp: fig.savefig(tmp, format="png"), "loss curve")
    finally:
        plt.close(fig)
    return png_path
