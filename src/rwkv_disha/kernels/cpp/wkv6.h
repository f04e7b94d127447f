// RWKV-6's WKV on the CPU (`--op cpp`; RWKV-5.2 too, whose decay is constant in time), per (batch, head):
// the same scheme as wkv7.h.
//
// Math (docs/MODEL.md; per head, state S is N x N laid out (value i, key j), u the bonus (N)):
//     y_i = sum_j (S_{t-1}[i,j] + v_i k_j u_j) r_j = sum_j S_{t-1}[i,j] r_j + v_i (k . u . r)
//     S_t = S_{t-1} diag(d_t) + v_t k_t^T,   d = exp(w) (w the log-decay; the caller passes d)
// Backward, walking t = T-1 .. 0 with dS = dL/dS_t, and dyv = dy . v:
//     dr_j = sum_i dy_i S_{t-1}[i,j] + dyv k_j u_j      dk_j = sum_i dS[i,j] v_i + dyv u_j r_j
//     dv_i = sum_j dS[i,j] k_j + dy_i (k . u . r)        du_j += dyv k_j r_j
//     dd_j = sum_i dS[i,j] S_{t-1}[i,j]  (dw_j = dd_j d_j)     dS_{t-1} = dS diag(d) + dy r^T
#pragma once

#include <array>
#include <cstdint>

#include "common.h"

