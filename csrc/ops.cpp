// drllm._C: row-compaction ops of the routed runtime, registered with the
// PyTorch dispatcher (TORCH_LIBRARY) so they are reachable as torch.ops.drllm.*
// and work under torch.compile through the fake implementations registered in
// drllm/_ext.py.
//
//   compact_rows(decisions[B]) -> (pass1 idx, pass2 idx)  int64, ascending
//   gather_rows(x, index)       -> x[index] as a new contiguous tensor
//   scatter_rows(base, index, src) -> copy of base with rows index <- src
//   scatter_rows_(base!, index, src)  the same, in place
//
// This file holds the schemas and the CPU kernels (at::parallel_for); the CUDA
// kernels live in cuda/rows.cu and are compiled only when torch has CUDA.

#include <Python.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "rows.h"

extern "C" {
// An empty Python module so that `import drllm._C` loads this library, whose
// static initialisers register the operators (pattern of pytorch/extension-cpp).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "drllm row-compaction ops (see torch.ops.drllm)", -1, nullptr,
  };
  return PyModule_Create(&module_def);
}
}

namespace drllm {

namespace {

// Rows per task so that one task moves at least ~64 KiB.
inline int64_t grain_for(int64_t row_bytes) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(row_bytes, 1));
}

template <typename index_t>
void check_bounds(const index_t* idx, int64_t n, int64_t bound, const char* op) {
  for (int64_t j = 0; j < n; ++j) {
    const int64_t i = static_cast<int64_t>(idx[j]);
    TORCH_CHECK(i >= 0 && i < bound, op, ": index ", i, " is out of bounds for ", bound, " rows");
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> compact_rows_cpu(const at::Tensor& decisions) {
  TORCH_CHECK(decisions.dim() == 1, "compact_rows: decisions must be 1-D, got ", decisions.dim(), "-D");
  const at::Tensor d = decisions.contiguous();
  const int64_t B = d.numel();
  const auto opts = d.options().dtype(at::kLong);
  at::Tensor p1, p2;
  AT_DISPATCH_ALL_TYPES_AND3(at::kBool, at::kHalf, at::kBFloat16, d.scalar_type(), "compact_rows_cpu", [&] {
    const scalar_t* x = d.const_data_ptr<scalar_t>();
    constexpr int64_t kGrain = int64_t{1} << 15;
    const int64_t nchunks = (B + kGrain - 1) / kGrain;
    // pass 1: counts per chunk; pass 2: each chunk writes at its exclusive prefix.
    std::vector<int64_t> c1(nchunks + 1, 0), c2(nchunks + 1, 0);
    at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        int64_t n1 = 0, n2 = 0;
        const int64_t end = std::min(B, (c + 1) * kGrain);
        for (int64_t i = c * kGrain; i < end; ++i) {
          const double v = static_cast<double>(x[i]);
          n1 += v >= 1.0;
          n2 += v == 2.0;
        }
        c1[c + 1] = n1;
        c2[c + 1] = n2;
      }
    });
    for (int64_t c = 0; c < nchunks; ++c) {
      c1[c + 1] += c1[c];
      c2[c + 1] += c2[c];
    }
    p1 = at::empty({c1[nchunks]}, opts);
    p2 = at::empty({c2[nchunks]}, opts);
    int64_t* o1 = p1.data_ptr<int64_t>();
    int64_t* o2 = p2.data_ptr<int64_t>();
    at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        int64_t k1 = c1[c], k2 = c2[c];
        const int64_t end = std::min(B, (c + 1) * kGrain);
        for (int64_t i = c * kGrain; i < end; ++i) {
          const double v = static_cast<double>(x[i]);
          if (v >= 1.0) o1[k1++] = i;
          if (v == 2.0) o2[k2++] = i;
        }
      }
    });
  });
  return {p1, p2};
}

at::Tensor gather_rows_cpu(const at::Tensor& x, const at::Tensor& index) {
  check_rows_tensor(x, "gather_rows");
  check_index(index, x, "gather_rows");
  const at::Tensor src = rows_contiguous(x) ? x : x.contiguous();
  const at::Tensor idx = index.contiguous();
  const int64_t n = idx.numel();
  auto sizes = x.sizes().vec();
  sizes[0] = n;
  at::Tensor out = at::empty(sizes, x.options());
  const int64_t elsize = static_cast<int64_t>(x.element_size());
  const int64_t row_bytes = row_numel(x) * elsize;
  if (n == 0 || row_bytes == 0) return out;
  const int64_t src_stride = src.stride(0) * elsize;
  const char* sp = static_cast<const char*>(src.const_data_ptr());
  char* dp = static_cast<char*>(out.data_ptr());
  AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "gather_rows_cpu", [&] {
    const index_t* ip = idx.const_data_ptr<index_t>();
    check_bounds(ip, n, x.size(0), "gather_rows");
    at::parallel_for(0, n, grain_for(row_bytes), [&](int64_t b, int64_t e) {
      for (int64_t j = b; j < e; ++j) {
        std::memcpy(dp + j * row_bytes, sp + static_cast<int64_t>(ip[j]) * src_stride, row_bytes);
      }
    });
  });
  return out;
}

