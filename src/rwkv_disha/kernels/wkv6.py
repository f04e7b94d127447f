"""WKV-6 state recurrence (RWKV-6, and RWKV-5.2 with a decay constant in time): a per-step reference
loop and a chunked pure-PyTorch form.

Shapes: r, w, k, v are (B, T, H, N); ``w`` is the LOG-decay per key channel (``-exp(time_decay + ...)``,
any value <= 0: RWKV-6's decays are not bounded away from 0 as RWKV-7's are); ``u`` (``time_faaaa``) is
the per-channel bonus (H, N) of the current token. The state S is (B, H, N, N) laid out (value, key),
like RWKV-7's (docs/MODEL.md, "WKV kernels"):

    y_t = (S_{t-1} + v_t (u * k_t)^T) r_t,        S_t = S_{t-1} diag(exp(w_t)) + v_t k_t^T

Both functions return (y (B, T, H, N), S_T) and compute in fp32 (fp64 if given fp64) whatever the
autocast state, casting y back to r's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rwkv_disha.kernels.wkv7 import _compute_dtype, _init_state

Tensor = torch.Tensor


def wkv6_loop(r, w, k, v, u, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Reference: one step at a time, exactly the recurrence above. Slow; ground truth for tests."""
    out_dtype = r.dtype
    dt = _compute_dtype(r)
    with torch.autocast(device_type=r.device.type, enabled=False):
        r, w, k, v, u = (t.to(dt) for t in (r, w, k, v, u))
        S = _init_state(r, state, dt)
        decay = torch.exp(w)
        ys = []
        for t in range(r.shape[1]):
            kv = v[:, t, :, :, None] * k[:, t, :, None, :]  # (B, H, N, N) = v k^T
            ys.append(torch.einsum("bhvk,bhk->bhv", S + kv * u[:, None, :], r[:, t]))
            S = S * decay[:, t, :, None, :] + kv
        y = torch.stack(ys, dim=1) if ys else r.new_zeros(r.shape)
    return y.to(out_dtype), S


def _inner_exact(r: Tensor, k: Tensor, w: Tensor, sub: int) -> Tensor:
    """A_tj = sum_n r_tn k_jn exp(sum_{j<m<t} w_mn) for j < t, else 0, at any decay: (M, L, N) -> (M, L, L).

    Two levels: pairs inside one sub-block of ``sub`` steps per channel (an (s, s, N) tensor); pairs
    across sub-blocks i > j as a matrix product after splitting the exponent at g_i, the cumulative
    log-decay before block i's first step: exp(p_t - g_i) * exp(g_i - c_j), both factors <= 1.
    Masks are applied BEFORE exp (the exponents of j >= t are > 0 and may overflow). The exponents are
    differences of cumulative sums; one huge step (w = -8000) would leave ~1e-3 relative error in fp32,
    so they are formed in fp64 (exact from fp32 inputs) and only then cast.
    """
    dt, L = r.dtype, r.shape[-2]
    s = sub if L % sub == 0 else L
    nb = L // s
    c = torch.cumsum(w.to(torch.float64), dim=-2)  # (M, L, N), inclusive
    p = c - w.to(torch.float64)  # exclusive

    def ex(x: Tensor) -> Tensor:
        return torch.exp(x.to(dt))

    blk = lambda t: t.unflatten(-2, (nb, s))  # noqa: E731  (M, L, N) -> (M, nb, s, N)
    rb, kb, cb, pb = blk(r), blk(k), blk(c), blk(p)
    strict = torch.ones(s, s, dtype=torch.bool, device=r.device).tril(-1)[:, :, None]
    gap = (pb[..., :, None, :] - cb[..., None, :, :]).masked_fill(~strict, float("-inf"))
    a_in = (rb[..., :, None, :] * kb[..., None, :, :] * ex(gap)).sum(-1)  # (M, nb, s, s)
    g = pb[..., :1, :]  # (M, nb, 1, N)
    lower = torch.ones(nb, nb, dtype=torch.bool, device=r.device).tril(-1)[:, :, None, None]
    gap_ij = (g[..., :, None, :, :] - cb[..., None, :, :, :]).masked_fill(~lower, float("-inf"))
    k_ij = kb[..., None, :, :, :] * ex(gap_ij)  # (M, nb_i, nb_j, s, N)
    a_ij = (rb * ex(pb - g))[..., :, None, :, :] @ k_ij.transpose(-1, -2)  # (M, nb, nb, s, s)
    eye = torch.eye(nb, dtype=dt, device=r.device)[:, :, None, None]
    att = a_ij + eye * a_in[..., :, None, :, :]
    return att.transpose(-3, -2).reshape(-1, L, L)


