"""Shared fixtures: tiny RWKV-7 checkpoints in the official layout, and the `rwkv` package oracle."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

from rwkv_disha.model.init import init_state_dict
from rwkv_disha.model.load import save_state_dict


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory):
    """make_checkpoint(n_layer, n_embd, vocab, style='random', dtype=fp32, seed=0) -> path (cached)."""
    cache: dict = {}

    def make(n_layer=2, n_embd=128, vocab=1000, style="random", dtype=torch.float32, seed=0, head_size=64):
        key = (n_layer, n_embd, vocab, style, dtype, seed, head_size)
        if key not in cache:
            sd = init_state_dict(n_layer, n_embd, vocab, head_size, seed=seed, style=style, dtype=dtype)
            name = f"rwkv7-L{n_layer}-C{n_embd}-V{vocab}-{style}-{str(dtype)[6:]}-s{seed}.pth"
            cache[key] = save_state_dict(sd, tmp_path_factory.mktemp("ckpt") / name)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_model_path(make_checkpoint):
    return make_checkpoint(2, 128, 1000)


@pytest.fixture(scope="session")
def rwkv_oracle():
    """logits(path, tokens) from BlinkDL's `rwkv` package (RWKV Runner's engine), cpu fp32."""
    pytest.importorskip("rwkv")
    os.environ["RWKV_V7_ON"] = "1"  # read by rwkv.model at import time
    import rwkv.model

    rwkv_model = importlib.reload(rwkv.model)

    def logits(path, tokens: list[int]) -> torch.Tensor:
        model = rwkv_model.RWKV(model=str(path)[: -len(".pth")], strategy="cpu fp32")
        out, _ = model.forward(list(tokens), None, full_output=True)
        return out.float()

    return logits
