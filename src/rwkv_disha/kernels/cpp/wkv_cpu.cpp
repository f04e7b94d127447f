// Torch binding of the CPU WKV kernels (wkv7.h, wkv6.h): checks, allocation, one (batch, head) per task
// across torch's threads (at::parallel_for: OpenMP where torch has it). States in and out are (B, H, N, N)
// fp32 laid out (value, key); the forwards walk them transposed.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <array>
#include <vector>

#include "wkv6.h"
#include "wkv7.h"

namespace rwkv_disha {
namespace {

void check(const torch::Tensor& x, at::IntArrayRef sizes, const char* who, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), who, ": ", name,
              " must be a contiguous fp32 CPU tensor");
  TORCH_CHECK(x.sizes() == sizes, who, ": ", name, " has shape ", x.sizes(), ", expected ", sizes);
}

constexpr const char* NAMES[] = {"r", "decay", "k", "v", "a", "b"};

// xs: r, decay, k, v (, a, b) (B, T, H, N); state (B, H, N, N) named `state_name` -> B, T, H, N
std::array<int64_t, 4> check_all(const std::vector<torch::Tensor>& xs, size_t n_inputs, const torch::Tensor& state,
                                 const char* state_name, const char* who) {
  TORCH_CHECK(xs.size() == n_inputs, who, ": expected ", n_inputs, " inputs, got ", xs.size());
  const auto& r = xs[0];
  TORCH_CHECK(r.dim() == 4 && r.size(3) >= 1 && r.size(3) <= MAX_N, who, ": inputs must be (B, T, H, N), N <= ",
              MAX_N, ", got ", r.sizes());
  for (size_t i = 0; i < n_inputs; i++) check(xs[i], r.sizes(), who, NAMES[i]);
  check(state, {r.size(0), r.size(2), r.size(3), r.size(3)}, who, state_name);
  return {r.size(0), r.size(1), r.size(2), r.size(3)};
}

int64_t n_chunks(int64_t T) { return (T + CHUNK - 1) / CHUNK; }

// (batch, t = 0, head, 0) of (B, T, H, N) for task bh = batch * H + head
int64_t offset(int64_t bh, int64_t T, int64_t H, int64_t N) { return (bh / H) * T * H * N + (bh % H) * N; }

Step step7(const std::vector<torch::Tensor>& xs, int64_t off, int64_t stride) {
  return {xs[0].data_ptr<float>() + off, xs[1].data_ptr<float>() + off, xs[2].data_ptr<float>() + off,
          xs[3].data_ptr<float>() + off, xs[4].data_ptr<float>() + off, xs[5].data_ptr<float>() + off, stride};
}

Step6 step6(const std::vector<torch::Tensor>& xs, const torch::Tensor& u, int64_t bh, int64_t off, int64_t H,
            int64_t stride) {
  const float* u_head = u.data_ptr<float>() + (bh % H) * u.size(1);
  return {xs[0].data_ptr<float>() + off, xs[1].data_ptr<float>() + off, xs[2].data_ptr<float>() + off,
          xs[3].data_ptr<float>() + off, u_head, stride};
}

}  // namespace

// RWKV-7. xs = [r, decay, k, v, a, b] (B, T, H, N) fp32; s0 (B, H, N, N)
// -> [y (B, T, H, N), s_last (B, H, N, N), starts (B, H, ceil(T / CHUNK), N, N), sa (B, T, H, N)];
// without save (no backward to come) starts and sa are empty and nothing is written to them
std::vector<torch::Tensor> wkv7_forward(std::vector<torch::Tensor> xs, torch::Tensor s0, bool save) {
  const auto dims = check_all(xs, 6, s0, "the state", "wkv7 cpp");
  const int64_t B = dims[0], T = dims[1], H = dims[2], N = dims[3];
  auto y = torch::empty_like(xs[0]);
  auto s_last = s0.transpose(-1, -2).clone(at::MemoryFormat::Contiguous);  // never s0 itself (N = 1)
  auto starts = torch::empty({save ? B : 0, H, n_chunks(T), N, N}, s0.options());
  auto sa = save ? torch::empty_like(xs[0]) : torch::empty({0}, s0.options());
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; bh++) {
      const int64_t off = offset(bh, T, H, N);
      float* st = save ? starts.data_ptr<float>() + bh * n_chunks(T) * N * N : nullptr;
      float* sa_out = save ? sa.data_ptr<float>() + off : nullptr;
      float *S = s_last.data_ptr<float>() + bh * N * N, *yp = y.data_ptr<float>() + off;
      if (N == 64)
        head_forward<64>(S, step7(xs, off, H * N), T, N, yp, st, sa_out);
      else
        head_forward<0>(S, step7(xs, off, H * N), T, N, yp, st, sa_out);
    }
  });
  return {y, s_last.transpose(-1, -2).contiguous(), starts, sa};
}

