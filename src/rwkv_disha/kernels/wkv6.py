"""WKV-6 state recurrence (RWKV-6, and RWKV-5.2 with a decay constant in time): a per-step reference
loop and a chunked pure-PyTorch form.

Shapes: r, w, k, v are (B, T, H, N); ``w`` is the LOG-decay per key channel (``-exp(time_decay + ...)``,
any value <= 0: RWKV-6's decays are not bounded away from 0 as RWKV-7's are); ``u`` (``time_faaaa``) is
the per-channel bonus (H, N) of the current token. The state S is (B, H, N, N) laid out (value, key),
like RWKV-7's (docs/MODEL.md, "WKV-6 / WKV-5 kernels"):

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


def wkv6_chunked(
    r, w, k, v, u, state: Tensor | None = None, chunk: int = 32, sub: int = 8
) -> tuple[Tensor, Tensor]:
    """Chunked form (gated linear attention with a bonus, two levels); same result as :func:`wkv6_loop`.

    Chunks of L steps carry the state: with S0 the state at a chunk's start, c_t = sum_{j<=t} w_j and
    p_t = c_t - w_t (cumulative log-decay inside the chunk, inclusive / exclusive of step t),
        y_t = S0 (r_t * exp(p_t)) + sum_{j<t} A_tj v_j + (r_t . (u * k_t)) v_t,
        A_tj = sum_n r_t,n k_j,n exp(p_t,n - c_j,n),
        S_L = S0 diag(exp(c_L)) + sum_j v_j (k_j * exp(c_L - c_j))^T.
    A is built in sub-blocks of ``sub`` steps: pairs inside one sub-block per channel (an (s, s, N)
    tensor), pairs across sub-blocks i > j as a matrix product after splitting the exponent at g_i,
    the p of block i's first step: exp(p_t - g_i) * exp(g_i - c_j). Every exponent is <= 0, so nothing
    overflows however strong the decay (RWKV-6 allows per-step decays near 0, where the one-level split
    exp(p_t) exp(-c_j) overflows fp32). The exponents are differences of cumulative sums, which lose
    digits in fp32 when one step's decay is huge (w = -8000: ~1e-3 relative error), so they are formed
    in fp64 and only then cast. Measured: fp32 within 2e-6 of an fp64 loop at w down to -e^9.
    """
    out_dtype = r.dtype
    dt = _compute_dtype(r)
    B_, T, H, N = r.shape
    with torch.autocast(device_type=r.device.type, enabled=False):
        S = _init_state(r, state, dt)
        if T == 0:
            return r.new_zeros(r.shape), S
        L = min(chunk, T)
        s = min(sub, L) if L % min(sub, L) == 0 else L
        nb = L // s
        pad = (-T) % L

        # (B, T, H, N) -> (B, H, NC, L, N); zero padding is exact: w = 0 is decay 1, and k = v = r = 0.
        def prep(t: Tensor, dtype: torch.dtype = dt) -> Tensor:
            t = t.to(dtype)
            if pad:
                t = F.pad(t, (0, 0, 0, 0, 0, pad))
            return t.view(B_, (T + pad) // L, L, H, N).permute(0, 3, 1, 2, 4).contiguous()

        r, k, v = (prep(t) for t in (r, k, v))
        w64 = prep(w, torch.float64)
        u = u.to(dt)
        c = torch.cumsum(w64, dim=-2)  # (B, H, NC, L, N) fp64, inclusive
        p = c - w64  # exclusive
        c_last = c[..., -1:, :]  # (B, H, NC, 1, N): log-decay over the whole chunk

        def ex(x: Tensor) -> Tensor:  # exp of an fp64 exponent, in the compute dtype
            return torch.exp(x.to(dt))

        # A inside each sub-block, per channel; masked BEFORE exp (for j >= t the exponent is > 0)
        blk = lambda t: t.unflatten(-2, (nb, s))  # noqa: E731  (.., L, N) -> (.., nb, s, N)
        rb, kb, cb, pb = blk(r), blk(k), blk(c), blk(p)
        strict = torch.ones(s, s, dtype=torch.bool, device=r.device).tril(-1)[:, :, None]
        gap = (pb[..., :, None, :] - cb[..., None, :, :]).masked_fill(~strict, float("-inf"))
        a_in = (rb[..., :, None, :] * kb[..., None, :, :] * ex(gap)).sum(-1)  # (.., nb, s, s)
        # A across sub-blocks i > j, split at g_i: both factors <= 1
        g = pb[..., :1, :]  # (.., nb, 1, N)
        lower = torch.ones(nb, nb, dtype=torch.bool, device=r.device).tril(-1)[:, :, None, None]
        gap_ij = (g[..., :, None, :, :] - cb[..., None, :, :, :]).masked_fill(~lower, float("-inf"))
        k_ij = kb[..., None, :, :, :] * ex(gap_ij)  # (.., nb_i, nb_j, s, N)
        a_ij = (rb * ex(pb - g))[..., :, None, :, :] @ k_ij.transpose(-1, -2)  # (.., nb, nb, s, s)
        eye = torch.eye(nb, dtype=dt, device=r.device)[:, :, None, None]
        att = a_ij + eye * a_in[..., :, None, :, :]
        att = att.transpose(-3, -2).reshape(*att.shape[:-4], L, L)  # (B, H, NC, L, L)

        bonus = (r * u[None, :, None, None, :] * k).sum(-1, keepdim=True)  # (B, H, NC, L, 1)
        y = att @ v + bonus * v
        v_kbar = v.transpose(-1, -2) @ (k * ex(c_last - c))  # (B, H, NC, N, N): the chunk's own state
        decay_last = ex(c_last).squeeze(-2)  # (B, H, NC, N)
        s0s = []
        # unbind (not indexing) so backward stacks the per-chunk gradients in one op
        for d_i, vk_i in zip(decay_last.unbind(2), v_kbar.unbind(2)):
            s0s.append(S)
            S = S * d_i[:, :, None, :] + vk_i
        s0 = torch.stack(s0s, dim=2)  # (B, H, NC, N, N)
        y = y + (r * ex(p)) @ s0.transpose(-1, -2)  # the start state, read through r_t * exp(p_t)
        y = y.permute(0, 2, 3, 1, 4).reshape(B_, T + pad, H, N)[:, :T]
    return y.to(out_dtype), S
