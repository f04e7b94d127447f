// WKV-7 state recurrence for `--op cpp`: a compiled CPU loop, one (batch, head) per task, the state kept in
// a small buffer that stays in the core's cache. The chunked torch kernel spends most of its time in
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
// The kernel holds S transposed, (key j, value i) with i contiguous, so each step is passes over the
// columns of S with vectors along i: the forward reduces nothing across a vector's lanes; the backward
// reduces five sums per column, all in one pass.
// The forward saves S at the start of every CHUNK steps; the backward recomputes the chunk's states from
// there into a (CHUNK + 1) x N x N buffer and walks them back: exact (no division by the decay), for one
// extra forward.
//
// Layouts: inputs and their gradients (B, T, H, N) fp32 contiguous; states in and out (B, H, N, N) fp32
// (value, key); saved chunk starts (B, H, ceil(T / CHUNK), N, N) in the kernel's (key, value).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t CHUNK = 16;

struct Step {  // pointers to one (batch, head)'s vectors at step t: index t * stride
  const float *r, *w, *k, *v, *a, *b;
  int64_t stride;
};

constexpr int64_t MAX_N = 256;

// Step t: St (N x N, row j = key j, so column j of S is contiguous over the value index i)
// <- S diag(d) + sa b^T + v k^T; writes sa (N) and, if y is given, y_t (N). Every sum runs over j with
// vectors along i, so nothing is reduced across a vector's lanes.
// NC: the head size as a compile-time constant (64: every RWKV-7 release), or 0 for the runtime n.
template <int64_t NC>
inline void step_forward(float* __restrict__ St, const Step& x, int64_t t, int64_t n, float* __restrict__ sa,
                         float* __restrict__ y) {
  const int64_t N = NC > 0 ? NC : n;
  const int64_t o = t * x.stride;
  const float *__restrict__ r = x.r + o, *__restrict__ d = x.w + o, *__restrict__ k = x.k + o;
  const float *__restrict__ v = x.v + o, *__restrict__ a = x.a + o, *__restrict__ b = x.b + o;
  alignas(64) float yy[NC > 0 ? NC : MAX_N];
  for (int64_t i = 0; i < N; i++) sa[i] = yy[i] = 0.f;
  for (int64_t j = 0; j < N; j++) {
    const float* __restrict__ col = St + j * N;
    const float aj = a[j];
#pragma omp simd
    for (int64_t i = 0; i < N; i++) sa[i] += col[i] * aj;
  }
  for (int64_t j = 0; j < N; j++) {
    float* __restrict__ col = St + j * N;
    const float dj = d[j], bj = b[j], kj = k[j], rj = r[j];
#pragma omp simd
    for (int64_t i = 0; i < N; i++) {
      col[i] = col[i] * dj + sa[i] * bj + v[i] * kj;
      yy[i] += col[i] * rj;
    }
  }
  if (y != nullptr)
    for (int64_t i = 0; i < N; i++) y[o + i] = yy[i];
}

// One (batch, head) forward: St walks T steps from its start value; y written; the state at the start of
// every CHUNK steps copied to starts (if given).
template <int64_t NC>
void head_forward(float* St, const Step& x, int64_t T, int64_t n, float* y, float* starts) {
  const int64_t N = NC > 0 ? NC : n;
  alignas(64) float sa[NC > 0 ? NC : MAX_N];
  for (int64_t t = 0; t < T; t++) {
    if (starts != nullptr && t % CHUNK == 0) std::copy(St, St + N * N, starts + (t / CHUNK) * N * N);
    step_forward<NC>(St, x, t, N, sa, y);
  }
}