at::Tensor scatter_rows_cpu(const at::Tensor& base, const at::Tensor& index, const at::Tensor& src) {
  check_scatter(base, index, src, "scatter_rows");
  const at::Tensor b = rows_contiguous(base) ? base : base.contiguous();
  const at::Tensor s = rows_contiguous(src) ? src : src.contiguous();
  const at::Tensor idx = index.contiguous();
  const int64_t B = base.size(0);
  const int64_t n = idx.numel();
  at::Tensor out = at::empty(base.sizes(), base.options());
  const int64_t elsize = static_cast<int64_t>(base.element_size());
  const int64_t row_bytes = row_numel(base) * elsize;
  if (B == 0 || row_bytes == 0) return out;
  // One pass over the output: row r comes from src[inv[r]] when r is in index
  // (the last occurrence wins, as in a sequential index_copy) or else base[r].
  std::vector<int64_t> inv(B, -1);
  AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "scatter_rows_cpu", [&] {
    const index_t* ip = idx.const_data_ptr<index_t>();
    check_bounds(ip, n, B, "scatter_rows");
    for (int64_t j = 0; j < n; ++j) inv[static_cast<int64_t>(ip[j])] = j;
  });
  const char* bp = static_cast<const char*>(b.const_data_ptr());
  const char* sp = static_cast<const char*>(s.const_data_ptr());
  char* op = static_cast<char*>(out.data_ptr());
  const int64_t b_stride = b.stride(0) * elsize;
  const int64_t s_stride = s.stride(0) * elsize;
  at::parallel_for(0, B, grain_for(row_bytes), [&](int64_t rb, int64_t re) {
    for (int64_t r = rb; r < re; ++r) {
      const char* from = inv[r] >= 0 ? sp + inv[r] * s_stride : bp + r * b_stride;
      std::memcpy(op + r * row_bytes, from, row_bytes);
    }
  });
  return out;
}

void scatter_rows_inplace_cpu(at::Tensor& base, const at::Tensor& index, const at::Tensor& src) {
  check_scatter(base, index, src, "scatter_rows_");
  if (!rows_contiguous(base)) {  // rows are not byte blocks: let ATen handle the strides
    base.index_copy_(0, index.to(at::kLong), src);
    return;
  }
  const at::Tensor s = rows_contiguous(src) ? src : src.contiguous();
  const at::Tensor idx = index.contiguous();
  const int64_t n = idx.numel();
  const int64_t elsize = static_cast<int64_t>(base.element_size());
  const int64_t row_bytes = row_numel(base) * elsize;
  if (n == 0 || row_bytes == 0) return;
  const char* sp = static_cast<const char*>(s.const_data_ptr());
  char* bp = static_cast<char*>(base.data_ptr());
  const int64_t b_stride = base.stride(0) * elsize;
  const int64_t s_stride = s.stride(0) * elsize;
  AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "scatter_rows_inplace_cpu", [&] {
    const index_t* ip = idx.const_data_ptr<index_t>();
    check_bounds(ip, n, base.size(0), "scatter_rows_");
    at::parallel_for(0, n, grain_for(row_bytes), [&](int64_t jb, int64_t je) {
      for (int64_t j = jb; j < je; ++j) {
        std::memcpy(bp + static_cast<int64_t>(ip[j]) * b_stride, sp + j * s_stride, row_bytes);
      }
    });
  });
}

TORCH_LIBRARY(drllm, m) {
  m.def("compact_rows(Tensor decisions) -> (Tensor, Tensor)");
  m.def("gather_rows(Tensor x, Tensor index) -> Tensor");
  m.def("scatter_rows(Tensor base, Tensor index, Tensor src) -> Tensor");
  m.def("scatter_rows_(Tensor(a!) base, Tensor index, Tensor src) -> ()");
}

TORCH_LIBRARY_IMPL(drllm, CPU, m) {
  m.impl("compact_rows", &compact_rows_cpu);
  m.impl("gather_rows", &gather_rows_cpu);
  m.impl("scatter_rows", &scatter_rows_cpu);
  m.impl("scatter_rows_", &scatter_rows_inplace_cpu);
}

}  // namespace drllm
