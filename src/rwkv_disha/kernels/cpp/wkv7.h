// RWKV-7's WKV on the CPU (`--op cpp`), per (batch, head): a compiled loop over the steps, the state kept
// in a small buffer that stays in the core's cache. The chunked torch kernel spends most of its time in
// (32 x 32) matrix products and their dispatch; this walks the steps one by one.
//
// Math (docs/MODEL.md "Forward pass"; per head, state S is N x N laid out (value i, key j)):
//     sa_i = sum_j S_{t-1}[i,j] a_j,   S_t = S_{t-1} diag(d_t) + sa b_t^T + v_t k_t^T,   y_i = sum_j S_t[i,j] r_j
// with d = exp(w) (w the log-decay; the caller passes d). Backward, walking t = T-1 .. 0 with dS = dL/dS_t:
//     dS += dy r^T
//     dr_j = sum_i S_t[i,j] dy_i           dd_j = sum_i dS[i,j] S_{t-1}[i,j]    (dw_j = dd_j d_j)
//     dk_j = sum_i dS[i,j] v_i             db_j = sum_i dS[i,j] sa_i
//     dv_i = sum_j dS[i,j] k_j             dsa_i = sum_j dS[i,j] b_j            da_j = sum_i dsa_i S_{t-1}[i,j]
//     dS_{t-1} = dS diag(d) + dsa a^T
// The forward holds S transposed, (key j, value i) with i contiguous, so each step is passes over the
// columns of S with vectors along i, and no sum is reduced across a vector's lanes. The backward keeps
// dS both ways (head_backward).
// The forward saves S at the start of every CHUNK steps and sa at every step; the backward recomputes the
// chunk's states from there into a (CHUNK + 1) x N x N buffer and walks them back: exact (no division by
// the decay), for one state update per step.
//
// Layouts: inputs and their gradients (B, T, H, N) fp32 contiguous; states in and out (B, H, N, N) fp32
// (value, key); saved chunk starts (B, H, ceil(T / CHUNK), N, N) in the kernel's (key, value).
#pragma once

#include <array>
#include <cstdint>

#include "common.h"

