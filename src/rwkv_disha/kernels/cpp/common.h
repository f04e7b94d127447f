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

}  // namespace rwkv_disha
