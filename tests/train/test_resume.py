"""A run killed mid-epoch and resumed with --resume ends with the same adapter as an uninterrupted run."""

import lightning as L
import pytest
import torch

from rwkv_disha.cli import parse_config
from rwkv_disha.model.load import load_state_dict
from rwkv_disha.train.run import setup as fit


class Crash(L.Callback):
    """Simulates a kill: raises after the given number of micro-batches."""

    def __init__(self, after_batches: int):
        self.after, self.seen = after_batches, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen += 1
        if self.seen == self.after:
            raise SystemExit("killed (simulated)")


@pytest.mark.parametrize("peft", ["bone", "lora"])
def test_kill_and_resume_equals_uninterrupted(tmp_path, base_path, count_data, train_args, peft):
    extra = ["--warmup_steps", "3", "--lr_final", "1e-3"]  # a schedule that moves, so position matters
    if peft == "lora":  # dropout > 0: the random stream must also resume exactly
        extra += ["--peft", "lora", "--lora_config", '{"lora_r":4,"lora_alpha":8,"lora_dropout":0.2}']
    argv = train_args(base_path, count_data, tmp_path / "full", *extra, epochs=3, steps=6)
    _, cfg = parse_config("train", argv[1:])
    assert fit(cfg) == 0
    full = load_state_dict(tmp_path / "full" / "rwkv-2.pth")

    argv = train_args(base_path, count_data, tmp_path / "cut", *extra, epochs=3, steps=6)
    _, cfg = parse_config("train", argv[1:])
    with pytest.raises(SystemExit, match="killed"):
        fit(cfg, extra_callbacks=[Crash(after_batches=9)])  # in the middle of epoch 1
    assert (tmp_path / "cut" / "rwkv-0.pth").is_file() and not (tmp_path / "cut" / "rwkv-2.pth").exists()

    _, cfg = parse_config("train", ["--resume", str(tmp_path / "cut"), "--progress_bar", "0"])
    assert cfg.load_model == "" and cfg.resume  # everything else comes from the run being resumed
    assert fit(cfg) == 0
    resumed = load_state_dict(tmp_path / "cut" / "rwkv-2.pth")
    assert full.keys() == resumed.keys()
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], atol=0, rtol=0)
    # the adapter really trained, so the equality is not between two zero tensors
    assert any(v.abs().sum() > 0 for k, v in full.items() if "disha" in k or "lora_B" in k)