// RWKV-7. xs as above, starts and sa from wkv7_forward(save = true), dy (B, T, H, N), ds_last (B, H, N, N)
// -> [dr, dw, dk, dv, da, db (each (B, T, H, N)), ds0 (B, H, N, N)]
std::vector<torch::Tensor> wkv7_backward(std::vector<torch::Tensor> xs, torch::Tensor starts, torch::Tensor sa,
                                         torch::Tensor dy, torch::Tensor ds_last) {
  const auto dims = check_all(xs, 6, ds_last, "the final state's gradient", "wkv7 cpp");
  const int64_t B = dims[0], T = dims[1], H = dims[2], N = dims[3];
  check(dy, xs[0].sizes(), "wkv7 cpp", "dy");
  check(sa, xs[0].sizes(), "wkv7 cpp", "sa");
  check(starts, {B, H, n_chunks(T), N, N}, "wkv7 cpp", "the saved states");
  std::vector<torch::Tensor> grads;
  for (int i = 0; i < 6; i++) grads.push_back(torch::empty_like(xs[0]));
  auto ds0 = ds_last.clone();  // the backward's dS by rows: (value, key), as the caller's state
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> states((CHUNK + 1) * N * N), dSc(N * N);
    for (int64_t bh = begin; bh < end; bh++) {
      const int64_t off = offset(bh, T, H, N);
      std::array<float*, 6> g;
      for (int i = 0; i < 6; i++) g[i] = grads[i].data_ptr<float>() + off;
      const float* st = starts.data_ptr<float>() + bh * n_chunks(T) * N * N;
      const float *dyp = dy.data_ptr<float>() + off, *sap = sa.data_ptr<float>() + off;
      float* dS = ds0.data_ptr<float>() + bh * N * N;
      if (N == 64)
        head_backward<64>(dS, step7(xs, off, H * N), dyp, sap, g, st, T, N, states.data(), dSc.data());
      else
        head_backward<0>(dS, step7(xs, off, H * N), dyp, sap, g, st, T, N, states.data(), dSc.data());
    }
  });
  grads.push_back(ds0);
  return grads;
}

// RWKV-6 / 5.2. xs = [r, decay, k, v] (B, T, H, N) fp32; u (H, N); s0 (B, H, N, N)
// -> [y (B, T, H, N), s_last (B, H, N, N), starts (B, H, ceil(T / CHUNK), N, N), or empty without save]
std::vector<torch::Tensor> wkv6_forward(std::vector<torch::Tensor> xs, torch::Tensor u, torch::Tensor s0,
                                        bool save) {
  const auto dims = check_all(xs, 4, s0, "the state", "wkv6 cpp");
  const int64_t B = dims[0], T = dims[1], H = dims[2], N = dims[3];
  check(u, {H, N}, "wkv6 cpp", "u");
  auto y = torch::empty_like(xs[0]);
  auto s_last = s0.transpose(-1, -2).clone(at::MemoryFormat::Contiguous);  // never s0 itself (N = 1)
  auto starts = torch::empty({save ? B : 0, H, n_chunks(T), N, N}, s0.options());
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; bh++) {
      const int64_t off = offset(bh, T, H, N);
      float* st = save ? starts.data_ptr<float>() + bh * n_chunks(T) * N * N : nullptr;
      float *S = s_last.data_ptr<float>() + bh * N * N, *yp = y.data_ptr<float>() + off;
      if (N == 64)
        head_forward6<64>(S, step6(xs, u, bh, off, H, H * N), T, N, yp, st);
      else
        head_forward6<0>(S, step6(xs, u, bh, off, H, H * N), T, N, yp, st);
    }
  });
  return {y, s_last.transpose(-1, -2).contiguous(), starts};
}

// RWKV-6 / 5.2. xs, u as above, starts from wkv6_forward(save = true), dy (B, T, H, N), ds_last (B, H, N, N)
// -> [dr, dw, dk, dv (each (B, T, H, N)), du (B, H, N): each batch's share, ds0 (B, H, N, N)]
std::vector<torch::Tensor> wkv6_backward(std::vector<torch::Tensor> xs, torch::Tensor u, torch::Tensor starts,
                                         torch::Tensor dy, torch::Tensor ds_last) {
  const auto dims = check_all(xs, 4, ds_last, "the final state's gradient", "wkv6 cpp");
  const int64_t B = dims[0], T = dims[1], H = dims[2], N = dims[3];
  check(u, {H, N}, "wkv6 cpp", "u");
  check(dy, xs[0].sizes(), "wkv6 cpp", "dy");
  check(starts, {B, H, n_chunks(T), N, N}, "wkv6 cpp", "the saved states");
  std::vector<torch::Tensor> grads;
  for (int i = 0; i < 4; i++) grads.push_back(torch::empty_like(xs[0]));
  auto du = torch::empty({B, H, N}, u.options());
  auto ds0 = ds_last.clone();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> states((CHUNK + 1) * N * N), dSc(N * N);
    for (int64_t bh = begin; bh < end; bh++) {
      const int64_t off = offset(bh, T, H, N);
      std::array<float*, 4> g;
      for (int i = 0; i < 4; i++) g[i] = grads[i].data_ptr<float>() + off;
      const float *st = starts.data_ptr<float>() + bh * n_chunks(T) * N * N, *dyp = dy.data_ptr<float>() + off;
      float *dS = ds0.data_ptr<float>() + bh * N * N, *dup = du.data_ptr<float>() + bh * N;
      const Step6 x = step6(xs, u, bh, off, H, H * N);
      if (N == 64)
        head_backward6<64>(dS, x, dyp, g, dup, st, T, N, states.data(), dSc.data());
      else
        head_backward6<0>(dS, x, dyp, g, dup, st, T, N, states.data(), dSc.data());
    }
  });
  grads.push_back(du);
  grads.push_back(ds0);
  return grads;
}

}  // namespace rwkv_disha

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("wkv7_forward", &rwkv_disha::wkv7_forward, "RWKV-7 WKV forward on the CPU (wkv7.h)");
  m.def("wkv7_backward", &rwkv_disha::wkv7_backward, "RWKV-7 WKV backward on the CPU (wkv7.h)");
  m.def("wkv6_forward", &rwkv_disha::wkv6_forward, "RWKV-6 / 5.2 WKV forward on the CPU (wkv6.h)");
  m.def("wkv6_backward", &rwkv_disha::wkv6_backward, "RWKV-6 / 5.2 WKV backward on the CPU (wkv6.h)");
}