// One (batch, head) backward: dSt holds dL/dS_T (transposed, as St) and ends as dL/dS_0; g the six
// gradient outputs (same offsets as x); `states` a (CHUNK + 1) x N x N buffer, `sas` CHUNK x N.
template <int64_t NC>
void head_backward(float* __restrict__ dSt, const Step& x, const float* dy, const std::array<float*, 6>& g,
                   const float* starts, int64_t T, int64_t n, float* states, float* sas) {
  const int64_t N = NC > 0 ? NC : n;
  alignas(64) float dv[NC > 0 ? NC : MAX_N], dsa[NC > 0 ? NC : MAX_N];
  for (int64_t c = (T + CHUNK - 1) / CHUNK - 1; c >= 0; c--) {
    const int64_t t0 = c * CHUNK, len = std::min(CHUNK, T - t0);
    std::copy(starts + c * N * N, starts + (c + 1) * N * N, states);
    for (int64_t s = 0; s < len; s++) {  // states[s + 1] = S after step t0 + s
      float* next = states + (s + 1) * N * N;
      std::copy(next - N * N, next, next);
      step_forward<NC>(next, x, t0 + s, N, sas + s * N, nullptr);
    }
    for (int64_t s = len - 1; s >= 0; s--) {
      const int64_t o = (t0 + s) * x.stride;
      const float *__restrict__ S_t = states + (s + 1) * N * N, *__restrict__ S_prev = states + s * N * N;
      const float *__restrict__ sa = sas + s * N, *__restrict__ dy_t = dy + o;
      const float *__restrict__ r = x.r + o, *__restrict__ d = x.w + o, *__restrict__ k = x.k + o;
      const float *__restrict__ v = x.v + o, *__restrict__ a = x.a + o, *__restrict__ b = x.b + o;
      for (int64_t i = 0; i < N; i++) dv[i] = dsa[i] = 0.f;
      for (int64_t j = 0; j < N; j++) {  // column j of dS: add dy r^T, then every sum it enters, in one pass
        float* __restrict__ col = dSt + j * N;
        const float *__restrict__ st_col = S_t + j * N, *__restrict__ prev_col = S_prev + j * N;
        const float rj = r[j], kj = k[j], bj = b[j];
        float dr = 0.f, dd = 0.f, dk = 0.f, db = 0.f;
#pragma omp simd reduction(+ : dr, dd, dk, db)
        for (int64_t i = 0; i < N; i++) {
          const float ds = col[i] + dy_t[i] * rj;
          col[i] = ds;
          dv[i] += ds * kj;
          dsa[i] += ds * bj;
          dr += st_col[i] * dy_t[i];
          dd += ds * prev_col[i];
          dk += ds * v[i];
          db += ds * sa[i];
        }
        g[0][o + j] = dr;
        g[1][o + j] = dd * d[j];  // dw = dd * d (w is the log-decay)
        g[2][o + j] = dk;
        g[5][o + j] = db;
      }
      for (int64_t j = 0; j < N; j++) {  // dS_{t-1} = dS diag(d) + dsa a^T
        float* __restrict__ col = dSt + j * N;
        const float dj = d[j], aj = a[j];
        const float* __restrict__ prev_col = S_prev + j * N;
        float da = 0.f;
#pragma omp simd reduction(+ : da)
        for (int64_t i = 0; i < N; i++) {
          da += dsa[i] * prev_col[i];
          col[i] = col[i] * dj + dsa[i] * aj;
        }
        g[4][o + j] = da;
      }
      for (int64_t i = 0; i < N; i++) g[3][o + i] = dv[i];
    }
  }
}

void check(const torch::Tensor& x, at::IntArrayRef sizes, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "wkv7 cpp: ", name, " must be a contiguous fp32 CPU tensor");
  TORCH_CHECK(x.sizes() == sizes, "wkv7 cpp: ", name, " has shape ", x.sizes(), ", expected ", sizes);
}

// xs = [r, decay, k, v, a, b], each (B, T, H, N); state (B, H, N, N)
void check_all(const std::vector<torch::Tensor>& xs, const torch::Tensor& state) {
  TORCH_CHECK(xs.size() == 6, "wkv7 cpp: expected 6 inputs, got ", xs.size());
  const auto& r = xs[0];
  TORCH_CHECK(r.dim() == 4 && r.size(3) >= 1 && r.size(3) <= MAX_N, "wkv7 cpp: inputs must be (B, T, H, N), N <= ",
              MAX_N, ", got ", r.sizes());
  for (const auto& x : xs) check(x, r.sizes(), "an input");
  check(state, {r.size(0), r.size(2), r.size(3), r.size(3)}, "the state");
}

