"""--train_type infctx: chunked training with the recurrent state carried between chunks gives the loss and
every gradient of the plain full-length forward (fp64), never NaN on masked chunks, and trains every mode."""

import pytest
import torch

from rwkv_disha.adapters import AdapterConfig, inject_adapters, mark_trainable
from rwkv_disha.adapters.state import time_state_parameters
from rwkv_disha.cli import main
from rwkv_disha.model.init import init_state_dict
from rwkv_disha.model.load import infer_config, model_from_state_dict
from rwkv_disha.train.modes import full_length_loss, infctx_loss

L = 8  # chunk length; documents are 4 L tokens


def adapted_model(cfg: AdapterConfig, seed=0):
    """A random fp64 RWKV-7 (2 blocks, 2 heads) with ``cfg`` injected and its trained tensors random."""
    sd = init_state_dict(2, 128, 97, 64, seed=seed, style="random")
    model = model_from_state_dict(sd, infer_config(sd), op="torch")
    inject_adapters(model, cfg)
    names = mark_trainable(model, cfg)
    model.double()  # after injection: adapters and states are created in fp32
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in (model.get_parameter(n) for n in names):
            p.copy_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))  # zero start is trivially equal
    return model.train(), names


def grads(model, names, loss_fn, idx, labels, mask):
    model.zero_grad()
    loss = loss_fn(model, idx, labels, mask, L)
    loss.backward()
    return loss.detach(), {n: model.get_parameter(n).grad.clone() for n in names}


def batch(B=2, T=4 * L, vocab=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab, (B, T), generator=g)
    labels = torch.randint(0, vocab, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.2).double()
    mask[1, L : 3 * L] = 0  # row 1: chunks 2 and 3 fully masked, the state still flows through them
    return idx, labels, mask


CONFIGS = {
    "bone": lambda: AdapterConfig.from_cli("disha", '{"mode":"bone","r":32}'),
    "state": lambda: AdapterConfig.from_cli("state"),
}


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_infctx_loss_and_every_gradient_equal_the_full_forward(kind):
    model, names = adapted_model(CONFIGS[kind]())
    if kind == "state":
        assert set(time_state_parameters(model)) <= set(names)
    data = batch()
    loss_full, g_full = grads(model, names, full_length_loss, *data)
    loss_chunk, g_chunk = grads(model, names, infctx_loss, *data)
    torch.testing.assert_close(loss_chunk, loss_full, rtol=1e-12, atol=0)
    assert len(g_full) == len(names) and all(g.abs().max() > 0 for g in g_full.values())
    for n in names:
        torch.testing.assert_close(g_chunk[n], g_full[n], rtol=1e-9, atol=1e-12, msg=n)


def test_fully_masked_chunks_and_documents_give_no_nan():
    model, names = adapted_model(CONFIGS["state"]())
    idx, labels, mask = batch()
    mask[:, : 3 * L] = 0  # only the last chunk counts
    loss, g = grads(model, names, infctx_loss, idx, labels, mask)
    assert torch.isfinite(loss) and all(torch.isfinite(t).all() for t in g.values())
    assert any(t.abs().max() > 0 for t in g.values())  # the last chunk's loss reaches the start state
    loss, g = grads(model, names, infctx_loss, idx, labels, torch.zeros_like(mask))
    assert loss == 0 and all((t == 0).all() for t in g.values())


def test_infctx_without_grad_matches_too():
    model, _ = adapted_model(CONFIGS["bone"]())
    data = batch()
    with torch.no_grad():
        torch.testing.assert_close(
            infctx_loss(model, *data, L), full_length_loss(model, *data, L), rtol=1e-12, atol=0
        )


MODES = {
    "bone": [],
    "bat": ["--disha_config", '{"mode":"bat","load":"","r":16}'],
    "lora": [
        "--peft",
        "lora",
        "--lora_config",
        '{"lora_load":"","lora_r":4,"lora_alpha":8,"lora_dropout":0}',
    ],
    "state": ["--peft", "state"],
    "full": ["--peft", "none", "--grad_cp", "1"],  # grad_cp: block checkpoints inside chunk checkpoints
}


@pytest.mark.parametrize("mode", list(MODES))
def test_cli_infctx_trains_every_mode(mode, base_path, count_data, train_args, tmp_path):
    proj = tmp_path / "run"
    flags = [*MODES[mode], "--train_type", "infctx", "--chunk_ctx", "12"]
    argv = train_args(base_path, count_data, proj, *flags, epochs=1, steps=2, ctx=32)
    assert main(argv) == 0
    tensors = torch.load(proj / "rwkv-0.pth", weights_only=True)
    assert tensors and all(torch.isfinite(t).all() for t in tensors.values())


@pytest.mark.parametrize("train_type", ["none", "infctx"])
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_trimmed_padding_gives_the_same_loss_and_gradients(kind, train_type):
    """`--dataload pad` pads short documents to ctx_len; the step cuts the batch after its last counted
    position (to a multiple of 16): same loss and gradients (fp64), on fewer tokens."""
    from rwkv_disha.train.modes import sample_loss, trim_padding

    model, names = adapted_model(CONFIGS[kind]())
    idx, labels, mask = batch(T=64)
    mask[:, 21:] = 0  # every row padded after position 20: 64 -> 32 positions
    full = {"input_ids": idx, "labels": labels, "mask": mask}
    assert trim_padding(full)["input_ids"].shape == (2, 32)

    def run(trim):
        model.zero_grad()
        loss = sample_loss(train_type, model, full, L, trim=trim)
        loss.backward()
        return loss.detach(), {n: model.get_parameter(n).grad.clone() for n in names}

    (loss_t, g_t), (loss_f, g_f) = run(True), run(False)
    torch.testing.assert_close(loss_t, loss_f, rtol=1e-12, atol=0)
    for n in names:
        torch.testing.assert_close(g_t[n], g_f[n], rtol=1e-9, atol=1e-12, msg=n)


def test_trim_keeps_a_batch_that_counts_to_its_end_or_nowhere():
    from rwkv_disha.train.modes import trim_padding

    idx, labels, mask = batch(T=40)
    mask[:, 33:] = 0
    mask[0, 39] = 1  # one row counts at the last position: nothing to cut
    whole = {"input_ids": idx, "labels": labels, "mask": mask}
    assert trim_padding(whole) is whole
    none_counted = {**whole, "mask": torch.zeros_like(mask)}
    assert trim_padding(none_counted) is none_counted
    mask[0, 39] = 0  # last counted position 32 -> 33 positions, rounded up to 48 > 40: kept whole
    assert trim_padding(whole)["input_ids"].shape == (2, 40)


def test_chunk_ctx_without_infctx_is_said_once(base_path, count_data, train_args, tmp_path, capsys):
    """RWKV-PEFT's scripts pass --chunk_ctx without infctx too: it still runs, with a note, not silently."""
    argv = train_args(base_path, count_data, tmp_path / "run", "--chunk_ctx", "12", epochs=1, steps=1, ctx=16)
    assert main(argv) == 0
    note = "note: --chunk_ctx 12 is read with --train_type infctx only; this run trains on whole --ctx_len 16"
    assert capsys.readouterr().err.count(note) == 1
    argv = train_args(base_path, count_data, tmp_path / "run2", epochs=1, steps=1, ctx=16)
    assert main(argv) == 0 and "chunk_ctx" not in capsys.readouterr().err
