// Torch binding of the weighted vocab-parallel cross-entropy kernels: defines the ops
// torch.ops.megatron_zero.{wce_row_max, wce_sum_exp_target, wce_logit_grad} and, when built with
// -DWITH_CUDA (setup.py's CUDAExtension), registers their CUDA kernels from weighted_ce_kernel.cu.
// The CPU kernels are registered by weighted_ce_cpu.cpp.  megatron_zero/loss/fused_cross_entropy.py
// is the Python side (autograd, tensor-parallel all-reduces, the pure PyTorch fallback).
#include <Python.h>
#include <torch/library.h>

#ifdef WITH_CUDA
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <tuple>

#include "weighted_ce_cuda.h"
#endif

TORCH_LIBRARY(megatron_zero, m) {
  m.def("wce_row_max(Tensor logits) -> Tensor");
  m.def("wce_sum_exp_target(Tensor logits, Tensor global_max, Tensor target, int vocab_start) -> (Tensor, Tensor)");
  m.def("wce_logit_grad(Tensor logits, Tensor target, Tensor lse, Tensor scale, int vocab_start) -> Tensor");
}

#ifdef WITH_CUDA
namespace megatron_zero {
namespace wce {
namespace {

LogitsDtype logits_dtype(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), "weighted_ce: logits must be contiguous [rows, shard_vocab]");
  switch (logits.scalar_type()) {
    case at::kFloat:
      return LogitsDtype::kFloat32;
    case at::kHalf:
      return LogitsDtype::kFloat16;
    case at::kBFloat16:
      return LogitsDtype::kBFloat16;
    default:
      TORCH_CHECK(false, "weighted_ce: CUDA kernel supports float32/float16/bfloat16 logits, got ",
                  logits.scalar_type());
  }
}

void check_row_vector(const at::Tensor& t, const at::Tensor& logits, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == logits.size(0) && t.scalar_type() == dtype && t.is_contiguous() &&
                  t.device() == logits.device(),
              "weighted_ce: ", name, " must be a contiguous ", dtype, " [", logits.size(0), "] on ", logits.device());
}

void check_launch(int status, const char* what) {
  TORCH_CHECK(status == 0, "weighted_ce: ", what, " launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(status)));
}

void* current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

at::Tensor row_max_cuda(const at::Tensor& logits) {
  const LogitsDtype dtype = logits_dtype(logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor out = at::empty({logits.size(0)}, logits.options().dtype(at::kFloat));
  check_launch(launch_row_max(dtype, logits.const_data_ptr(), logits.size(0), logits.size(1), out.data_ptr<float>(),
                              current_stream()),
               "row_max");
  return out;
}

std::tuple<at::Tensor, at::Tensor> sum_exp_target_cuda(const at::Tensor& logits, const at::Tensor& global_max,
                                                       const at::Tensor& target, int64_t vocab_start) {
  const LogitsDtype dtype = logits_dtype(logits);
  check_row_vector(global_max, logits, at::kFloat, "global_max");
  check_row_vector(target, logits, at::kLong, "target");
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor sum_exp = at::empty({logits.size(0)}, logits.options().dtype(at::kFloat));
  at::Tensor picked = at::empty({logits.size(0)}, logits.options().dtype(at::kFloat));
  check_launch(launch_sum_exp_target(dtype, logits.const_data_ptr(), target.const_data_ptr<int64_t>(),
                                     global_max.const_data_ptr<float>(), logits.size(0), logits.size(1), vocab_start,
                                     sum_exp.data_ptr<float>(), picked.data_ptr<float>(), current_stream()),
               "sum_exp_target");
  return {sum_exp, picked};
}

at::Tensor logit_grad_cuda(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& lse,
                           const at::Tensor& scale, int64_t vocab_start) {
  const LogitsDtype dtype = logits_dtype(logits);
  check_row_vector(target, logits, at::kLong, "target");
  check_row_vector(lse, logits, at::kFloat, "lse");
  check_row_vector(scale, logits, at::kFloat, "scale");
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor grad = at::empty_like(logits);
  check_launch(launch_logit_grad(dtype, logits.const_data_ptr(), target.const_data_ptr<int64_t>(),
                                 lse.const_data_ptr<float>(), scale.const_data_ptr<float>(), logits.size(0),
                                 logits.size(1), vocab_start, grad.data_ptr(), current_stream()),
               "logit_grad");
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(megatron_zero, CUDA, m) {
  m.impl("wce_row_max", TORCH_FN(row_max_cuda));
  m.impl("wce_sum_exp_target", TORCH_FN(sum_exp_target_cuda));
  m.impl("wce_logit_grad", TORCH_FN(logit_grad_cuda));
}

}  // namespace wce
}  // namespace megatron_zero
#endif  // WITH_CUDA

// An empty Python module, so that `import <TORCH_EXTENSION_NAME>` (the setup.py build) loads the library
// and with it the op registrations above.  The JIT build loads the library with torch.ops.load_library.
#define MZ_CONCAT_IMPL(a, b) a##b
#define MZ_CONCAT(a, b) MZ_CONCAT_IMPL(a, b)
#define MZ_STRINGIFY_IMPL(a) #a
#define MZ_STRINGIFY(a) MZ_STRINGIFY_IMPL(a)
extern "C" PyMODINIT_FUNC MZ_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, MZ_STRINGIFY(TORCH_EXTENSION_NAME), nullptr, -1,
                                          nullptr};
  return PyModule_Create(&module_def);
}