namespace rwkv_disha {

struct Step {  // pointers to one (batch, head)'s vectors at step t: index t * stride
  const float *r, *d, *k, *v, *a, *b;  // d: the decay exp(w)
  int64_t stride;
};

// Step t: St (N x N, row j = key j, so column j of S is contiguous over the value index i)
// <- S diag(d) + sa b^T + v k^T; writes sa (N) and, if y is given, y_t (N). Every sum runs over j with
// vectors along i, so nothing is reduced across a vector's lanes.
// NC: the head size as a compile-time constant (64: every RWKV-7 release), or 0 for the runtime n.
template <int64_t NC>
inline void step_forward(float* __restrict__ St, const Step& x, int64_t t, int64_t n, float* __restrict__ sa,
                         float* __restrict__ y) {
  const int64_t N = NC > 0 ? NC : n;
  const int64_t o = t * x.stride;
  const float *__restrict__ r = x.r + o, *__restrict__ d = x.d + o, *__restrict__ k = x.k + o;
  const float *__restrict__ v = x.v + o, *__restrict__ a = x.a + o, *__restrict__ b = x.b + o;
  for (int64_t ib = 0; ib < N; ib += W) {  // values ib .. ib + w: rows of S, lanes here
    const int64_t w = block<NC>(ib, N);
    alignas(64) float sa_b[W] = {}, y_b[W] = {}, v_b[W] = {};
    for (int64_t ii = 0; ii < w; ii++) v_b[ii] = v[ib + ii];
    for (int64_t j = 0; j < N; j++) {  // sa = S a
      const float* __restrict__ col = St + j * N + ib;
      const float aj = a[j];
#pragma omp simd
      for (int64_t ii = 0; ii < w; ii++) sa_b[ii] += col[ii] * aj;
    }
    for (int64_t j = 0; j < N; j++) {  // S = S diag(d) + sa b^T + v k^T;  y = S r
      float* __restrict__ col = St + j * N + ib;
      const float dj = d[j], bj = b[j], kj = k[j], rj = r[j];
#pragma omp simd
      for (int64_t ii = 0; ii < w; ii++) {
        col[ii] = col[ii] * dj + sa_b[ii] * bj + v_b[ii] * kj;
        y_b[ii] += col[ii] * rj;
      }
    }
    for (int64_t ii = 0; ii < w; ii++) sa[ib + ii] = sa_b[ii];
    if (y != nullptr)
      for (int64_t ii = 0; ii < w; ii++) y[o + ib + ii] = y_b[ii];
  }
}

// One (batch, head) forward: St walks T steps from its start value; y written. For a backward (starts
// given): the state at the start of every CHUNK steps, by rows (value, key), and sa of every step (same
// offsets as y).
template <int64_t NC>
void head_forward(float* St, const Step& x, int64_t T, int64_t n, float* y, float* starts, float* sa_out) {
  const int64_t N = NC > 0 ? NC : n;
  alignas(64) float sa[NC > 0 ? NC : MAX_N];
  for (int64_t t = 0; t < T; t++) {
    if (starts != nullptr && t % CHUNK == 0) transpose<NC>(St, starts + (t / CHUNK) * N * N, N);
    step_forward<NC>(St, x, t, N, starts != nullptr ? sa_out + t * x.stride : sa, y);
  }
}

// One (batch, head) backward. dS is held both ways, rows (dSr[i][j] = dS[i,j], starting as dL/dS_T and
// ending as dL/dS_0) and columns (dSc[j][i]), and the chunk's states are recomputed as rows
// (states[s][i][j]) from its saved start and the saved sa, so that every sum is a vector accumulation:
// over j for dv, dsa (from dSc), over i for dr, dd, dk, db, da (from dSr and the state rows); no sum is
// reduced across a vector's lanes. Buffers: states (CHUNK + 1) x N x N, dSc N x N; g the six gradient
// outputs and sa_in (same offsets as x).
template <int64_t NC>
void head_backward(float* __restrict__ dSr, const Step& x, const float* dy, const float* sa_in,
                   const std::array<float*, 6>& g, const float* starts, int64_t T, int64_t n, float* states,
                   float* dSc) {
  const int64_t N = NC > 0 ? NC : n;
  alignas(64) float dsa[NC > 0 ? NC : MAX_N];
  transpose<NC>(dSr, dSc, N);
  for (int64_t c = (T + CHUNK - 1) / CHUNK - 1; c >= 0; c--) {
    const int64_t t0 = c * CHUNK, len = std::min(CHUNK, T - t0);
    recompute_rows<NC, true>(states, starts + c * N * N, len, N, [&](int64_t s) {
      const int64_t o = (t0 + s) * x.stride;
      return RowStep{x.d + o, x.k + o, x.v + o, sa_in + o, x.b + o};
    });
    for (int64_t s = len - 1; s >= 0; s--) {
      const int64_t o = (t0 + s) * x.stride;
      const float *__restrict__ S_t = states + (s + 1) * N * N, *__restrict__ S_prev = states + s * N * N;
      const float *__restrict__ sa = sa_in + o, *__restrict__ dy_t = dy + o;
      const float *__restrict__ r = x.r + o, *__restrict__ d = x.d + o, *__restrict__ k = x.k + o;
      const float *__restrict__ v = x.v + o, *__restrict__ a = x.a + o, *__restrict__ b = x.b + o;
      // columns: dS += dy r^T; dv = dS k, dsa = dS b
      for (int64_t ib = 0; ib < N; ib += W) {
        const int64_t w = block<NC>(ib, N);
        alignas(64) float dv_b[W] = {}, dsa_b[W] = {}, dy_b[W] = {};
        for (int64_t ii = 0; ii < w; ii++) dy_b[ii] = dy_t[ib + ii];
        for (int64_t j = 0; j < N; j++) {
          float* __restrict__ col = dSc + j * N + ib;
          const float rj = r[j], kj = k[j], bj = b[j];
#pragma omp simd
          for (int64_t ii = 0; ii < w; ii++) {
            const float ds = col[ii] + dy_b[ii] * rj;
            col[ii] = ds;
            dv_b[ii] += ds * kj;
            dsa_b[ii] += ds * bj;
          }
        }
        for (int64_t ii = 0; ii < w; ii++) {
          dsa[ib + ii] = dsa_b[ii];
          g[3][o + ib + ii] = dv_b[ii];
        }
      }
      // rows: dS += dy r^T; the sums over i; then dS_{t-1} = dS diag(d) + dsa a^T
      for (int64_t jb = 0; jb < N; jb += W) {
        const int64_t w = block<NC>(jb, N);
        alignas(64) float dr_b[W] = {}, dd_b[W] = {}, dk_b[W] = {}, db_b[W] = {}, da_b[W] = {};
        alignas(64) float r_b[W] = {}, d_b[W] = {}, a_b[W] = {};
        for (int64_t jj = 0; jj < w; jj++) {
          r_b[jj] = r[jb + jj];
          d_b[jj] = d[jb + jj];
          a_b[jj] = a[jb + jj];
        }
        for (int64_t i = 0; i < N; i++) {
          float* __restrict__ row = dSr + i * N + jb;
          const float *__restrict__ st_row = S_t + i * N + jb, *__restrict__ prev_row = S_prev + i * N + jb;
          const float dyi = dy_t[i], vi = v[i], sai = sa[i], dsai = dsa[i];
#pragma omp simd
          for (int64_t jj = 0; jj < w; jj++) {
            const float ds = row[jj] + dyi * r_b[jj];
            dr_b[jj] += st_row[jj] * dyi;
            dd_b[jj] += ds * prev_row[jj];
            dk_b[jj] += ds * vi;
            db_b[jj] += ds * sai;
            da_b[jj] += prev_row[jj] * dsai;
            row[jj] = ds * d_b[jj] + dsai * a_b[jj];
          }
        }
        for (int64_t jj = 0; jj < w; jj++) {
          g[0][o + jb + jj] = dr_b[jj];
          g[1][o + jb + jj] = dd_b[jj] * d_b[jj];  // dw = dd * d (w is the log-decay)
          g[2][o + jb + jj] = dk_b[jj];
          g[4][o + jb + jj] = da_b[jj];
          g[5][o + jb + jj] = db_b[jj];
        }
      }
      for (int64_t j = 0; j < N; j++) {
        float* __restrict__ col = dSc + j * N;
        const float dj = d[j], aj = a[j];
#pragma omp simd
        for (int64_t i = 0; i < N; i++) col[i] = col[i] * dj + dsa[i] * aj;
      }
    }
  }
}

}  // namespace rwkv_disha
