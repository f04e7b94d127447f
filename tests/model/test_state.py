"""Stateful forward, batching and activation checkpointing."""

import torch

from rwkv_disha import load_model


def test_two_pieces_with_state_equal_one_piece(tiny_model_path):
    model = load_model(tiny_model_path).eval()
    idx = torch.randint(0, 1000, (2, 70), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole, s_whole = model(idx, return_state=True)
        first, s = model(idx[:, :33], return_state=True)
        second, s2 = model(idx[:, 33:], state=s, return_state=True)
        # token by token, as generation does
        s_tok, steps = None, []
        for t in range(12):
            out, s_tok = model(idx[:, t : t + 1], state=s_tok, return_state=True)
            steps.append(out)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(steps, dim=1), whole[:, :12], atol=2e-5, rtol=1e-5)
    for a, b in zip(s2, s_whole):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-5)


def test_batch_rows_are_independent(tiny_model_path):
    model = load_model(tiny_model_path).eval()
    idx = torch.randint(0, 1000, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        batched = model(idx)
        single = torch.cat([model(idx[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_grad_cp_gives_same_gradients(tiny_model_path):
    idx = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(2))
    grads = []
    for cp in (False, True):
        model = load_model(tiny_model_path).train()
        model.grad_cp = cp
        model(idx).logsumexp(-1).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5)
    assert grads[0]["blocks.1.att.key.weight"].abs().sum() > 0


def test_loop_op_equals_torch_op(tiny_model_path):
    idx = torch.randint(0, 1000, (1, 50), generator=torch.Generator().manual_seed(3))
    model = load_model(tiny_model_path, op="torch").eval()
    with torch.no_grad():
        a = model(idx)
        model.set_op("loop")
        b = model(idx)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
