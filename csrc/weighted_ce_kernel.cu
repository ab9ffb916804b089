// CUDA kernels of the weighted vocab-parallel cross-entropy: one thread block per row (token).
//
// The per-row math lives in weighted_ce.h (shared with the CPU extension); this file only adds the
// block-level reductions and the launchers declared in weighted_ce_cuda.h.  No torch headers: it
// compiles standalone, e.g. `nvcc -c -arch=sm_90 -Icsrc csrc/weighted_ce_kernel.cu`.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "weighted_ce.h"
#include "weighted_ce_cuda.h"

namespace megatron_zero {
namespace wce {
namespace {

constexpr int kThreads = 512;  // threads per block; a multiple of the warp size
constexpr unsigned kFullMask = 0xffffffffu;

struct MaxOp {
  static constexpr float kIdentity = -INFINITY;
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct SumOp {
  static constexpr float kIdentity = 0.0f;
  __device__ float operator()(float a, float b) const { return a + b; }
};

// Reduces one value per thread to a value every thread of the block receives.
template <typename Op>
__device__ float block_reduce(float value, Op op) {
  __shared__ float warp_partials[kThreads / 32];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  for (int offset = 16; offset > 0; offset /= 2) value = op(value, __shfl_down_sync(kFullMask, value, offset));
  if (lane == 0) warp_partials[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = lane < blockDim.x / 32 ? warp_partials[lane] : Op::kIdentity;
    for (int offset = 16; offset > 0; offset /= 2) value = op(value, __shfl_down_sync(kFullMask, value, offset));
    if (lane == 0) warp_partials[0] = value;
  }
  __syncthreads();
  const float result = warp_partials[0];
  __syncthreads();  // warp_partials may be reused by a following reduction
  return result;
}

template <typename T>
__global__ void row_max_kernel(const T* __restrict__ logits, int64_t shard_vocab, float* __restrict__ row_max) {
  const T* row = logits + static_cast<int64_t>(blockIdx.x) * shard_vocab;
  const float m = block_reduce(partial_max(row, threadIdx.x, shard_vocab, blockDim.x), MaxOp());
  if (threadIdx.x == 0) row_max[blockIdx.x] = m;
}

template <typename T>
__global__ void sum_exp_target_kernel(const T* __restrict__ logits, const int64_t* __restrict__ target,
                                      const float* __restrict__ global_max, int64_t shard_vocab, int64_t vocab_start,
                                      float* __restrict__ sum_exp, float* __restrict__ target_logit_out) {
  const int64_t r = blockIdx.x;
  const T* row = logits + r * shard_vocab;
  const float s = block_reduce(partial_sum_exp(row, threadIdx.x, shard_vocab, blockDim.x, global_max[r]), SumOp());
  if (threadIdx.x == 0) {
    sum_exp[r] = s;
    target_logit_out[r] = target_logit(row, target[r], vocab_start, shard_vocab);
  }
}

template <typename T>
__global__ void logit_grad_kernel(const T* __restrict__ logits, const int64_t* __restrict__ target,
                                  const float* __restrict__ lse, const float* __restrict__ scale, int64_t shard_vocab,
                                  int64_t vocab_start, T* __restrict__ grad) {
  const int64_t r = blockIdx.x;
  const T* row = logits + r * shard_vocab;
  T* grad_row = grad + r * shard_vocab;
  const int64_t local_target = target[r] - vocab_start;
  const float row_lse = lse[r];
  const float row_scale = scale[r];
  for (int64_t v = threadIdx.x; v < shard_vocab; v += blockDim.x) {
    grad_row[v] = from_float<T>(logit_grad(to_float(row[v]), row_lse, v == local_target, row_scale));
  }
}

// Calls fn(T{}) with the CUDA element type matching `dtype`.
template <typename Fn>
int dispatch(LogitsDtype dtype, Fn fn) {
  switch (dtype) {
    case LogitsDtype::kFloat32:
      fn(float{});
      break;
    case LogitsDtype::kFloat16:
      fn(__half{});
      break;
    case LogitsDtype::kBFloat16:
      fn(__nv_bfloat16{});
      break;
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int launch_row_max(LogitsDtype dtype, const void* logits, int64_t rows, int64_t shard_vocab, float* row_max,
                   void* stream) {
  if (rows == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    row_max_kernel<T><<<rows, kThreads, 0, s>>>(static_cast<const T*>(logits), shard_vocab, row_max);
  });
}

int launch_sum_exp_target(LogitsDtype dtype, const void* logits, const int64_t* target, const float* global_max,
                          int64_t rows, int64_t shard_vocab, int64_t vocab_start, float* sum_exp,
                          float* target_logit_out, void* stream) {
  if (rows == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    sum_exp_target_kernel<T><<<rows, kThreads, 0, s>>>(static_cast<const T*>(logits), target, global_max,
                                                        shard_vocab, vocab_start, sum_exp, target_logit_out);
  });
}

int launch_logit_grad(LogitsDtype dtype, const void* logits, const int64_t* target, const float* lse,
                      const float* scale, int64_t rows, int64_t shard_vocab, int64_t vocab_start, void* grad,
                      void* stream) {
  if (rows == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    logit_grad_kernel<T><<<rows, kThreads, 0, s>>>(static_cast<const T*>(logits), target, lse, scale, shard_vocab,
                                                    vocab_start, static_cast<T*>(grad));
  });
}

}  // namespace wce
}  // namespace megatron_zero
