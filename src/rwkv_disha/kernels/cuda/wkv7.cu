// WKV-7 state recurrence for `--op cuda`: one thread block per (batch, head), one thread per state row /
// column, the whole sequence walked in one launch (forward) and walked back in one launch (backward).
//
// Math (docs/MODEL.md "Forward pass"; per head, state S is N x N laid out (value i, key j)):
//     sa_i   = sum_j S_{t-1}[i,j] a_j
//     S_t    = S_{t-1} diag(d_t) + sa b_t^T + v_t k_t^T,   d_t = exp(w_t)  (w is the log-decay)
//     y_t,i  = sum_j S_t[i,j] r_j
// Backward, walking t = T-1 .. 0 with dS = dL/dS_t (from the later steps, plus dy_t r_t^T):
//     dr_j = sum_i S_t[i,j] dy_i          S_{t-1}[i,j] = (S_t[i,j] - sa_i b_j - v_i k_j) / d_j
//     dd_j = sum_i dS[i,j] S_{t-1}[i,j]   dk_j = sum_i dS[i,j] v_i    db_j = sum_i dS[i,j] sa_i
//     dv_i = sum_j dS[i,j] k_j            dsa_i = sum_j dS[i,j] b_j   da_j = sum_i dsa_i S_{t-1}[i,j]
//     dS_{t-1}[i,j] = dS[i,j] d_j + dsa_i a_j,      dw_j = dd_j d_j
// The forward saves S every CHUNK steps (and sa every step); the backward reloads S at each chunk end and
// steps back inside the chunk by the division above. d >= exp(-exp(-0.5)) = 0.545 in RWKV-7, so CHUNK - 1
// divisions grow rounding error by up to 0.545^-(CHUNK-1): at decays near that floor, measured (in the
// torch mirror, tests/kernels/test_wkv7_cuda.py) 6e-4 relative gradient error for CHUNK 16, 4e-6 for 8.
// fp32 inputs take CHUNK 8 (fp32-quality gradients, twice the saved states); bf16 inputs, whose own
// rounding is ~4e-3, take 16.
//
// Thread `tid` plays two roles in the backward: column j = tid (it holds S[:, j] and dS[:, j], so every
// sum over i is a private loop) and row i = tid (it holds dS[i, :] for the two sums over j). Keeping dS in
// both layouts costs N more registers and saves a shared-memory transpose per step.
//
// Layouts: r, w, k, v, a, b, y, sa and their gradients (B, T, H, N) contiguous; states (B, H, N, N) fp32,
// (value, key); saved states (B, H, T / CHUNK, N, N) fp32. T must be a multiple of 16 (the Python side
// pads with w = 0, k = v = a = b = 0, which leaves the state unchanged).
//
// Only CUDA runtime headers here (no torch), so `nvcc -c` builds this file on a machine without a GPU.

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace {

constexpr int N = 64;  // head size of every RWKV-7 release

// steps between saved states, by input dtype (see the header)
template <typename F>
struct Chunk {
  static constexpr int value = 8;
};
template <>
struct Chunk<__nv_bfloat16> {
  static constexpr int value = 16;
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename F>
__device__ __forceinline__ F from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

template <typename F>
__global__ void __launch_bounds__(N) forward_kernel(int T, int H, const F* __restrict__ r,
                                                    const F* __restrict__ w, const F* __restrict__ k,
                                                    const F* __restrict__ v, const F* __restrict__ a,
                                                    const F* __restrict__ b, const float* __restrict__ s0,
                                                    F* __restrict__ y, float* __restrict__ s_last,
                                                    float* __restrict__ s_saved, float* __restrict__ sa_out) {
  constexpr int CHUNK = Chunk<F>::value;
  const int bh = blockIdx.x, batch = bh / H, head = bh % H, i = threadIdx.x;
  __shared__ float r_s[N], d_s[N], k_s[N], a_s[N], b_s[N];

  float state[N];  // row i of S
  const float* s0_row = s0 + (static_cast<int64_t>(bh) * N + i) * N;
#pragma unroll
  for (int j = 0; j < N; j++) state[j] = s0_row[j];

  for (int t = 0; t < T; t++) {
    const int64_t ind = (static_cast<int64_t>(batch) * T + t) * H * N + head * N + i;
    __syncthreads();  // the previous step is done reading the shared vectors
    r_s[i] = to_float(r[ind]);
    d_s[i] = __expf(to_float(w[ind]));
    k_s[i] = to_float(k[ind]);
    a_s[i] = to_float(a[ind]);
    b_s[i] = to_float(b[ind]);
    __syncthreads();

    float sa = 0.f;
#pragma unroll
    for (int j = 0; j < N; j++) sa += a_s[j] * state[j];
    if (sa_out != nullptr) sa_out[ind] = sa;  // null: no backward will run (inference)

    const float vi = to_float(v[ind]);
    float yi = 0.f;
#pragma unroll
    for (int j = 0; j < N; j++) {
      state[j] = state[j] * d_s[j] + sa * b_s[j] + vi * k_s[j];
      yi += state[j] * r_s[j];
    }
    y[ind] = from_float<F>(yi);

    if (s_saved != nullptr && (t + 1) % CHUNK == 0) {
      float* out = s_saved + ((static_cast<int64_t>(bh) * (T / CHUNK) + t / CHUNK) * N + i) * N;
#pragma unroll
      for (int j = 0; j < N; j++) out[j] = state[j];
    }
  }
  float* last = s_last + (static_cast<int64_t>(bh) * N + i) * N;
#pragma unroll
  for (int j = 0; j < N; j++) last[j] = state[j];
}

template <typename F>
__global__ void __launch_bounds__(N) backward_kernel(
    int T, int H, const F* __restrict__ r, const F* __restrict__ w, const F* __restrict__ k,
    const F* __restrict__ v, const F* __restrict__ a, const F* __restrict__ b, const float* __restrict__ sa_in,
    const float* __restrict__ s_saved, const F* __restrict__ dy, const float* __restrict__ ds_last,
    F* __restrict__ dr, F* __restrict__ dw, F* __restrict__ dk, F* __restrict__ dv, F* __restrict__ da,
    F* __restrict__ db, float* __restrict__ ds0) {
  constexpr int CHUNK = Chunk<F>::value;
  const int bh = blockIdx.x, batch = bh / H, head = bh % H, tid = threadIdx.x;
  __shared__ float r_s[N], d_s[N], k_s[N], v_s[N], a_s[N], b_s[N], sa_s[N], dy_s[N], dsa_s[N];

  float s_col[N];   // S[:, tid]   (the state after the step being undone)
  float ds_col[N];  // dS[:, tid]
  float ds_row[N];  // dS[tid, :]
  const float* g = ds_last + static_cast<int64_t>(bh) * N * N;
#pragma unroll
  for (int n = 0; n < N; n++) {
    ds_col[n] = g[n * N + tid];
    ds_row[n] = g[tid * N + n];
  }

  for (int t = T - 1; t >= 0; t--) {
    const int64_t ind = (static_cast<int64_t>(batch) * T + t) * H * N + head * N + tid;
    if ((t + 1) % CHUNK == 0) {  // a chunk end: take the exact saved state instead of the stepped-back one
      const float* saved = s_saved + (static_cast<int64_t>(bh) * (T / CHUNK) + t / CHUNK) * N * N;
#pragma unroll
      for (int n = 0; n < N; n++) s_col[n] = saved[n * N + tid];
    }
    __syncthreads();
    r_s[tid] = to_float(r[ind]);
    d_s[tid] = __expf(to_float(w[ind]));
    k_s[tid] = to_float(k[ind]);
    v_s[tid] = to_float(v[ind]);
    a_s[tid] = to_float(a[ind]);
    b_s[tid] = to_float(b[ind]);
    sa_s[tid] = sa_in[ind];
    dy_s[tid] = to_float(dy[ind]);
    __syncthreads();

    // column role: j = tid
    const float rj = r_s[tid], dj = d_s[tid], kj = k_s[tid], aj = a_s[tid], bj = b_s[tid];
    const float inv_d = 1.f / dj;
    float dr_j = 0.f, dd_j = 0.f, dk_j = 0.f, db_j = 0.f;
#pragma unroll
    for (int n = 0; n < N; n++) {
      dr_j += s_col[n] * dy_s[n];
      ds_col[n] += dy_s[n] * rj;
      s_col[n] = (s_col[n] - sa_s[n] * bj - v_s[n] * kj) * inv_d;  // S_{t-1}[n, j]
      dd_j += ds_col[n] * s_col[n];
      dk_j += ds_col[n] * v_s[n];
      db_j += ds_col[n] * sa_s[n];
    }

    // row role: i = tid
    const float dyi = dy_s[tid];
    float dv_i = 0.f, dsa_i = 0.f;
#pragma unroll
    for (int n = 0; n < N; n++) {
      ds_row[n] += dyi * r_s[n];
      dv_i += ds_row[n] * k_s[n];
      dsa_i += ds_row[n] * b_s[n];
    }
    dsa_s[tid] = dsa_i;
    __syncthreads();

    float da_j = 0.f;
#pragma unroll
    for (int n = 0; n < N; n++) {
      da_j += dsa_s[n] * s_col[n];
      ds_col[n] = ds_col[n] * dj + dsa_s[n] * aj;
    }
#pragma unroll
    for (int n = 0; n < N; n++) ds_row[n] = ds_row[n] * d_s[n] + dsa_i * a_s[n];

    dr[ind] = from_float<F>(dr_j);
    dw[ind] = from_float<F>(dd_j * dj);
    dk[ind] = from_float<F>(dk_j);
    db[ind] = from_float<F>(db_j);
    dv[ind] = from_float<F>(dv_i);
    da[ind] = from_float<F>(da_j);
  }
  float* out = ds0 + (static_cast<int64_t>(bh) * N + tid) * N;
#pragma unroll
  for (int n = 0; n < N; n++) out[n] = ds_row[n];
}

template <typename F>
int launch_forward(int B, int T, int H, const void* r, const void* w, const void* k, const void* v,
                   const void* a, const void* b, const float* s0, void* y, float* s_last, float* s_saved,
                   float* sa, void* stream) {
  forward_kernel<F><<<B * H, N, 0, static_cast<cudaStream_t>(stream)>>>(
      T, H, static_cast<const F*>(r), static_cast<const F*>(w), static_cast<const F*>(k),
      static_cast<const F*>(v), static_cast<const F*>(a), static_cast<const F*>(b), s0, static_cast<F*>(y),
      s_last, s_saved, sa);
  return static_cast<int>(cudaGetLastError());
}

template <typename F>
int launch_backward(int B, int T, int H, const void* r, const void* w, const void* k, const void* v,
                    const void* a, const void* b, const float* sa, const float* s_saved, const void* dy,
                    const float* ds_last, void* dr, void* dw, void* dk, void* dv, void* da, void* db,
                    float* ds0, void* stream) {
  backward_kernel<F><<<B * H, N, 0, static_cast<cudaStream_t>(stream)>>>(
      T, H, static_cast<const F*>(r), static_cast<const F*>(w), static_cast<const F*>(k),
      static_cast<const F*>(v), static_cast<const F*>(a), static_cast<const F*>(b), sa, s_saved,
      static_cast<const F*>(dy), ds_last, static_cast<F*>(dr), static_cast<F*>(dw), static_cast<F*>(dk),
      static_cast<F*>(dv), static_cast<F*>(da), static_cast<F*>(db), ds0);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

// The binding (wkv7_bind.cpp) calls these two; `bf16` picks the input dtype (else fp32). They return the
// CUDA error code of the launch (0 = success).
int wkv7_cuda_forward(bool bf16, int B, int T, int H, const void* r, const void* w, const void* k,
                      const void* v, const void* a, const void* b, const float* s0, void* y, float* s_last,
                      float* s_saved, float* sa, void* stream) {
  return bf16 ? launch_forward<__nv_bfloat16>(B, T, H, r, w, k, v, a, b, s0, y, s_last, s_saved, sa, stream)
              : launch_forward<float>(B, T, H, r, w, k, v, a, b, s0, y, s_last, s_saved, sa, stream);
}

int wkv7_cuda_backward(bool bf16, int B, int T, int H, const void* r, const void* w, const void* k,
                       const void* v, const void* a, const void* b, const float* sa, const float* s_saved,
                       const void* dy, const float* ds_last, void* dr, void* dw, void* dk, void* dv, void* da,
                       void* db, float* ds0, void* stream) {
  return bf16 ? launch_backward<__nv_bfloat16>(B, T, H, r, w, k, v, a, b, sa, s_saved, dy, ds_last, dr, dw, dk,
                                               dv, da, db, ds0, stream)
              : launch_backward<float>(B, T, H, r, w, k, v, a, b, sa, s_saved, dy, ds_last, dr, dw, dk, dv, da,
                                       db, ds0, stream);
}

int wkv7_cuda_chunk(bool bf16) { return bf16 ? Chunk<__nv_bfloat16>::value : Chunk<float>::value; }

const char* wkv7_cuda_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }
