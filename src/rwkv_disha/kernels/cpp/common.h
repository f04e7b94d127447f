// What the CPU WKV kernels (wkv7.h, wkv6.h) share: chunk length, head-size limit, lane blocks, transpose.
#pragma once

#include <algorithm>
#include <cstdint>

namespace rwkv_disha {

// steps between the states a forward saves for the backward, which recomputes the steps in between
constexpr int64_t CHUNK = 16;

constexpr int64_t MAX_N = 256;

// Sums run in blocks of W lanes along the vector index, each block's accumulators held in registers for
// the whole loop over the other index (W = 16 floats: one AVX-512 register, two AVX2 ones).
constexpr int64_t W = 16;

// The width of the block at `base`: W as a constant when the compiled head size is a multiple of it.
template <int64_t NC>
inline int64_t block(int64_t base, int64_t N) {
  return (NC > 0 && NC % W == 0) ? W : std::min(W, N - base);
}

template <int64_t NC>
void transpose(const float* __restrict__ src, float* __restrict__ dst, int64_t n) {
  const int64_t N = NC > 0 ? NC : n;
  for (int64_t i = 0; i < N; i++)
    for (int64_t j = 0; j < N; j++) dst[j * N + i] = src[i * N + j];
}

// One step's vectors for recompute_rows: the decay d, k, v, and for RWKV-7's delta rule sa and b.
struct RowStep {
  const float *d, *k, *v, *sa, *b;
};

// A chunk's states by rows (value i, key j), recomputed from its saved start: states[s + 1] =
// states[s] diag(d) + v k^T (+ sa b^T if DELTA) for s < len, with step s's vectors from at(s).
template <int64_t NC, bool DELTA, typename At>
inline void recompute_rows(float* __restrict__ states, const float* start, int64_t len, int64_t n, At at) {
  const int64_t N = NC > 0 ? NC : n;
  std::copy(start, start + N * N, states);
  for (int64_t s = 0; s < len; s++) {
    const RowStep x = at(s);
    const float *__restrict__ d = x.d, *__restrict__ k = x.k, *__restrict__ b = x.b;
    const float* __restrict__ prev = states + s * N * N;
    float* __restrict__ next = states + (s + 1) * N * N;
    for (int64_t i = 0; i < N; i++) {
      const float vi = x.v[i], sai = DELTA ? x.sa[i] : 0.f;
      if constexpr (DELTA) {
#pragma omp simd
        for (int64_t j = 0; j < N; j++) next[i * N + j] = prev[i * N + j] * d[j] + sai * b[j] + vi * k[j];
      } else {
#pragma omp simd
        for (int64_t j = 0; j < N; j++) next[i * N + j] = prev[i * N + j] * d[j] + vi * k[j];
      }
    }
  }
}

}  // namespace rwkv_disha
