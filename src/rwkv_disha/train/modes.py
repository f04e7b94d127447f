"""How a training sample goes through the model (``--train_type``; docs/TRAINING.md, "Long documents").

    none     the whole ctx_len sample in one forward; activations of all T tokens live until backward
    infctx   chunks of --chunk_ctx tokens; each chunk starts from the recurrent state (WKV + token shift)
             the previous one ended with, gradients flow back through those states, and each chunk is
             checkpointed (its activations are recomputed in backward), so memory grows with chunk_ctx

Both give the same loss and the same gradients (tests/train/test_infctx.py checks it in fp64): the loss is
the masked token-mean cross-entropy over the whole sample, whatever the chunking.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

from rwkv_disha.data.dataset import masked_ce_sum, trim_padding
from rwkv_disha.errors import RWKVDishaError
from rwkv_disha.train.loss import lm_loss

Tensor = torch.Tensor


def full_length_loss(model, idx: Tensor, labels: Tensor, mask: Tensor, chunk_ctx: int) -> Tensor:
    """idx, labels, mask (B, T) -> the masked mean loss of one forward over all T tokens (the head and
    the cross-entropy a chunk of tokens at a time: rwkv_disha.train.loss)."""
    return lm_loss(model, idx, labels, mask)


def _chunk(model, idx: Tensor, labels: Tensor, mask: Tensor, state):
    """One chunk from ``state`` -> (masked CE sum of its tokens, the state it ends with)."""
    logits, new_state = model(idx, state=state, return_state=True)
    return masked_ce_sum(logits, labels, mask), new_state


def infctx_loss(model, idx: Tensor, labels: Tensor, mask: Tensor, chunk_ctx: int) -> Tensor:
    """idx, labels, mask (B, T) -> the same loss as :func:`full_length_loss`, in chunks of ``chunk_ctx``.

    Only each chunk's inputs (token ids and the small recurrent state: per block (B, C), (B, H, N, N),
    (B, C)) are kept between forward and backward; a chunk's activations and logits are rebuilt when its
    gradient is needed. A chunk whose tokens are all masked adds zero but still passes its state on."""
    T = idx.shape[1]
    weight = mask.sum().clamp(min=1.0)  # the token count of the whole sample, as in masked_lm_loss
    total, state = None, None
    for start in range(0, T, chunk_ctx):
        part = slice(start, start + chunk_ctx)
        if torch.is_grad_enabled():
            ce, state = checkpoint(
                _chunk, model, idx[:, part], labels[:, part], mask[:, part], state, use_reentrant=False
            )
        else:
            ce, state = _chunk(model, idx[:, part], labels[:, part], mask[:, part], state)
        total = ce if total is None else total + ce
    return total / weight.to(total.dtype)


# --train_type -> loss function (model, idx, labels, mask, chunk_ctx) -> scalar; choices.TRAIN_TYPES
TRAIN_TYPES: dict[str, Callable[..., Tensor]] = {"none": full_length_loss, "infctx": infctx_loss}


def sample_loss(
    train_type: str, model, batch: dict[str, Tensor], chunk_ctx: int, trim: bool = True
) -> Tensor:
    """The training loss of ``batch`` (input_ids, labels, mask: (B, T)) under ``--train_type``; ``trim``:
    first cut the batch after its last counted position (:func:`trim_padding`; off for --compile, whose
    graphs want one shape)."""
    fn = TRAIN_TYPES.get(train_type)
    if fn is None:
        raise RWKVDishaError(f"unknown --train_type {train_type!r}: use {', '.join(TRAIN_TYPES)}")
    if trim:
        batch = trim_padding(batch)
    return fn(model, batch["input_ids"], batch["labels"], batch["mask"], chunk_ctx)


def check_state_gradients(op: str, device: torch.device) -> None:
    """Refuse a WKV kernel that does not return correct gradients for the initial state (infctx and state
    tuning need them): a tiny random case against the chunked torch kernel, once per run, on ``device``.
    """
    from rwkv_disha.kernels import get_wkv7, resolve_op
    from rwkv_disha.kernels.wkv7 import wkv7_chunked

    kernel = get_wkv7(resolve_op(op))
    if kernel is wkv7_chunked:
        return
    g = torch.Generator().manual_seed(0)
    B, T, H, N = 1, 24, 1, 64
    r, k, v = (torch.randn(B, T, H, N, generator=g) for _ in range(3))
    log_w = -0.6 * torch.rand(B, T, H, N, generator=g)
    kk = torch.nn.functional.normalize(torch.randn(B, T, H, N, generator=g), dim=-1)
    xs = [t.to(device) for t in (r, log_w, k, v, -kk, kk * torch.rand(B, T, H, N, generator=g))]
    s0 = (0.3 * torch.randn(B, H, N, N, generator=g)).to(device)
    grads = []
    for fn in (wkv7_chunked, kernel):
        state = s0.clone().requires_grad_()
        y, final = fn(*xs, state=state)
        (y.sum() + final.sum()).backward()
        grads.append(state.grad)
    if grads[1] is None or not torch.allclose(grads[0], grads[1], rtol=1e-2, atol=1e-2):
        raise RWKVDishaError(
            f"the --op {op} WKV kernel here does not return the initial state's gradient (needed by "
            f"--train_type infctx and state tuning): use --op torch, or update flash-linear-attention"
        )