Step step_of(const std::vector<torch::Tensor>& xs, int64_t off) {
  const int64_t stride = xs[0].size(2) * xs[0].size(3);
  return {xs[0].data_ptr<float>() + off, xs[1].data_ptr<float>() + off, xs[2].data_ptr<float>() + off,
          xs[3].data_ptr<float>() + off, xs[4].data_ptr<float>() + off, xs[5].data_ptr<float>() + off, stride};
}

}  // namespace

// xs = [r, w, k, v, a, b] (B, T, H, N) fp32; s0 (B, H, N, N) fp32
// -> [y (B, T, H, N), s_last (B, H, N, N), starts (B, H, ceil(T / CHUNK), N, N), or empty without save]
std::vector<torch::Tensor> forward(std::vector<torch::Tensor> xs, torch::Tensor s0, bool save) {
  check_all(xs, s0);
  const int64_t B = xs[0].size(0), T = xs[0].size(1), H = xs[0].size(2), N = xs[0].size(3);
  const int64_t n_chunks = (T + CHUNK - 1) / CHUNK;
  auto y = torch::empty_like(xs[0]);
  auto s_last = s0.transpose(-1, -2).contiguous();  // the kernel's state is (key, value)
  auto starts = torch::empty({save ? B : 0, H, n_chunks, N, N}, s0.options());
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; bh++) {
      const int64_t off = (bh / H) * T * H * N + (bh % H) * N;  // (batch, t = 0, head, 0)
      float* st = save ? starts.data_ptr<float>() + bh * n_chunks * N * N : nullptr;
      float* S = s_last.data_ptr<float>() + bh * N * N;
      if (N == 64)
        head_forward<64>(S, step_of(xs, off), T, N, y.data_ptr<float>() + off, st);
      else
        head_forward<0>(S, step_of(xs, off), T, N, y.data_ptr<float>() + off, st);
    }
  });
  return {y, s_last.transpose(-1, -2), starts};
}

// xs as above, starts from forward(save = true), dy (B, T, H, N), ds_last (B, H, N, N)
// -> [dr, dw, dk, dv, da, db (each (B, T, H, N)), ds0 (B, H, N, N)]
std::vector<torch::Tensor> backward(std::vector<torch::Tensor> xs, torch::Tensor starts, torch::Tensor dy,
                                    torch::Tensor ds_last) {
  check_all(xs, ds_last);
  check(dy, xs[0].sizes(), "dy");
  const int64_t B = xs[0].size(0), T = xs[0].size(1), H = xs[0].size(2), N = xs[0].size(3);
  const int64_t n_chunks = (T + CHUNK - 1) / CHUNK;
  check(starts, {B, H, n_chunks, N, N}, "the saved states");
  std::vector<torch::Tensor> grads;
  for (int i = 0; i < 6; i++) grads.push_back(torch::empty_like(xs[0]));
  auto ds0 = ds_last.transpose(-1, -2).contiguous();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> states((CHUNK + 1) * N * N), sas(CHUNK * N);
    for (int64_t bh = begin; bh < end; bh++) {
      const int64_t off = (bh / H) * T * H * N + (bh % H) * N;
      std::array<float*, 6> g;
      for (int i = 0; i < 6; i++) g[i] = grads[i].data_ptr<float>() + off;
      const float* st = starts.data_ptr<float>() + bh * n_chunks * N * N;
      float* dS = ds0.data_ptr<float>() + bh * N * N;
      const float* dyp = dy.data_ptr<float>() + off;
      if (N == 64)
        head_backward<64>(dS, step_of(xs, off), dyp, g, st, T, N, states.data(), sas.data());
      else
        head_backward<0>(dS, step_of(xs, off), dyp, g, st, T, N, states.data(), sas.data());
    }
  });
  grads.push_back(ds0.transpose(-1, -2));
  return grads;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "WKV-7 forward on the CPU (see wkv7_cpu.cpp)");
  m.def("backward", &backward, "WKV-7 backward on the CPU (see wkv7_cpu.cpp)");
}
