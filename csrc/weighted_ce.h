// Per-row math of the weighted cross-entropy over a vocab-parallel logits shard.
//
// One row = the logits of one token over this tensor-parallel rank's slice of the vocabulary,
// [vocab_start, vocab_start + shard_vocab).  The loss of a row, after the TP all-reduces, is
//
//     global_max = max over all shards of partial_max(row)
//     sum_exp    = sum over all shards of partial_sum_exp(row, global_max)
//     lse        = global_max + log(sum_exp)
//     loss       = weight * (lse - target_logit) / norm      (target_logit from the one shard that owns it)
//
// and its gradient with respect to one logit x_v of the shard is
//
//     d loss / d x_v = grad_out * weight / norm * (exp(x_v - lse) - [v == target]).
//
// Every function is `__host__ __device__`, so the CUDA kernels (weighted_ce_kernel.cu) and the CPU
// extension (weighted_ce_cpu.cpp) run exactly the same arithmetic, and CI can test the CPU build.
// The partial reductions are strided: a CPU loop calls them with (begin=0, step=1), a CUDA thread with
// (threadIdx.x, blockDim.x) before a block reduction.  Logits may be float, half or bfloat16; all
// arithmetic is float32.  This header includes no torch headers; under nvcc it includes CUDA's half and
// bfloat16 headers for the explicit conversions below (torch's extension builds pass
// -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__, which remove the implicit ones).
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define MZ_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MZ_HOST_DEVICE inline
#endif

namespace megatron_zero {
namespace wce {

// Element <-> float32 conversions.  float and the CPU extension's c10::Half / c10::BFloat16 convert with a cast;
// CUDA's __half / __nv_bfloat16 through their intrinsics, which work with or without the implicit conversions.
template <typename T>
struct Convert {
  static MZ_HOST_DEVICE float to_float(T x) { return static_cast<float>(x); }
  static MZ_HOST_DEVICE T from_float(float x) { return static_cast<T>(x); }
};
#if defined(__CUDACC__)
template <>
struct Convert<__half> {
  static MZ_HOST_DEVICE float to_float(__half x) { return __half2float(x); }
  static MZ_HOST_DEVICE __half from_float(float x) { return __float2half(x); }
};
template <>
struct Convert<__nv_bfloat16> {
  static MZ_HOST_DEVICE float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static MZ_HOST_DEVICE __nv_bfloat16 from_float(float x) { return __float2bfloat16(x); }
};
#endif

template <typename T>
MZ_HOST_DEVICE float to_float(T x) {
  return Convert<T>::to_float(x);
}
template <typename T>
MZ_HOST_DEVICE T from_float(float x) {
  return Convert<T>::from_float(x);
}

// Maximum of row[begin], row[begin + step], ... below `end`; -inf for an empty range.
template <typename T>
MZ_HOST_DEVICE float partial_max(const T* row, int64_t begin, int64_t end, int64_t step) {
  float m = -INFINITY;
  for (int64_t v = begin; v < end; v += step) {
    m = fmaxf(m, to_float(row[v]));
  }
  return m;
}

// Sum of exp(row[v] - global_max) over the strided range; global_max is the max over ALL shards.
template <typename T>
MZ_HOST_DEVICE float partial_sum_exp(const T* row, int64_t begin, int64_t end, int64_t step, float global_max) {
  float s = 0.0f;
  for (int64_t v = begin; v < end; v += step) {
    s += expf(to_float(row[v]) - global_max);
  }
  return s;
}

// Whether the (global) target id falls in this shard's vocabulary range.
MZ_HOST_DEVICE bool target_in_shard(int64_t target, int64_t vocab_start, int64_t shard_vocab) {
  return target >= vocab_start && target < vocab_start + shard_vocab;
}

// The target's logit if this shard owns it, else 0 (the TP all-reduce sums the one non-zero value).
template <typename T>
MZ_HOST_DEVICE float target_logit(const T* row, int64_t target, int64_t vocab_start, int64_t shard_vocab) {
  return target_in_shard(target, vocab_start, shard_vocab) ? to_float(row[target - vocab_start]) : 0.0f;
}

// Gradient of one logit: scale * (softmax(x) - onehot), with scale = grad_out * weight / norm.
MZ_HOST_DEVICE float logit_grad(float logit, float log_sum_exp, bool is_target, float scale) {
  return scale * (expf(logit - log_sum_exp) - (is_target ? 1.0f : 0.0f));
}

}  // namespace wce
}  // namespace megatron_zero
