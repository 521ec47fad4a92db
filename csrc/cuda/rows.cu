// CUDA kernels of the drllm row ops (schemas and CPU kernels: ../ops.cpp).
//
// gather/scatter copy whole rows with the widest access the layout allows:
// 16-byte (uint4) loads and stores when the row size, the row strides and the
// base pointers are all multiples of 16 bytes, else 8/4/2/1 bytes.
// compact_rows runs one block-wide scan (cub::BlockScan) over the decisions;
// its output size is data dependent, so the host reads the two counts back.

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cub/block/block_scan.cuh>

#include "../rows.h"

namespace drllm {

namespace {

constexpr int kCopyThreads = 256;
constexpr int kScanThreads = 1024;

// dst row dst_rows[j] (or j) <- src row src_rows[j] (or j), for j < n_rows.
template <typename Vec, typename index_t>
__global__ void copy_rows_kernel(const char* __restrict__ src, char* __restrict__ dst,
                                 const index_t* __restrict__ src_rows, const index_t* __restrict__ dst_rows,
                                 int64_t n_rows, int64_t vecs_per_row, int64_t src_stride, int64_t dst_stride,
                                 int64_t src_bound, int64_t dst_bound) {
  for (int64_t j = blockIdx.y; j < n_rows; j += gridDim.y) {
    const int64_t s = src_rows ? static_cast<int64_t>(src_rows[j]) : j;
    const int64_t d = dst_rows ? static_cast<int64_t>(dst_rows[j]) : j;
    CUDA_KERNEL_ASSERT(s >= 0 && s < src_bound);
    CUDA_KERNEL_ASSERT(d >= 0 && d < dst_bound);
    const Vec* sp = reinterpret_cast<const Vec*>(src + s * src_stride);
    Vec* dp = reinterpret_cast<Vec*>(dst + d * dst_stride);
    for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < vecs_per_row;
         k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      dp[k] = sp[k];
    }
  }
}

template <typename index_t>
void launch_copy_rows(const at::Tensor& src, at::Tensor& dst, const index_t* src_rows, const index_t* dst_rows,
                      int64_t n_rows) {
  const int64_t elsize = static_cast<int64_t>(src.element_size());
  const int64_t row_bytes = row_numel(src) * elsize;
  if (n_rows == 0 || row_bytes == 0) return;
  const int64_t src_stride = src.stride(0) * elsize;
  const int64_t dst_stride = dst.stride(0) * elsize;
  const char* sp = static_cast<const char*>(src.const_data_ptr());
  char* dp = static_cast<char*>(dst.data_ptr());
  // Widest power-of-two access that divides every byte offset used.
  const uint64_t bits = static_cast<uint64_t>(row_bytes) | static_cast<uint64_t>(src_stride) |
                        static_cast<uint64_t>(dst_stride) | reinterpret_cast<uintptr_t>(sp) |
                        reinterpret_cast<uintptr_t>(dp);
  int vec = 16;
  while (vec > 1 && (bits % vec) != 0) vec /= 2;
  const int64_t vecs = row_bytes / vec;
  const int64_t bx = std::min<int64_t>((vecs + kCopyThreads - 1) / kCopyThreads, 1024);
  const dim3 grid(static_cast<unsigned>(bx), static_cast<unsigned>(std::min<int64_t>(n_rows, 65535)));
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t sb = src.size(0), db = dst.size(0);
#define DRLLM_LAUNCH(T)                                                                                      \
  copy_rows_kernel<T, index_t><<<grid, kCopyThreads, 0, stream>>>(sp, dp, src_rows, dst_rows, n_rows, vecs, \
                                                                   src_stride, dst_stride, sb, db)
  switch (vec) {
    case 16: DRLLM_LAUNCH(uint4); break;
    case 8: DRLLM_LAUNCH(uint2); break;
    case 4: DRLLM_LAUNCH(uint32_t); break;
    case 2: DRLLM_LAUNCH(uint16_t); break;
    default: DRLLM_LAUNCH(uint8_t); break;
  }
#undef DRLLM_LAUNCH
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
__global__ void compact_rows_kernel(const scalar_t* __restrict__ d, int64_t B, int64_t* __restrict__ p1,
                                    int64_t* __restrict__ p2, int64_t* __restrict__ counts) {
  // Both flags are scanned at once, packed as f1 | f2 << 16 (a block counts at most 1024 rows).
  using Scan = cub::BlockScan<int, kScanThreads>;
  __shared__ typename Scan::TempStorage tmp;
  __shared__ int64_t base1, base2;
  if (threadIdx.x == 0) {
    base1 = 0;
    base2 = 0;
  }
  __syncthreads();
  for (int64_t start = 0; start < B; start += kScanThreads) {
    const int64_t i = start + threadIdx.x;
    int f1 = 0, f2 = 0;
    if (i < B) {
      const float v = static_cast<float>(d[i]);
      f1 = v >= 1.0f;
      f2 = v == 2.0f;
    }
    int prefix, total;
    Scan(tmp).ExclusiveSum(f1 | (f2 << 16), prefix, total);
    if (f1) p1[base1 + (prefix & 0xFFFF)] = i;
    if (f2) p2[base2 + (prefix >> 16)] = i;
    __syncthreads();
    if (threadIdx.x == 0) {
      base1 += total & 0xFFFF;
      base2 += total >> 16;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    counts[0] = base1;
    counts[1] = base2;
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> compact_rows_cuda(const at::Tensor& decisions) {
  TORCH_CHECK(decisions.dim() == 1, "compact_rows: decisions must be 1-D, got ", decisions.dim(), "-D");
  const c10::cuda::CUDAGuard guard(decisions.device());
  const at::Tensor d = decisions.contiguous();
  const int64_t B = d.numel();
  const auto opts = d.options().dtype(at::kLong);
  at::Tensor p1 = at::empty({B}, opts), p2 = at::empty({B}, opts);
  if (B == 0) return {p1, p2};
  at::Tensor counts = at::empty({2}, opts);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_ALL_TYPES_AND3(at::kBool, at::kHalf, at::kBFloat16, d.scalar_type(), "compact_rows_cuda", [&] {
    compact_rows_kernel<scalar_t><<<1, kScanThreads, 0, stream>>>(
        d.const_data_ptr<scalar_t>(), B, p1.data_ptr<int64_t>(), p2.data_ptr<int64_t>(), counts.data_ptr<int64_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor host = counts.cpu();  // synchronises: the output sizes depend on the data
  const int64_t* c = host.const_data_ptr<int64_t>();
  return {p1.narrow(0, 0, c[0]), p2.narrow(0, 0, c[1])};
}

at::Tensor gather_rows_cuda(const at::Tensor& x, const at::Tensor& index) {
  check_rows_tensor(x, "gather_rows");
  check_index(index, x, "gather_rows");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor src = rows_contiguous(x) ? x : x.contiguous();
  const at::Tensor idx = index.contiguous();
  auto sizes = x.sizes().vec();
  sizes[0] = idx.numel();
  at::Tensor out = at::empty(sizes, x.options());
  AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "gather_rows_cuda", [&] {
    launch_copy_rows<index_t>(src, out, idx.const_data_ptr<index_t>(), nullptr, idx.numel());
  });
  return out;
}

void scatter_rows_inplace_cuda(at::Tensor& base, const at::Tensor& index, const at::Tensor& src) {
  check_scatter(base, index, src, "scatter_rows_");
  const c10::cuda::CUDAGuard guard(base.device());
  if (!rows_contiguous(base)) {
    base.index_copy_(0, index.to(at::kLong), src);
    return;
  }
  const at::Tensor s = rows_contiguous(src) ? src : src.contiguous();
  const at::Tensor idx = index.contiguous();
  AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "scatter_rows_cuda", [&] {
    launch_copy_rows<index_t>(s, base, nullptr, idx.const_data_ptr<index_t>(), idx.numel());
  });
}

at::Tensor scatter_rows_cuda(const at::Tensor& base, const at::Tensor& index, const at::Tensor& src) {
  check_scatter(base, index, src, "scatter_rows");
  const c10::cuda::CUDAGuard guard(base.device());
  at::Tensor out = at::empty(base.sizes(), base.options());
  out.copy_(base);  // device-to-device copy, then the rows of src on top
  scatter_rows_inplace_cuda(out, index, src);
  return out;
}

TORCH_LIBRARY_IMPL(drllm, CUDA, m) {
  m.impl("compact_rows", &compact_rows_cuda);
  m.impl("gather_rows", &gather_rows_cuda);
  m.impl("scatter_rows", &scatter_rows_cuda);
  m.impl("scatter_rows_", &scatter_rows_inplace_cuda);
}

}  // namespace drllm
