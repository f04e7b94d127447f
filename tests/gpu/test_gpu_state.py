"""GPU checks of state tuning and infctx (skipped without CUDA): fla's initial-state gradient against the
chunked torch kernel, the startup guard, and infctx == full-length training on CUDA."""

import importlib.util

import pytest
import torch

from rwkv_disha.adapters import AdapterConfig, inject_adapters, mark_trainable
from rwkv_disha.kernels.wkv7 import wkv7_chunked
from rwkv_disha.model.init import init_state_dict
from rwkv_disha.model.load import infer_config, model_from_state_dict
from rwkv_disha.train.modes import check_state_gradients, full_length_loss, infctx_loss

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(importlib.util.find_spec("fla") is None, reason="flash-linear-attention missing"),
]


def test_fla_initial_and_carried_state_gradients_equal_torch():
    from rwkv_disha.kernels.fla import wkv7_fla

    g = torch.Generator().manual_seed(0)
    B, T, H, N = 2, 100, 2, 64
    r, k, v = (torch.randn(B, T, H, N, generator=g) for _ in range(3))
    log_w = -0.6 * torch.rand(B, T, H, N, generator=g)
    kk = torch.nn.functional.normalize(torch.randn(B, T, H, N, generator=g), dim=-1)
    xs = [t.cuda() for t in (r, log_w, k, v, -kk, kk * torch.rand(B, T, H, N, generator=g))]
    s0 = (0.3 * torch.randn(B, H, N, N, generator=g)).cuda()
    out = []
    for fn in (wkv7_chunked, wkv7_fla):
        state = s0.clone().requires_grad_()
        y, final = fn(*xs, state=state)
        (y.square().sum() + (final * torch.cos(final.detach())).sum()).backward()  # both outputs feed back
        out.append((y.detach(), final.detach(), state.grad))
    for a, b in zip(*out):
        torch.testing.assert_close(b, a, rtol=2e-3, atol=2e-3)
    check_state_gradients("fla", torch.device("cuda"))


def test_infctx_equals_full_length_on_cuda_with_fla():
    sd = init_state_dict(2, 128, 97, 64, seed=0, style="random")
    model = model_from_state_dict(sd, infer_config(sd), op="fla")
    cfg = AdapterConfig.from_cli("disha", '{"mode":"bone","r":32}', train_state=True)
    inject_adapters(model, cfg)
    names = mark_trainable(model, cfg)
    model.cuda().train()
    with torch.no_grad():
        for n in names:
            model.get_parameter(n).normal_(0, 0.05)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 97, (2, 256), generator=g).cuda()
    labels = torch.randint(0, 97, (2, 256), generator=g).cuda()
    mask = torch.ones(2, 256, device="cuda")
    mask[1, 64:192] = 0
    results = []
    for fn in (full_length_loss, infctx_loss):
        model.zero_grad()
        loss = fn(model, idx, labels, mask, 64)
        loss.backward()
        results.append((loss.detach(), {n: model.get_parameter(n).grad.clone() for n in names}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-5)
    for n in names:
        torch.testing.assert_close(results[1][1][n], results[0][1][n], rtol=2e-3, atol=1e-5, msg=n)
