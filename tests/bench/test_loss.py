"""The chunked head + cross-entropy (rwkv_disha.train.loss) equals logits + masked_lm_loss: value and
gradients, with masks, weights, ragged last chunks, a trainable head and under CPU bf16 autocast."""

from __future__ import annotations

import pytest
import torch

from rwkv_disha.data.dataset import masked_lm_loss
from rwkv_disha.train.loss import head_cross_entropy, lm_loss


def _case(B=2, T=13, C=16, V=50, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, C, generator=g, dtype=dtype)
    w = torch.randn(V, C, generator=g, dtype=dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.3).to(dtype) * torch.rand(B, T, generator=g, dtype=dtype)
    return x, w, labels, mask


@pytest.mark.parametrize("rows", [1, 5, 7, 1000])
@pytest.mark.parametrize("train_head", [False, True])
def test_chunked_equals_plain_value_and_grads(rows, train_head):
    x, w, labels, mask = _case()
    out = []
    for chunked in (False, True):
        xi = x.clone().requires_grad_()
        wi = w.clone().requires_grad_(train_head)
        if chunked:
            loss = head_cross_entropy(xi, wi, labels, mask, rows=rows)
        else:
            loss = masked_lm_loss(xi @ wi.t(), labels, mask)
        (2.5 * loss).backward()  # a non-unit incoming gradient
        out.append((loss.detach(), xi.grad, wi.grad))
    (l0, gx0, gw0), (l1, gx1, gw1) = out
    torch.testing.assert_close(l1.double(), l0.double(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(gx1, gx0, rtol=1e-6, atol=1e-9)
    if train_head:
        torch.testing.assert_close(gw1, gw0, rtol=1e-6, atol=1e-9)
    else:
        assert gw1 is None


def test_all_masked_gives_zero_loss_and_grad_and_ignores_non_finite_rows():
    x, w, labels, mask = _case(dtype=torch.float32)
    x[0, 3] = float("nan")
    mask[0, 3] = 0
    xi = x.clone().requires_grad_()
    loss = head_cross_entropy(xi, w, labels, mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(xi.grad).all() and (xi.grad[0, 3] == 0).all()
    xi = x.clone().requires_grad_()
    loss = head_cross_entropy(xi, w, labels, torch.zeros_like(mask))
    loss.backward()
    assert loss.item() == 0 and (xi.grad == 0).all()


def test_bf16_autocast_matches_plain_linear_head():
    x, w, labels, mask = _case(T=40, C=32, V=300, dtype=torch.float32)
    head = torch.nn.Linear(32, 300, bias=False)
    head.weight.data.copy_(w)
    grads = []
    for chunked in (False, True):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if chunked:
                loss = head_cross_entropy(xi, head.weight, labels, mask, rows=16)
            else:
                loss = masked_lm_loss(head(xi), labels, mask)
        loss.backward()
        grads.append((loss.detach(), xi.grad))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=5e-2, atol=2e-3)


def test_lm_loss_uses_the_model_head_and_matches_logits(tiny_model):
    model = tiny_model
    idx = torch.randint(0, model.config.vocab_size, (2, 9))
    labels = torch.randint(0, model.config.vocab_size, (2, 9))
    mask = torch.ones(2, 9)
    plain = masked_lm_loss(model(idx), labels, mask)
    chunked = lm_loss(model, idx, labels, mask)
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-6)


def test_loss_workspace_is_one_chunk_of_rows():
    """The dry run's logits term: one chunk of fp32 rows (2**24 elements on a CPU), never B x T x V."""
    from rwkv_disha.train.loss import chunk_rows, loss_workspace_bytes

    cpu = torch.device("cpu")
    assert chunk_rows(65536, cpu) == 256
    assert loss_workspace_bytes(8 * 512, 65536, cpu, False) == 256 * 65536 * 4
    assert loss_workspace_bytes(100, 65536, cpu, False) == 100 * 65536 * 4  # fewer rows than a chunk
    assert loss_workspace_bytes(8 * 512, 65536, cpu, True) == 256 * 65536 * 6  # + a bf16 chunk
    assert chunk_rows(65536, torch.device("cuda")) == 512
