"""A kernel against its reference loop, for the kernel tests: every output and every gradient."""

import torch


def rel(got, want) -> float:
    """max |got - want| / max |want| (in fp64)."""
    return ((got.double() - want).abs().max() / want.abs().max().clamp(min=1e-30)).item()


def errors_against_the_loop(fn, loop, xs, state, dtype, names, use_y=True, use_state=True) -> dict:
    """``fn`` on ``dtype`` copies of ``xs`` (and of the start state, unless None) against autograd through
    ``loop`` in fp64 on the same rounded values; both backward from y . cos(y_ref) (if ``use_y``) plus the
    final state's sum (if ``use_state``) -> {"y", "state", "d" + each name, "dstate0": relative error}."""
    rounded = [x.to(dtype) for x in xs]
    leaves = [x.clone().requires_grad_() for x in rounded]
    s0 = None if state is None else state.clone().requires_grad_()
    y, s = fn(*leaves, state=s0)
    assert y.dtype == dtype and y.shape == xs[0].shape and s.dtype == torch.float32
    ref = [x.double().requires_grad_() for x in rounded]
    ref_s0 = None if state is None else state.double().requires_grad_()
    y_ref, s_ref = loop(*ref, state=ref_s0)
    weight = torch.cos(y_ref.detach())

    def loss(y, s):
        return (y.double() * weight).sum() * use_y + s.double().sum() * use_state

    loss(y, s).backward()
    loss(y_ref, s_ref).backward()
    errors = {"y": rel(y.detach(), y_ref.detach()), "state": rel(s.detach(), s_ref.detach())}
    pairs = list(zip(names, leaves, ref))
    if state is not None:
        pairs.append(("state0", s0, ref_s0))
    for name, got, want in pairs:
        assert got.grad.dtype == got.dtype
        errors["d" + name] = rel(got.grad, want.grad)
    return errors
