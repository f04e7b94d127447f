"""Fixtures for training tests: a tiny base and a learnable binidx corpus (counting sequences)."""

import lightning.pytorch  # noqa: F401  imported at collection: its log handler then writes to the real
import numpy as np  # stderr, not to the captured stream of whichever test imported it first (closed after)
import pytest

from rwkv_disha.data.binidx import write_binidx

VOCAB = 256


@pytest.fixture(scope="session")
def base_path(make_checkpoint):
    return make_checkpoint(2, 64, VOCAB, style="pretrain", seed=3)


@pytest.fixture(scope="session")
def count_data(tmp_path_factory):
    """binidx prefix: 64 documents walking a fixed cycle of 8 tokens from a random phase, ending in 0.

    A model that learns anything (even only the 8-token unigram) drops from ln(256) = 5.5 towards 2."""
    rng = np.random.default_rng(0)
    cycle = np.array([17, 200, 3, 96, 45, 151, 230, 64])
    docs = []
    for _ in range(64):
        start, n = int(rng.integers(0, 8)), int(rng.integers(20, 60))
        docs.append(np.append(cycle[(start + np.arange(n)) % 8], 0).astype(np.int32))
    prefix = tmp_path_factory.mktemp("data") / "count"
    write_binidx(prefix, docs)
    return str(prefix)


def _train_args(base, data, proj, *extra, epochs=2, steps=8, bsz=2, ctx=32, lr="1e-2"):
    return [
        "train", "--load_model", str(base), "--proj_dir", str(proj), "--data_file", str(data),
        "--data_type", "binidx", "--ctx_len", str(ctx), "--micro_bsz", str(bsz), "--epoch_steps", str(steps),
        "--epoch_count", str(epochs), "--epoch_save", "1", "--lr_init", lr, "--lr_final", lr,
        "--accelerator", "cpu", "--precision", "fp32", "--progress_bar", "0",
        "--disha_config", '{"mode":"bone","load":"","r":16}', "--random_seed", "1", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="session")
def train_args():
    """train_args(base, data, proj, *extra_flags, epochs=, steps=, bsz=, ctx=, lr=) -> argv for cli.main."""
    return _train_args


@pytest.fixture(scope="session")
def unique_data(tmp_path_factory):
    """binidx prefix: 40 documents whose first token is the document number + 1 (to trace sampling)."""
    docs = [np.array([i + 1, 17, 200, 3, 96, 45, 0], dtype=np.int32) for i in range(40)]
    prefix = tmp_path_factory.mktemp("data") / "unique"
    write_binidx(prefix, docs)
    return str(prefix)


@pytest.fixture(scope="module")
def done(tmp_path_factory, base_path, count_data, train_args):
    """A finished one-epoch Bone r=16 run, micro_bsz 2, ctx_len 16, epoch_steps 2, seed 1 (read-only: tests
    copy it with run_helpers.copy_run)."""
    from rwkv_disha.cli import main

    proj = tmp_path_factory.mktemp("done") / "run"
    assert main(train_args(base_path, count_data, proj, epochs=1, steps=2, ctx=16)) == 0
    return proj


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a model is loaded: every bad input must be reported first."""
    import rwkv_disha.model.load as load_mod

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(load_mod, "load_model", refuse)