namespace rwkv_disha {

struct Step6 {  // pointers to one (batch, head)'s vectors at step t: index t * stride; u is per head
  const float *r, *d, *k, *v, *u;
  int64_t stride;
};

// One (batch, head) forward: St (key j, value i: columns of S contiguous over i) walks T steps; y
// written; for a backward, the state at the start of every CHUNK steps, by rows, into starts.
template <int64_t NC>
void head_forward6(float* __restrict__ St, const Step6& x, int64_t T, int64_t n, float* __restrict__ y,
                   float* __restrict__ starts) {
  const int64_t N = NC > 0 ? NC : n;
  const float* __restrict__ u = x.u;
  for (int64_t t = 0; t < T; t++) {
    if (starts != nullptr && t % CHUNK == 0) transpose<NC>(St, starts + (t / CHUNK) * N * N, N);
    const int64_t o = t * x.stride;
    const float *__restrict__ r = x.r + o, *__restrict__ d = x.d + o, *__restrict__ k = x.k + o;
    const float* __restrict__ v = x.v + o;
    float kur = 0.f;
    for (int64_t j = 0; j < N; j++) kur += k[j] * u[j] * r[j];
    for (int64_t ib = 0; ib < N; ib += W) {
      const int64_t w = block<NC>(ib, N);
      alignas(64) float y_b[W] = {}, v_b[W] = {};
      for (int64_t ii = 0; ii < w; ii++) v_b[ii] = v[ib + ii];
      for (int64_t j = 0; j < N; j++) {  // y += S_{t-1} r, then S = S diag(d) + v k^T
        float* __restrict__ col = St + j * N + ib;
        const float rj = r[j], dj = d[j], kj = k[j];
#pragma omp simd
        for (int64_t ii = 0; ii < w; ii++) {
          y_b[ii] += col[ii] * rj;
          col[ii] = col[ii] * dj + v_b[ii] * kj;
        }
      }
      for (int64_t ii = 0; ii < w; ii++) y[o + ib + ii] = y_b[ii] + v_b[ii] * kur;
    }
  }
}

// One (batch, head) backward: dSr = dS by rows (dL/dS_T in, dL/dS_0 out), dSc by columns; the chunk's
// states recomputed by rows into `states` ((CHUNK + 1) x N x N); g = dr, dw, dk, dv (same offsets as x);
// du (N) receives this (batch, head)'s share of u's gradient.
template <int64_t NC>
void head_backward6(float* __restrict__ dSr, const Step6& x, const float* dy, const std::array<float*, 4>& g,
                    float* __restrict__ du, const float* starts, int64_t T, int64_t n, float* states, float* dSc) {
  const int64_t N = NC > 0 ? NC : n;
  const float* __restrict__ u = x.u;
  for (int64_t j = 0; j < N; j++) du[j] = 0.f;
  transpose<NC>(dSr, dSc, N);
  for (int64_t c = (T + CHUNK - 1) / CHUNK - 1; c >= 0; c--) {
    const int64_t t0 = c * CHUNK, len = std::min(CHUNK, T - t0);
    recompute_rows<NC, false>(states, starts + c * N * N, len, N, [&](int64_t s) {
      const int64_t o = (t0 + s) * x.stride;
      return RowStep{x.d + o, x.k + o, x.v + o, nullptr, nullptr};
    });
    for (int64_t s = len - 1; s >= 0; s--) {
      const int64_t o = (t0 + s) * x.stride;
      const float* __restrict__ S_prev = states + s * N * N;
      const float *__restrict__ r = x.r + o, *__restrict__ d = x.d + o, *__restrict__ k = x.k + o;
      const float *__restrict__ v = x.v + o, *__restrict__ dy_t = dy + o;
      float kur = 0.f, dyv = 0.f;
      for (int64_t j = 0; j < N; j++) kur += k[j] * u[j] * r[j];
      for (int64_t i = 0; i < N; i++) dyv += dy_t[i] * v[i];
      // columns: dv = dS k (+ dy (k . u . r)); then dS_{t-1} = dS diag(d) + dy r^T
      for (int64_t ib = 0; ib < N; ib += W) {
        const int64_t w = block<NC>(ib, N);
        alignas(64) float dv_b[W] = {}, dy_b[W] = {};
        for (int64_t ii = 0; ii < w; ii++) dy_b[ii] = dy_t[ib + ii];
        for (int64_t j = 0; j < N; j++) {
          float* __restrict__ col = dSc + j * N + ib;
          const float kj = k[j], dj = d[j], rj = r[j];
#pragma omp simd
          for (int64_t ii = 0; ii < w; ii++) {
            dv_b[ii] += col[ii] * kj;
            col[ii] = col[ii] * dj + dy_b[ii] * rj;
          }
        }
        for (int64_t ii = 0; ii < w; ii++) g[3][o + ib + ii] = dv_b[ii] + dy_b[ii] * kur;
      }
      // rows: the sums over i, then the same dS_{t-1}
      for (int64_t jb = 0; jb < N; jb += W) {
        const int64_t w = block<NC>(jb, N);
        alignas(64) float dr_b[W] = {}, dk_b[W] = {}, dd_b[W] = {}, r_b[W] = {}, d_b[W] = {};
        for (int64_t jj = 0; jj < w; jj++) {
          r_b[jj] = r[jb + jj];
          d_b[jj] = d[jb + jj];
        }
        for (int64_t i = 0; i < N; i++) {
          float* __restrict__ row = dSr + i * N + jb;
          const float* __restrict__ prev_row = S_prev + i * N + jb;
          const float dyi = dy_t[i], vi = v[i];
#pragma omp simd
          for (int64_t jj = 0; jj < w; jj++) {
            dr_b[jj] += dyi * prev_row[jj];
            dk_b[jj] += row[jj] * vi;
            dd_b[jj] += row[jj] * prev_row[jj];
            row[jj] = row[jj] * d_b[jj] + dyi * r_b[jj];
          }
        }
        for (int64_t jj = 0; jj < w; jj++) {
          const int64_t j = jb + jj;
          g[0][o + j] = dr_b[jj] + dyv * k[j] * u[j];
          g[1][o + j] = dd_b[jj] * d_b[jj];  // dw = dd * d (w is the log-decay)
          g[2][o + j] = dk_b[jj] + dyv * u[j] * r_b[jj];
          du[j] += dyv * k[j] * r_b[jj];
        }
      }
    }
  }
}

}  // namespace rwkv_disha
