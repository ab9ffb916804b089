// Host entry points of the CUDA kernels in weighted_ce_kernel.cu.
//
// Plain pointers and a `void*` CUDA stream, so this header needs neither torch nor CUDA headers: the
// kernel file compiles standalone with nvcc, and weighted_ce_binding.cpp (built by setup.py's
// CUDAExtension with -DWITH_CUDA) maps torch tensors onto these calls.  Each returns the launch's
// cudaError_t as an int (0 = cudaSuccess).  Logits are row-major [rows, shard_vocab].
#pragma once

#include <stdint.h>

namespace megatron_zero {
namespace wce {

enum class LogitsDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// row_max[r] = max_v logits[r, v]
int launch_row_max(LogitsDtype dtype, const void* logits, int64_t rows, int64_t shard_vocab, float* row_max,
                   void* stream);

// sum_exp[r] = sum_v exp(logits[r, v] - global_max[r]);  target_logit[r] = logits[r, target[r] - vocab_start] or 0
int launch_sum_exp_target(LogitsDtype dtype, const void* logits, const int64_t* target, const float* global_max,
                          int64_t rows, int64_t shard_vocab, int64_t vocab_start, float* sum_exp,
                          float* target_logit, void* stream);

// grad[r, v] = scale[r] * (exp(logits[r, v] - lse[r]) - [v + vocab_start == target[r]]), stored in the logits dtype
int launch_logit_grad(LogitsDtype dtype, const void* logits, const int64_t* target, const float* lse,
                      const float* scale, int64_t rows, int64_t shard_vocab, int64_t vocab_start, void* grad,
                      void* stream);

}  // namespace wce
}  // namespace megatron_zero
