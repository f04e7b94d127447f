"""``proj_dir/resume.ckpt``: read safely (``weights_only=True``, always), check it, hand it to Lightning.

Lightning's ``trainer.fit(ckpt_path=...)`` would call ``torch.load`` with torch's default, which an
environment variable (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``) or an older torch turns into a full unpickle
that runs code from the file. So the file is read here, checked (structure, the shape of every trainable
tensor, finite values), and Lightning gets the checked dict through :class:`PreloadedCheckpointIO`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from rwkv_disha.errors import RWKVDishaError

KEY = "rwkv_disha"  # our part of the checkpoint: tokens seen, batches done in the current epoch


def read_resume_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` of a resume checkpoint; anything else is one error line."""
    path = Path(path)
    what = f"--resume: {path}"
    if path.is_dir():
        raise RWKVDishaError(
            f"{what} is a DeepSpeed checkpoint folder, which cannot be read without unpickling it; continue "
            'from the last adapter instead ("load" in --disha_config / lora_load, and --epoch_begin)'
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        from rwkv_disha.fsio import os_error_cause

        raise RWKVDishaError(f"{what} cannot be read ({os_error_cause(e)})") from None
    except Exception as e:  # UnpicklingError, a corrupt zip, a foreign format
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise RWKVDishaError(
            f"{what} is not an rwkv-disha resume checkpoint, or it holds objects other than tensors "
            f"(refused: {first})"
        ) from None
    parts = ("state_dict", "optimizer_states", "loops", KEY)
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in parts):
        raise RWKVDishaError(f"{what} is not an rwkv-disha resume checkpoint (missing its training state)")
    if not isinstance(ckpt["state_dict"], dict):
        raise RWKVDishaError(f"{what} is not an rwkv-disha resume checkpoint (no tensor dict)")
    return ckpt


def check_resume_checkpoint(ckpt: dict[str, Any], expected: dict[str, tuple[int, ...]], path: str) -> None:
    """Refuse a checkpoint whose trainable tensors differ from this run's by name or shape, or are not
    finite. ``expected``: name -> shape without the ``model.`` prefix Lightning adds."""
    have = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    missing, extra = sorted(set(expected) - set(have)), sorted(set(have) - set(expected))
    if missing or extra:
        raise RWKVDishaError(
            f"--resume: {path} was saved by a run that trained other tensors "
            f"(missing {missing[:3]}, unexpected {extra[:3]}); resume with the same --peft, "
            "--disha_config / --lora_config and --train_parts"
        )
    for name, shape in expected.items():
        t = have[name]
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise RWKVDishaError(
                f"--resume: {path} has {name} of shape {got}, this run needs {tuple(shape)}: the adapter "
                "settings (r, mode, lora_r) differ from the run being resumed; resume with the same ones"
            )
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise RWKVDishaError(f"--resume: {path} holds non-finite values ({name}); it cannot be resumed")
    ours = ckpt[KEY] if isinstance(ckpt[KEY], dict) else {}
    counts = (ours.get("tokens_seen"), ours.get("epoch_batches", 0))
    if not all(isinstance(n, int) and n >= 0 for n in counts):
        raise RWKVDishaError(f"--resume: {path} is not an rwkv-disha resume checkpoint (bad progress record)")


class PreloadedCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O, except that loading returns the checkpoint already read and checked."""

    def __init__(self, checkpoint: dict[str, Any] | None = None):
        super().__init__()
        self.checkpoint = checkpoint

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:  # noqa: ARG002
        if self.checkpoint is None:
            raise RWKVDishaError(f"internal: no checked checkpoint for {path}")
        return self.checkpoint
