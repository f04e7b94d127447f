"""Our RWKV-7 forward against BlinkDL's `rwkv` package, the engine of RWKV Runner (docs/MODEL.md)."""

import pytest
import torch

from rwkv_disha import load_model


@pytest.mark.parametrize(
    "n_layer,n_embd,vocab",
    [(2, 128, 1000), (3, 192, 777)],  # 777: a non-round vocabulary
)
def test_logits_match_rwkv_package(make_checkpoint, rwkv_oracle, n_layer, n_embd, vocab):
    path = make_checkpoint(n_layer, n_embd, vocab, seed=n_layer)
    tokens = torch.randint(0, vocab, (96,), generator=torch.Generator().manual_seed(1))
    model = load_model(path).eval()
    with torch.no_grad():
        ours = model(tokens[None])[0]
    ref = rwkv_oracle(path, tokens.tolist())
    assert ours.shape == (96, vocab)
    assert ref.std() > 0.1  # a degenerate model would make the comparison meaningless
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_bf16_checkpoint_loads_and_runs(make_checkpoint):
    path32 = make_checkpoint(2, 128, 1000)
    path16 = make_checkpoint(2, 128, 1000, dtype=torch.bfloat16)
    m16 = load_model(path16)
    assert m16.emb.weight.dtype == torch.bfloat16
    tokens = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out16 = m16(tokens)
        out32 = load_model(path32)(tokens)
    assert out16.dtype == torch.bfloat16 and out16.shape == (2, 40, 1000)
    assert torch.isfinite(out16.float()).all()
    # bf16 weights are a rounded copy of the fp32 ones: logits agree to bf16 accuracy, not bit for bit
    err = (out16.float() - out32).abs().max() / out32.abs().max()
    assert err < 0.05


def test_bf16_model_upcasts_on_load(make_checkpoint):
    m = load_model(make_checkpoint(2, 128, 1000, dtype=torch.bfloat16), dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in m.parameters())