def wkv6_chunked(
    r, w, k, v, u, state: Tensor | None = None, chunk: int = 32, sub: int = 4, limit: float | None = None
) -> tuple[Tensor, Tensor]:
    """Chunked form (gated linear attention with a bonus); same result as :func:`wkv6_loop`.

    Chunks of L steps carry the state: with S0 the state at a chunk's start, c_t = sum_{j<=t} w_j and
    p_t = c_{t-1} (cumulative log-decay inside the chunk, inclusive / exclusive of step t),
        y_t = S0 (r_t * exp(p_t)) + sum_{j<t} A_tj v_j + (r_t . (u * k_t)) v_t,
        A_tj = sum_n r_t,n k_j,n exp(p_t,n - c_j,n),
        S_L = S0 diag(exp(c_L)) + sum_j v_j (k_j * exp(c_L - c_j))^T.
    Every exponent of the state terms is a sum of log-decays over an interval, formed directly by a
    cumulative sum (never as a difference of two), so it is accurate whatever the decay. A is summed
    over channels: those whose decay over the chunk stays within exp(-limit) (60 in fp32, 600 in fp64:
    no overflow, ~limit * eps relative error) by one matrix product (r exp(p)) (k exp(-c))^T; the
    others (RWKV-6 allows per-step decays near 0) are gathered per chunk and go through
    :func:`_inner_exact`, which never overflows. The rest is batched matrix products and a short loop
    over chunks for the state.
    """
    out_dtype = r.dtype
    dt = _compute_dtype(r)
    B_, T, H, N = r.shape
    with torch.autocast(device_type=r.device.type, enabled=False):
        S = _init_state(r, state, dt)
        if T == 0:
            return r.new_zeros(r.shape), S
        L = min(chunk, T)
        pad = (-T) % L
        limit = limit if limit is not None else (600.0 if dt == torch.float64 else 60.0)

        # (B, T, H, N) -> (B, H, NC, L, N); zero padding is exact: w = 0 is decay 1, and k = v = r = 0.
        def prep(t: Tensor) -> Tensor:
            t = t.to(dt)
            if pad:
                t = F.pad(t, (0, 0, 0, 0, 0, pad))
            return t.view(B_, (T + pad) // L, L, H, N).permute(0, 3, 1, 2, 4).contiguous()

        r, w, k, v = (prep(t) for t in (r, w, k, v))
        u = u.to(dt)
        c = torch.cumsum(w, dim=-2)  # (B, H, NC, L, N), inclusive
        p = F.pad(c[..., :-1, :], (0, 0, 1, 0))  # exclusive: c_{t-1}, 0 at the chunk's start
        # sum_{m>j} w_m: a cumulative sum from the chunk's end, shifted (subtracting w_j would cancel)
        from_end = torch.cumsum(torch.flip(w, (-2,)), dim=-2)
        after = torch.flip(F.pad(from_end[..., :-1, :], (0, 0, 1, 0)), (-2,))
        total = c[..., -1:, :]  # (B, H, NC, 1, N): log-decay over the whole chunk

        # A by one matrix product over the channels whose decay over the chunk stays within exp(-limit)
        # (exponents clamped so the others stay finite: their share is zeroed, and a NaN would leak into
        # the gradient); the other channels, gathered per chunk, go through the exact two-level form.
        strong = total < -limit  # (B, H, NC, 1, N)
        strict = torch.ones(L, L, dtype=torch.bool, device=r.device).tril(-1)
        q_f = (r * torch.exp(p.clamp(min=-limit))).masked_fill(strong, 0.0)
        k_f = k * torch.exp(-c.clamp(min=-limit))
        att = (q_f @ k_f.transpose(-1, -2)).masked_fill(~strict, 0.0)  # (B, H, NC, L, L)
        n_strong = int(strong.sum(-1).max())
        if n_strong:
            # per chunk, its strong channels first (stable order), n_strong of them (zeros past its own count)
            order = torch.sort(strong.to(torch.int8), dim=-1, descending=True, stable=True).indices
            order = order[..., :n_strong]  # (B, H, NC, 1, K)
            keep = torch.gather(strong, -1, order)  # (B, H, NC, 1, K)
            pick = lambda t: torch.gather(t, -1, order.expand(*t.shape[:-1], n_strong)).flatten(0, 2)  # noqa: E731
            r_s = pick(r).masked_fill(~keep.flatten(0, 2), 0.0)  # padding channels contribute nothing
            exact = _inner_exact(r_s, pick(k), pick(w), sub)  # (B * H * NC, L, L)
            att = att + exact.view_as(att)

        bonus = (r * u[None, :, None, None, :] * k).sum(-1, keepdim=True)  # (B, H, NC, L, 1)
        y = att @ v + bonus * v
        v_kbar = v.transpose(-1, -2) @ (k * torch.exp(after))  # (B, H, NC, N, N): the chunk's own state
        decay_last = torch.exp(total).squeeze(-2)  # (B, H, NC, N)
        s0s = []
        # unbind (not indexing) so backward stacks the per-chunk gradients in one op
        for d_i, vk_i in zip(decay_last.unbind(2), v_kbar.unbind(2)):
            s0s.append(S)
            S = S * d_i[:, :, None, :] + vk_i
        s0 = torch.stack(s0s, dim=2)  # (B, H, NC, N, N)
        y = y + (r * torch.exp(p)) @ s0.transpose(-1, -2)  # the start state, read through r_t * exp(p_t)
        y = y.permute(0, 2, 3, 1, 4).reshape(B_, T + pad, H, N)[:, :T]
    return y.to(out_dtype), S
