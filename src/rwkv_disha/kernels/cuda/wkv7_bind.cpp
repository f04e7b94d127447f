// Torch binding of wkv7.cu: shape / dtype / device checks, output allocation, the launch. Includes no CUDA
// header (the caller passes torch's current stream as an integer), so it also builds against a CPU torch.

#include <torch/extension.h>

#include <cstdint>
#include <vector>

int wkv7_cuda_forward(bool bf16, int B, int T, int H, const void* r, const void* w, const void* k,
                      const void* v, const void* a, const void* b, const float* s0, void* y, float* s_last,
                      float* s_saved, float* sa, void* stream);
int wkv7_cuda_backward(bool bf16, int B, int T, int H, const void* r, const void* w, const void* k,
                       const void* v, const void* a, const void* b, const float* sa, const float* s_saved,
                       const void* dy, const float* ds_last, void* dr, void* dw, void* dk, void* dv, void* da,
                       void* db, float* ds0, void* stream);
int wkv7_cuda_chunk(bool bf16);
const char* wkv7_cuda_error_string(int code);

namespace {

constexpr int64_t N = 64;
constexpr int64_t T_MULTIPLE = 16;  // every chunk length of wkv7.cu divides it

void check_input(const torch::Tensor& x, const torch::Tensor& like, const char* name) {
  TORCH_CHECK(x.is_cuda(), "wkv7 cuda: ", name, " must be a CUDA tensor");
  TORCH_CHECK(x.is_contiguous(), "wkv7 cuda: ", name, " must be contiguous");
  TORCH_CHECK(x.scalar_type() == like.scalar_type(), "wkv7 cuda: ", name, " has dtype ", x.scalar_type(),
              ", expected ", like.scalar_type());
  TORCH_CHECK(x.sizes() == like.sizes(), "wkv7 cuda: ", name, " has shape ", x.sizes(), ", expected ",
              like.sizes());
  TORCH_CHECK(x.device() == like.device(), "wkv7 cuda: ", name, " is on ", x.device(), ", expected ",
              like.device());
}

void check_state(const torch::Tensor& s, const torch::Tensor& like, const char* name) {
  TORCH_CHECK(s.is_cuda() && s.is_contiguous() && s.scalar_type() == torch::kFloat32,
              "wkv7 cuda: ", name, " must be a contiguous fp32 CUDA tensor");
  TORCH_CHECK(s.device() == like.device(), "wkv7 cuda: ", name, " is on ", s.device(), ", expected ",
              like.device());
  TORCH_CHECK(s.dim() == 4 && s.size(0) == like.size(0) && s.size(1) == like.size(2) && s.size(2) == N &&
                  s.size(3) == N,
              "wkv7 cuda: ", name, " must be (B, H, 64, 64), got ", s.sizes());
}

// r: (B, T, H, 64) fp32 or bf16 -> B, T, H and the kernel's chunk length, after checking its shape rules.
std::vector<int64_t> check_main(const torch::Tensor& r) {
  TORCH_CHECK(r.is_cuda(), "wkv7 cuda: r must be a CUDA tensor");
  TORCH_CHECK(r.scalar_type() == torch::kFloat32 || r.scalar_type() == torch::kBFloat16,
              "wkv7 cuda: inputs must be fp32 or bf16, got ", r.scalar_type());
  TORCH_CHECK(r.dim() == 4 && r.size(3) == N, "wkv7 cuda: inputs must be (B, T, H, 64), got ", r.sizes());
  TORCH_CHECK(r.size(1) % T_MULTIPLE == 0, "wkv7 cuda: T must be a multiple of ", T_MULTIPLE, ", got ",
              r.size(1));
  TORCH_CHECK(r.size(0) * r.size(2) <= INT32_MAX && r.size(1) <= INT32_MAX, "wkv7 cuda: B * H or T too large");
  return {r.size(0), r.size(1), r.size(2), wkv7_cuda_chunk(r.scalar_type() == torch::kBFloat16)};
}

void check_launch(int code) { TORCH_CHECK(code == 0, "wkv7 cuda: launch failed: ", wkv7_cuda_error_string(code)); }

}  // namespace

