"""The dtype train holds a frozen base in: bf16 where the run is bf16 (GPU, or a CPU with native bf16), fp32
for fp32 runs and for fp16 on a CPU; trained tensors always fp32."""

from __future__ import annotations

import json

import pytest
import torch

from rwkv_disha.config import from_mapping
from rwkv_disha.model.load import load_model
from rwkv_disha.train.build import adapt_model, base_dtype_for, build_adapter_config
from rwkv_disha.train.config import Config


@pytest.mark.parametrize(
    ("precision", "file_dtype", "on_gpu", "expect"),
    [
        ("fp32", torch.bfloat16, False, torch.float32),
        ("tf32", torch.float32, True, torch.float32),
        ("bf16", torch.float32, False, torch.bfloat16),  # no per-step cast of every weight under autocast
        ("bf16", torch.float32, True, torch.bfloat16),
        ("fp16", torch.float32, False, torch.float32),  # few CPUs have fp16 matmuls
        ("fp16", torch.float32, True, torch.float16),
        ("fp16", torch.bfloat16, False, torch.float16),  # a 16-bit file stays 16-bit
    ],
)
def test_base_dtype_for(precision, file_dtype, on_gpu, expect):
    assert base_dtype_for(precision, file_dtype, on_gpu) == expect


def test_bf16_run_on_cpu_holds_the_frozen_base_in_bf16_and_trains_fp32(tiny_model_path):
    cfg = from_mapping(
        Config,
        {"load_model": str(tiny_model_path), "accelerator": "cpu", "precision": "bf16", "peft": "disha",
         "disha_config": json.dumps({"mode": "bone", "load": "", "r": 16})},
        source="test",
    )  # fmt: skip
    model = adapt_model(load_model(tiny_model_path), cfg, build_adapter_config(cfg), on_gpu=False)
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trained == {torch.float32}
