// CPU implementation of the weighted vocab-parallel cross-entropy ops, on the same per-row math
// (weighted_ce.h) as the CUDA kernels.  Rows are processed in parallel with ATen's thread pool.
// The op schemas are defined in weighted_ce_binding.cpp; this file registers their CPU kernels.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <tuple>

#include "weighted_ce.h"

namespace megatron_zero {
namespace wce {
namespace {

constexpr int64_t kRowsPerTask = 4;  // grain of at::parallel_for: rows are long (a vocab shard)

void check_logits(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2, "weighted_ce: logits must be [rows, shard_vocab], got ", logits.sizes());
  TORCH_CHECK(logits.is_contiguous(), "weighted_ce: logits must be contiguous");
}

void check_row_vector(const at::Tensor& t, const at::Tensor& logits, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == logits.size(0), "weighted_ce: ", name, " must be [", logits.size(0),
              "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "weighted_ce: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous() && t.device() == logits.device(), "weighted_ce: ", name,
              " must be contiguous and on the logits' device");
}

at::Tensor row_max_cpu(const at::Tensor& logits) {
  check_logits(logits);
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  at::Tensor out = at::empty({rows}, logits.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "wce_row_max", [&] {
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    float* m = out.data_ptr<float>();
    at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) m[r] = partial_max(x + r * vocab, 0, vocab, 1);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> sum_exp_target_cpu(const at::Tensor& logits, const at::Tensor& global_max,
                                                      const at::Tensor& target, int64_t vocab_start) {
  check_logits(logits);
  check_row_vector(global_max, logits, at::kFloat, "global_max");
  check_row_vector(target, logits, at::kLong, "target");
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  at::Tensor sum_exp = at::empty({rows}, logits.options().dtype(at::kFloat));
  at::Tensor picked = at::empty({rows}, logits.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "wce_sum_exp_target", [&] {
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    const float* gmax = global_max.const_data_ptr<float>();
    const int64_t* tgt = target.const_data_ptr<int64_t>();
    float* s = sum_exp.data_ptr<float>();
    float* p = picked.data_ptr<float>();
    at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        s[r] = partial_sum_exp(x + r * vocab, 0, vocab, 1, gmax[r]);
        p[r] = target_logit(x + r * vocab, tgt[r], vocab_start, vocab);
      }
    });
  });
  return {sum_exp, picked};
}

at::Tensor logit_grad_cpu(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& lse,
                          const at::Tensor& scale, int64_t vocab_start) {
  check_logits(logits);
  check_row_vector(target, logits, at::kLong, "target");
  check_row_vector(lse, logits, at::kFloat, "lse");
  check_row_vector(scale, logits, at::kFloat, "scale");
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  at::Tensor grad = at::empty_like(logits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "wce_logit_grad", [&] {
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    const int64_t* tgt = target.const_data_ptr<int64_t>();
    const float* l = lse.const_data_ptr<float>();
    const float* sc = scale.const_data_ptr<float>();
    scalar_t* g = grad.data_ptr<scalar_t>();
    at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t local_target = tgt[r] - vocab_start;
        const scalar_t* row = x + r * vocab;
        scalar_t* grad_row = g + r * vocab;
        for (int64_t v = 0; v < vocab; ++v) {
          grad_row[v] = from_float<scalar_t>(logit_grad(to_float(row[v]), l[r], v == local_target, sc[r]));
        }
      }
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(megatron_zero, CPU, m) {
  m.impl("wce_row_max", TORCH_FN(row_max_cpu));
  m.impl("wce_sum_exp_target", TORCH_FN(sum_exp_target_cpu));
  m.impl("wce_logit_grad", TORCH_FN(logit_grad_cpu));
}

}  // namespace wce
}  // namespace megatron_zero
