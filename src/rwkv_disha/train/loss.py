"""The training loss: the LM head and the cross-entropy together, a chunk of tokens at a time.

Full fp32 logits are 256 KiB per token at V = 65536 (plus as much again for the softmax and its
gradient): more than all of a 0.1B model's other activations, and ~10 % of a CPU step spent streaming
them through memory. :func:`head_cross_entropy` never holds more than ``chunk`` rows of logits. Its
forward pass already computes the gradients (softmax - one-hot is known as soon as the chunk's logits
are), so nothing is recomputed: the FLOPs are those of the plain head + CE, and backward only scales
the stored gradients by the incoming one.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from rwkv_disha.data.dataset import counted_rows, masked_lm_loss

Tensor = torch.Tensor

# elements of one chunk of logits: 2**24 fp32 = 64 MiB (256 rows at V = 65536) on a CPU. Each chunk
# streams the whole (V, C) head through the matmuls twice, so small chunks cost time: measured against
# the plain loss (benchmarks/bench_loss.py, T=512, 2 cores): 128 rows 1.20x, 256 rows 1.04x, 512 rows 0.89x
# the time. A GPU wants bigger matmuls, but its memory target is tight (issue 10: VRAM <= 0.8x the
# tutorial's table at ctx 1024, micro_bsz 1, where a 3B run's estimate comes to ~0.83x with 1024-row
# chunks): 512 rows (2**25 elements, 192 MiB with the bf16 copy), still a 512 x C x 65536 product per matmul.
_CHUNK_ELEMENTS = {"cpu": 2**24, "cuda": 2**25}


def chunk_rows(vocab: int, device: torch.device) -> int:
    """Rows of logits one chunk of the head + CE holds (2**24 elements on a CPU, 2**25 on a GPU)."""
    return max(1, _CHUNK_ELEMENTS.get(device.type, 2**25) // vocab)


def loss_workspace_bytes(n_rows: int, vocab: int, device: torch.device, low_precision: bool) -> int:
    """Bytes the chunked head + CE holds at once for ``n_rows`` counted tokens: one chunk of fp32 logits
    (reused in place for the softmax and its gradient), plus, under bf16 / fp16 autocast, one chunk in that
    dtype (the matmul's output, then the gradient it feeds back). The dry run's logits term."""
    rows = min(n_rows, chunk_rows(vocab, device))
    return rows * vocab * (4 + (2 if low_precision else 0))


class _HeadCE(torch.autograd.Function):
    """sum over rows of m * CE(x @ W^T, label) / sum(m), with its gradients computed in forward."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, labels: Tensor, m: Tensor, rows: int) -> Tensor:
        # x (N, C), weight (V, C), labels (N,) int64, m (N,) > 0 -> loss (); reductions in m's dtype
        acc = m.dtype  # fp32 (fp64 when x is fp64)
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        denom = m.sum().clamp(min=1.0)
        scale = m / denom  # each row's share of the mean
        total = torch.zeros((), dtype=acc, device=x.device)
        dx = torch.empty_like(x) if need_dx else None
        dw = torch.zeros(weight.shape, dtype=acc, device=x.device) if need_dw else None
        # One set of chunk buffers serves every chunk, and every op works in place: a fresh (rows, V)
        # tensor per op is page-faulted in from the OS each time on a CPU (glibc maps blocks over 32 MiB
        # straight from the kernel), which cost as much as the head's matmuls.
        n, V = min(rows, x.shape[0]), weight.shape[0]
        out = x.new_empty(n, V)  # the matmul's logits, then the logits' gradient, in x's dtype
        work = out if out.dtype == acc else torch.empty(n, V, dtype=acc, device=x.device)
        for s in range(0, x.shape[0], rows):
            xc, lab, mc, sc = x[s : s + rows], labels[s : s + rows], m[s : s + rows], scale[s : s + rows]
            k, idx = xc.shape[0], lab.unsqueeze(1)
            o, z = out[:k], work[:k]
            torch.matmul(xc, weight.t(), out=o)
            if z is not o:
                z.copy_(o)
            z.sub_(z.amax(dim=-1, keepdim=True))  # logits - max (k, V), fp32
            z_label = z.gather(1, idx)
            total_exp = z.exp_().sum(dim=-1, keepdim=True)  # z now holds exp(logits - max)
            total -= ((z_label - total_exp.log()).squeeze(1) * mc).sum()  # log-softmax at the labels
            if need_dx or need_dw:
                # d(loss)/d(logits) = (softmax - one_hot) * m / sum(m) = (z - one_hot * sum z) * scale / sum z
                z.scatter_add_(1, idx, -total_exp)
                z.mul_(sc.unsqueeze(1) / total_exp)
                if o is not z:  # (a mixed-dtype torch.mul(..., out=o) runs 4x slower than these two)
                    o.copy_(z)
                if need_dx:
                    torch.matmul(o, weight, out=dx[s : s + k])
                if need_dw:
                    dw += (o.t() @ xc).to(acc)
        ctx.save_for_backward(dx, dw)
        ctx.weight_dtype = weight.dtype
        return total / denom

    @staticmethod
    def backward(ctx, g: Tensor):
        dx, dw = ctx.saved_tensors
        gx = None if dx is None else dx * g.to(dx.dtype)
        gw = None if dw is None else (dw * g).to(ctx.weight_dtype)
        return gx, gw, None, None, None


def head_cross_entropy(
    x: Tensor, weight: Tensor, labels: Tensor, mask: Tensor, rows: int | None = None
) -> Tensor:
    """The same value and gradients as ``masked_lm_loss(x @ weight.T, labels, mask)``, chunked.

    x (B, T, C) hidden states (the head's input), weight (V, C) the head, labels (B, T), mask (B, T)
    (> 0: counted, with that weight) -> scalar fp32 loss. Under autocast the matmuls run in the autocast
    dtype, like an ``nn.Linear`` head would; logits are always reduced in fp32. Masked rows are dropped
    before the head (zero gradient even if their hidden state is not finite)."""
    flat, lab, m = counted_rows(x, labels, mask)
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
    else:
        dt = torch.promote_types(x.dtype, weight.dtype)
    rows = rows or chunk_rows(weight.shape[0], x.device)
    with torch.autocast(dev, enabled=False):
        acc = torch.promote_types(dt, torch.float32)
        return _HeadCE.apply(flat.to(dt), weight.to(dt), lab.long(), m.to(acc), rows)


def lm_loss(model: nn.Module, idx: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Training loss of ``model`` on one batch: idx, labels, mask (B, T) -> scalar.

    A model with ``hidden(idx)`` (the head's input) and a plain bias-free Linear ``head`` gets the
    chunked head + CE; any other model the plain logits + :func:`masked_lm_loss`."""
    head = getattr(model, "head", None)
    if hasattr(model, "hidden") and type(head) is nn.Linear and head.bias is None:
        x, _ = model.hidden(idx)
        return head_cross_entropy(x, head.weight, labels, mask)
    return masked_lm_loss(model(idx), labels, mask)
