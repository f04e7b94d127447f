"""AdamW's kernel: fused where Lightning allows it, and the same steps as torch's reference loop."""

from __future__ import annotations

import copy

import pytest
import torch

from rwkv_disha.config import from_mapping
from rwkv_disha.train.config import Config
from rwkv_disha.train.module import DishaModule


def _module(precision: str, strategy: str = "auto", grad_clip: float = 1.0) -> DishaModule:
    cfg = from_mapping(
        Config,
        {"accelerator": "cpu", "precision": precision, "strategy": strategy, "grad_clip": grad_clip,
         "peft": "none", "lr_init": 1e-2, "lr_final": 1e-2, "weight_decay": 0.01},
        source="test",
    )  # fmt: skip
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 3))
    return DishaModule(model, cfg, steps_per_epoch=10)


@pytest.mark.parametrize(
    ("precision", "strategy", "grad_clip", "expect"),
    [
        ("fp32", "auto", 1.0, {"fused": True, "foreach": None}),
        ("tf32", "ddp", 1.0, {"fused": True, "foreach": None}),
        ("bf16", "auto", 0.0, {"fused": True, "foreach": None}),
        # Lightning's mixed-precision plugin refuses to clip a fused optimizer: fp16 (and bf16 under
        # FSDP) take foreach; bf16 elsewhere clips in the module and stays fused
        ("bf16", "auto", 1.0, {"fused": True, "foreach": None}),
        ("bf16", "ddp", 1.0, {"fused": True, "foreach": None}),
        ("bf16", "fsdp", 1.0, {"fused": None, "foreach": True}),
        ("fp16", "auto", 1.0, {"fused": None, "foreach": True}),
        ("fp32", "deepspeed_stage_2", 1.0, {"fused": None, "foreach": None}),
    ],
)
def test_adamw_kernel_choice(precision, strategy, grad_clip, expect):
    opt = _module(precision, strategy, grad_clip).configure_optimizers()["optimizer"]
    assert {k: opt.defaults[k] for k in expect} == expect


def test_fused_adamw_steps_equal_the_reference_loop():
    """Five steps of the fused optimizer the module builds == torch's for-loop AdamW, same groups."""
    module = _module("fp32")
    opt = module.configure_optimizers()["optimizer"]
    assert opt.defaults["fused"]
    ref_model = copy.deepcopy(module.model)
    ref = torch.optim.AdamW(ref_model.parameters(), foreach=False, fused=False, **{
        k: opt.defaults[k] for k in ("lr", "betas", "eps", "weight_decay")})  # fmt: skip
    x = torch.randn(32, 8)
    for _ in range(5):
        for m, o in ((module.model, opt), (ref_model, ref)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for p, q in zip(module.model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("precision", "strategy", "own"),
    [("bf16", "auto", True), ("bf16", "ddp", True), ("fp32", "auto", False), ("fp16", "auto", False),
     ("bf16", "deepspeed_stage_2", False)],
)  # fmt: skip
def test_bf16_clips_in_the_module_and_lightning_does_not(precision, strategy, own):
    """Where the module clips (bf16 outside DeepSpeed / FSDP), its hook scales the gradients to the norm and
    the Trainer gets no gradient_clip_val; elsewhere the hook leaves them and Lightning clips."""
    from rwkv_disha.train.build import build_trainer
    from rwkv_disha.train.module import clips_itself

    module = _module(precision, strategy, grad_clip=0.5)
    assert clips_itself(module.cfg) is own
    for p in module.model.parameters():
        p.grad = torch.full_like(p, 3.0)
    module.on_before_optimizer_step(None)
    params = list(module.model.parameters())
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
    assert norm.item() == pytest.approx(0.5 if own else 3.0 * sum(p.numel() for p in params) ** 0.5)
    if strategy == "auto" and precision != "fp16":  # a Trainer this CPU can build
        trainer = build_trainer(module.cfg, callbacks=[], plugins=[])
        assert trainer.gradient_clip_val == (None if own else 0.5)
