"""Shared fixtures: tiny RWKV-7 / 6 / 5.2 checkpoints (official layout) and the `rwkv` package oracle."""

from __future__ import annotations

import importlib
import os
import subprocess

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
    """make_checkpoint(n_layer, n_embd, vocab, style='random', dtype=fp32, seed=0, head_size=64,
    version='x070') -> path (cached)."""
    cache: dict = {}

    def make(
        n_layer=2,
        n_embd=128,
        vocab=1000,
        style="random",
        dtype=torch.float32,
        seed=0,
        head_size=64,
        version="x070",
    ):
        key = (n_layer, n_embd, vocab, style, dtype, seed, head_size, version)
        if key not in cache:
            sd = init_state_dict(
                n_layer, n_embd, vocab, head_size, seed=seed, style=style, dtype=dtype, version=version
            )
            shape = f"L{n_layer}-C{n_embd}-H{head_size}-V{vocab}"
            name = f"{version}-{shape}-{style}-{str(dtype)[6:]}-s{seed}.pth"
            cache[key] = save_state_dict(sd, tmp_path_factory.mktemp("ckpt") / name)
        return cache[key]

    return make


def _save_random_adapter(base, cfg, out, seed: int = 1, scale: float = 0.3):
    """``cfg`` injected into the model at ``base``, every trainable tensor given random (non-zero) values,
    saved as training saves it (+ sidecar) at ``out``. Zero-started adapters would make any test that
    compares merged with unmerged, or scales the adapter, trivially pass."""
    from rwkv_disha import load_model
    from rwkv_disha.adapters import inject_adapters, mark_trainable, save_adapter_file

    model = load_model(base)
    inject_adapters(model, cfg)
    mark_trainable(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return save_adapter_file(model, cfg, out)


@pytest.fixture(scope="session")
def random_adapter():
    """random_adapter(base, cfg, out, seed=1, scale=0.3) -> path of a saved adapter with random weights."""
    return _save_random_adapter


@pytest.fixture(scope="session")
def tiny_model_path(make_checkpoint):
    return make_checkpoint(2, 128, 1000)


@pytest.fixture(scope="session")
def rwkv_oracle():
    """logits(path, tokens, version='x070') from BlinkDL's `rwkv` package (RWKV Runner's engine), cpu fp32.

    The package picks its RWKV-7 class from RWKV_V7_ON when it is imported, so it is re-imported
    whenever the version asked for needs the other setting (RWKV-6 / 5.2 need it unset)."""
    pytest.importorskip("rwkv")
    import rwkv.model

    loaded = {"v7": None}

    def logits(path, tokens: list[int], version: str = "x070") -> torch.Tensor:
        v7 = version == "x070"
        if loaded["v7"] is not v7:
            if v7:
                os.environ["RWKV_V7_ON"] = "1"  # read by rwkv.model at import time
            else:
                os.environ.pop("RWKV_V7_ON", None)
            importlib.reload(rwkv.model)
            loaded["v7"] = v7
        name = str(path)[: -len(".pth")]
        model = rwkv.model.RWKV(model=name, strategy="cpu fp32", **({} if v7 else {"verbose": False}))
        out, _ = model.forward(list(tokens), None, full_output=True)
        return out.float()

    return logits


@pytest.fixture
def small_fs(tmp_path):
    """small_fs(size="2m", read_only=False) -> a folder on its own tmpfs (unmounted afterwards).

    Skips the test where this machine does not allow mounting (mounting needs root)."""
    mounted = []

    def mount(size: str = "2m", read_only: bool = False):
        where = tmp_path / f"fs{len(mounted)}"
        where.mkdir()
        opts = f"size={size}" + (",ro" if read_only else "")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip() or 'not permitted'})")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", str(where)], capture_output=True)


@pytest.fixture
def main_beside_fifo():
    """main_beside_fifo(argv, fifo) -> exit status of ``rwkv-disha argv`` that may read the FIFO ``fifo``:
    run in a thread, and the test fails (after writing to the FIFO, so that the reader is let go) if it is
    still waiting after a minute. Reading a FIFO blocks until something writes to it."""
    import threading

    from rwkv_disha.cli import main

    def run(argv: list[str], fifo) -> int:
        out: list[int] = []
        thread = threading.Thread(target=lambda: out.append(main(argv)), daemon=True)
        thread.start()
        thread.join(60)
        if thread.is_alive():
            with open(fifo, "wb"):
                pass
            pytest.fail(f"{argv[0]} waited on the FIFO {fifo}")
        return out[0]

    return run
