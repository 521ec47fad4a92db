// Shared helpers of the drllm row ops (CPU and CUDA).
#pragma once

#include <ATen/ATen.h>

namespace drllm {

// True when every dimension after the first is laid out contiguously, so that
// each row x[i] is one contiguous block of bytes (the row stride is free).
inline bool rows_contiguous(const at::Tensor& t) {
  int64_t expected = 1;
  for (int64_t d = t.dim() - 1; d >= 1; --d) {
    if (t.size(d) != 1 && t.stride(d) != expected) return false;
    expected *= t.size(d);
  }
  return true;
}

// Number of elements of one row (product of the sizes after the first).
inline int64_t row_numel(const at::Tensor& t) {
  int64_t n = 1;
  for (int64_t d = 1; d < t.dim(); ++d) n *= t.size(d);
  return n;
}

inline void check_index(const at::Tensor& index, const at::Tensor& like, const char* op) {
  TORCH_CHECK(index.dim() == 1, op, ": index must be 1-D, got ", index.dim(), "-D");
  TORCH_CHECK(index.scalar_type() == at::kLong || index.scalar_type() == at::kInt, op,
              ": index must be int64 or int32, got ", index.scalar_type());
  TORCH_CHECK(index.device() == like.device(), op, ": index is on ", index.device(),
              " but the tensor is on ", like.device());
}

inline void check_rows_tensor(const at::Tensor& t, const char* op) {
  TORCH_CHECK(t.dim() >= 1, op, ": expected a tensor with at least one dimension");
}

inline void check_scatter(const at::Tensor& base, const at::Tensor& index, const at::Tensor& src,
                          const char* op) {
  check_rows_tensor(base, op);
  check_index(index, base, op);
  TORCH_CHECK(src.device() == base.device(), op, ": src is on ", src.device(), " but base is on ",
              base.device());
  TORCH_CHECK(src.scalar_type() == base.scalar_type(), op, ": src dtype ", src.scalar_type(),
              " differs from base dtype ", base.scalar_type());
  TORCH_CHECK(src.dim() == base.dim(), op, ": src and base must have the same number of dimensions");
  TORCH_CHECK(src.size(0) == index.size(0), op, ": src has ", src.size(0), " rows but index has ",
              index.size(0), " entries");
  for (int64_t d = 1; d < base.dim(); ++d) {
    TORCH_CHECK(src.size(d) == base.size(d), op, ": src and base differ in size at dimension ", d);
  }
}

}  // namespace drllm