// -> [y (B, T, H, 64) in r's dtype, s_last (B, H, 64, 64), s_saved (B, H, T / chunk, 64, 64), sa (B, T, H, 64)];
// with save == false (no backward to come) s_saved and sa are empty and the kernel writes neither
std::vector<torch::Tensor> forward(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v,
                                   torch::Tensor a, torch::Tensor b, torch::Tensor s0, bool save, int64_t stream) {
  const auto sizes = check_main(r);
  const int64_t B = sizes[0], T = sizes[1], H = sizes[2], chunk = sizes[3];
  const c10::DeviceGuard guard(r.device());  // launch on r's GPU, not the current one
  check_input(r, r, "r");
  check_input(w, r, "w");
  check_input(k, r, "k");
  check_input(v, r, "v");
  check_input(a, r, "a");
  check_input(b, r, "b");
  check_state(s0, r, "state");
  const auto f32 = r.options().dtype(torch::kFloat32);
  auto y = torch::empty_like(r);
  auto s_last = torch::empty({B, H, N, N}, f32);
  auto s_saved = save ? torch::empty({B, H, T / chunk, N, N}, f32) : torch::empty({0}, f32);
  auto sa = save ? torch::empty({B, T, H, N}, f32) : torch::empty({0}, f32);
  if (B * T * H > 0)
    check_launch(wkv7_cuda_forward(r.scalar_type() == torch::kBFloat16, B, T, H, r.data_ptr(), w.data_ptr(),
                                   k.data_ptr(), v.data_ptr(), a.data_ptr(), b.data_ptr(), s0.data_ptr<float>(),
                                   y.data_ptr(), s_last.data_ptr<float>(),
                                   save ? s_saved.data_ptr<float>() : nullptr, save ? sa.data_ptr<float>() : nullptr,
                                   reinterpret_cast<void*>(stream)));
  else
    s_last.copy_(s0);
  return {y, s_last, s_saved, sa};
}

// -> [dr, dw, dk, dv, da, db (each like r), ds0 (B, H, 64, 64) fp32]
std::vector<torch::Tensor> backward(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v,
                                    torch::Tensor a, torch::Tensor b, torch::Tensor sa, torch::Tensor s_saved,
                                    torch::Tensor dy, torch::Tensor ds_last, int64_t stream) {
  const auto sizes = check_main(r);
  const int64_t B = sizes[0], T = sizes[1], H = sizes[2], chunk = sizes[3];
  const c10::DeviceGuard guard(r.device());
  for (auto* x : {&w, &k, &v, &a, &b, &dy}) check_input(*x, r, "an input or dy");
  check_state(ds_last, r, "the final state's gradient");
  TORCH_CHECK(sa.scalar_type() == torch::kFloat32 && sa.is_contiguous() && sa.sizes() == r.sizes(),
              "wkv7 cuda: sa must be fp32 and shaped like r");
  TORCH_CHECK(s_saved.scalar_type() == torch::kFloat32 && s_saved.is_contiguous() &&
                  s_saved.sizes() == torch::IntArrayRef({B, H, T / chunk, N, N}),
              "wkv7 cuda: saved states have the wrong shape");
  auto dr = torch::empty_like(r), dw = torch::empty_like(r), dk = torch::empty_like(r);
  auto dv = torch::empty_like(r), da = torch::empty_like(r), db = torch::empty_like(r);
  auto ds0 = torch::empty({B, H, N, N}, r.options().dtype(torch::kFloat32));
  if (B * T * H > 0)
    check_launch(wkv7_cuda_backward(r.scalar_type() == torch::kBFloat16, B, T, H, r.data_ptr(), w.data_ptr(),
                                    k.data_ptr(), v.data_ptr(), a.data_ptr(), b.data_ptr(), sa.data_ptr<float>(),
                                    s_saved.data_ptr<float>(), dy.data_ptr(), ds_last.data_ptr<float>(),
                                    dr.data_ptr(), dw.data_ptr(), dk.data_ptr(), dv.data_ptr(), da.data_ptr(),
                                    db.data_ptr(), ds0.data_ptr<float>(), reinterpret_cast<void*>(stream)));
  else
    ds0.copy_(ds_last);
  return {dr, dw, dk, dv, da, db, ds0};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "WKV-7 forward (see wkv7.cu)");
  m.def("backward", &backward, "WKV-7 backward (see wkv7.cu)");
}
