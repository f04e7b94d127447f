"""Fixtures for the bench / loss / speed-path tests: a tiny random RWKV-7 in memory."""

from __future__ import annotations

import pytest

from rwkv_disha.model.init import init_state_dict
from rwkv_disha.model.load import build_model, infer_config


@pytest.fixture
def tiny_model():
    """RWKV-7 L2 C64 V97, every tensor random, fp32, on the CPU."""
    sd = init_state_dict(2, 64, 97, style="random", seed=1)
    model = build_model(infer_config(sd), op="torch", device="cpu")
    model.load_state_dict(sd)
    return model
