// concat_project kernels (semantics and params in concat_project.h), on the tensor-core GEMM tiles
// of gemm_tiles.cuh (blocks of 4 warps, 64 x 64 output tiles, reduction steps of 32, double
// buffered, cp.async 16-byte copies where the pointers and row lengths allow, else element copies).
//
// forward: out[T, N] = sum_l X_l W_l^T. Grid (ceil(T / 64), ceil(N / 64)). The reduction steps walk
//   the sources in order, ceil(D_l / 32) steps each (a partial last step is zero-filled, so widths
//   need not be multiples of 32); step s reads A = X_l tile [64 rows][32 features] (row-major,
//   through the source's own row stride) and B = W tile [64 N][32 features] at columns c_l + ..
//   (n-major). Epilogue in float32: + the earlier chunks' partial, then either the partial for the
//   next chunk or + bias and one rounding to the output dtype.
// grad X_l = dY W_l: grid (ceil(T / 64), column blocks of all sources); block column b belongs to
//   source l with block_begin[l] <= b < block_begin[l + 1]. Steps of 32 along N: A = dY tile
//   [64 rows][32 N] (row-major), B = W tile [32 N][64 features] (k-major). Written into grad X_l.
// grad W_l = dY^T X_l: grid (column blocks, ceil(N / 64), splits); split s reduces rows
//   [s * rows_per_split, ...) in steps of 32 into its float32 partial [s, N, K]: A = dY tile
//   [32 rows][64 N] read transposed, B = X_l tile [32 rows][64 features] (k-major). A last kernel
//   sums the partials in split order.
// grad bias (SIMT, small): grid (ceil(N / 128), ceil(T / 256)), a thread sums its column over 256
//   rows into a partial; the partials are summed in order.
// gpu-report: *concat_project_fwd_kernel* tensor_cores
// gpu-report: *concat_project_bwd_input_kernel* tensor_cores
// gpu-report: *concat_project_bwd_weight_kernel* tensor_cores
#include <cstdint>

#include "cuda/concat_project.h"
#include "cuda/gemm_tiles.cuh"

namespace vlmk {
namespace VLMK_GEMM_NAMESPACE {
namespace {

using namespace gemm_tiles;

static_assert(kRows == kConcatProjectBlock && kCols == kConcatProjectBlock &&
                  kDepth == kConcatProjectDepth,
              "the host planning constants must match the GEMM tile");

constexpr int kMaxSources = kConcatProjectMaxSources;

// Offset of row r of a row-major matrix (-1 at and past `rows`: a zero tile row).
struct MatrixRow {
  int64_t rows;
  int64_t row_stride;
  __device__ __forceinline__ int64_t operator()(int64_t r) const {
    return r < rows ? r * row_stride : -1;
  }
};

// The source that holds position `index` of a prefix table (the last l with begin[l] <= index:
// sources of width 0 own no position), with the position its range starts at. Compile-time
// indices only: a dynamic index into the kernel parameters would copy them to local memory.
struct Located {
  ConcatProjectSource source;
  int first;
};

__device__ __forceinline__ Located locate(const ConcatProjectSources& s,
                                          const int (&begin)[kMaxSources + 1], int index) {
  Located at{s.source[0], begin[0]};
#pragma unroll
  for (int l = 1; l < kMaxSources; ++l) {
    if (l < s.count && index >= begin[l]) at = Located{s.source[l], begin[l]};
  }
  return at;
}

template <typename T>
struct FwdStorage {
  static constexpr int kRowA = TileRow<T, kDepth>;
  static constexpr int kRowB = TileRow<T, kDepth>;
  alignas(16) T a[2][kRows][kRowA];  // rows x features (row-major A)
  alignas(16) T b[2][kCols][kRowB];  // N x features (n-major B)
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
    concat_project_fwd_kernel(const __grid_constant__ ConcatProjectParams p) {
  using Storage = FwdStorage<T>;
  VLMK_SHARED(Storage, sm);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.x) * kRows;
  const int col_begin = blockIdx.y * kCols;
  const int dim = static_cast<int>(p.dim);
  const T* weight = static_cast<const T*>(p.weight);
  const MatrixRow weight_row{p.dim, p.features};

  FragC acc[kTilesN];
  zero(acc);
  pipelined_steps(
      p.sources.step_begin[p.sources.count],
      [&](int stage, int step) {
        const Located at = locate(p.sources, p.sources.step_begin, step);
        const ConcatProjectSource& s = at.source;
        const int k0 = (step - at.first) * kDepth;
        const int width = static_cast<int>(s.width);
        const int column = static_cast<int>(s.column);
        copy_tile<T, kRows, kDepth>(&sm.a[stage][0][0], Storage::kRowA,
                                    static_cast<const T*>(s.data), MatrixRow{p.rows, s.row_stride},
                                    row_begin, k0, width, s.vector);
        copy_tile<T, kCols, kDepth>(&sm.b[stage][0][0], Storage::kRowB, weight, weight_row,
                                    col_begin, column + k0, column + width, s.weight_vector);
        tc::cp_async_commit();
      },
      [](int) {},  // both operands come by copy_tile
      [&](int stage) {
        warp_tile_mma<T, false, false>(acc, &sm.a[stage][0][0], Storage::kRowA, &sm.b[stage][0][0],
                                       Storage::kRowB, 16 * warp);
      });

  // Accumulator element (row g + 8 h, column 8 j + 2 t + e) is acc[j].x[2 h + e].
  const int g = lane / 4, t = lane % 4;
  const T* bias = static_cast<const T*>(p.bias);
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t row = row_begin + 16 * warp + g + 8 * h;
    if (row >= p.rows) continue;
#pragma unroll
    for (int j = 0; j < kTilesN; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = col_begin + 8 * j + 2 * t + e;
        if (col >= dim) continue;
        const int64_t at = row * dim + col;
        float value = acc[j].x[2 * h + e];
        // The earlier chunks' sum is read and rewritten by this thread only.
        if (p.partial_in != nullptr) value += p.partial_in[at];
        if (p.partial_out != nullptr) {
          p.partial_out[at] = value;
        } else {
          if (bias != nullptr) value += to_float(bias[col]);
          out[at] = from_float<T>(value);
        }
      }
    }
  }
}

template <typename T>
struct InputGradStorage {
  static constexpr int kRowA = TileRow<T, kDepth>;
  static constexpr int kRowB = TileRow<T, kCols>;
  alignas(16) T dy[2][kRows][kRowA];  // rows x N (row-major A)
  alignas(16) T w[2][kDepth][kRowB];  // N x features (k-major B)
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
    concat_project_bwd_input_kernel(const __grid_constant__ ConcatProjectBwdParams p) {
  using Storage = InputGradStorage<T>;
  VLMK_SHARED(Storage, sm);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.x) * kRows;
  const Located at = locate(p.sources, p.sources.block_begin, static_cast<int>(blockIdx.y));
  const ConcatProjectSource& s = at.source;
  const int col_begin = (static_cast<int>(blockIdx.y) - at.first) * kCols;  // within X_l
  const int width = static_cast<int>(s.width);
  const int column = static_cast<int>(s.column);
  const int dim = static_cast<int>(p.dim);
  const T* grad_out = static_cast<const T*>(p.grad_out);
  const T* weight = static_cast<const T*>(p.weight);
  const MatrixRow grad_row{p.rows, p.dim};
  const MatrixRow weight_row{p.dim, p.features};

  FragC acc[kTilesN];
  zero(acc);
  pipelined_steps((dim + kDepth - 1) / kDepth,
                  [&](int stage, int step) {
                    copy_tile<T, kRows, kDepth>(&sm.dy[stage][0][0], Storage::kRowA, grad_out,
                                                grad_row, row_begin, step * kDepth, dim,
                                                p.grad_vector);
                    copy_tile<T, kDepth, kCols>(&sm.w[stage][0][0], Storage::kRowB, weight,
                                                weight_row, step * kDepth, column + col_begin,
                                                column + width, s.weight_vector);
                    tc::cp_async_commit();
                  },
                  [](int) {},
                  [&](int stage) {
                    warp_tile_mma<T, false, true>(acc, &sm.dy[stage][0][0], Storage::kRowA,
                                                  &sm.w[stage][0][0], Storage::kRowB, 16 * warp);
                  });

  // Accumulator element (row g + 8 h, feature column 8 j + 2 t + e) is acc[j].x[2 h + e].
  const int g = lane / 4, t = lane % 4;
  T* grad = static_cast<T*>(s.grad);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t row = row_begin + 16 * warp + g + 8 * h;
    if (row >= p.rows) continue;
#pragma unroll
    for (int j = 0; j < kTilesN; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = col_begin + 8 * j + 2 * t + e;
        if (col < width) grad[row * width + col] = from_float<T>(acc[j].x[2 * h + e]);
      }
    }
  }
}

template <typename T>
struct WeightGradStorage {
  static constexpr int kRowA = TileRow<T, kRows>;
  static constexpr int kRowB = TileRow<T, kCols>;
  alignas(16) T dy[2][kDepth][kRowA];  // rows x N (read as A^T)
  alignas(16) T x[2][kDepth][kRowB];   // rows x features (k-major B)
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
    concat_project_bwd_weight_kernel(const __grid_constant__ ConcatProjectBwdParams p) {
  using Storage = WeightGradStorage<T>;
  VLMK_SHARED(Storage, sm);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const Located at = locate(p.sources, p.sources.block_begin, static_cast<int>(blockIdx.x));
  const ConcatProjectSource& s = at.source;
  const int col_begin = (static_cast<int>(blockIdx.x) - at.first) * kCols;  // within X_l
  const int width = static_cast<int>(s.width);
  const int dim = static_cast<int>(p.dim);
  const int n_begin = blockIdx.y * kRows;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.z) * p.rows_per_split;
  const int64_t row_end = min(p.rows, row_begin + p.rows_per_split);
  const T* grad_out = static_cast<const T*>(p.grad_out);
  const T* x = static_cast<const T*>(s.data);
  const MatrixRow grad_row{row_end, p.dim};
  const MatrixRow x_row{row_end, s.row_stride};

  FragC acc[kTilesN];
  zero(acc);
  pipelined_steps(
      static_cast<int>((row_end - row_begin + kDepth - 1) / kDepth),
      [&](int stage, int step) {
        const int64_t first = row_begin + static_cast<int64_t>(step) * kDepth;
        copy_tile<T, kDepth, kRows>(&sm.dy[stage][0][0], Storage::kRowA, grad_out, grad_row, first,
                                    n_begin, dim, p.grad_vector);
        copy_tile<T, kDepth, kCols>(&sm.x[stage][0][0], Storage::kRowB, x, x_row, first, col_begin,
                                    width, s.vector);
        tc::cp_async_commit();
      },
      [](int) {},
      [&](int stage) {
        warp_tile_mma<T, true, true>(acc, &sm.dy[stage][0][0], Storage::kRowA, &sm.x[stage][0][0],
                                     Storage::kRowB, 16 * warp);
      });

  // Accumulator element (N row g + 8 h, feature column 8 j + 2 t + e) is acc[j].x[2 h + e].
  const int g = lane / 4, t = lane % 4;
  float* partial = p.workspace + static_cast<int64_t>(blockIdx.z) * p.dim * p.features + s.column;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int n = n_begin + 16 * warp + g + 8 * h;
    if (n >= dim) continue;
#pragma unroll
    for (int j = 0; j < kTilesN; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = col_begin + 8 * j + 2 * t + e;
        if (col < width) partial[n * p.features + col] = acc[j].x[2 * h + e];
      }
    }
  }
}

constexpr int kReduceThreads = 128;

// bias_parts[row block, n] = sum of grad_out[r, n] over the block's kConcatProjectBiasRows rows.
template <typename T>
__global__ void __launch_bounds__(kReduceThreads)
    concat_project_bwd_bias_kernel(const __grid_constant__ ConcatProjectBwdParams p,
                                   float* bias_parts) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kReduceThreads + threadIdx.x;
  if (n >= p.dim) return;
  const T* grad_out = static_cast<const T*>(p.grad_out);
  const int64_t row_begin = static_cast<int64_t>(blockIdx.y) * kConcatProjectBiasRows;
  const int64_t row_end = min(p.rows, row_begin + kConcatProjectBiasRows);
  float sum = 0.0f;
  for (int64_t r = row_begin; r < row_end; ++r) sum += to_float(grad_out[r * p.dim + n]);
  bias_parts[blockIdx.y * p.dim + n] = sum;
}

// out[i] = sum_s parts[s * count + i] over s in order, rounded once to T.
template <typename T>
__global__ void __launch_bounds__(kReduceThreads)
    concat_project_sum_partials_kernel(const float* parts, int64_t num_parts, int64_t count,
                                       T* out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kReduceThreads + threadIdx.x;
  if (i >= count) return;
  float sum = 0.0f;
  for (int64_t s = 0; s < num_parts; ++s) sum += parts[s * count + i];
  out[i] = from_float<T>(sum);
}

template <typename T>
int launch_sum(const float* parts, int64_t num_parts, int64_t count, void* out,
               cudaStream_t stream) {
  const int64_t blocks = (count + kReduceThreads - 1) / kReduceThreads;
  if (blocks == 0) return 0;
  if (blocks > 0x7fffffff) return static_cast<int>(cudaErrorInvalidConfiguration);
  return static_cast<int>(VLMK_LAUNCH((concat_project_sum_partials_kernel<T>),
                                      dim3(static_cast<unsigned>(blocks)), dim3(kReduceThreads), 0,
                                      stream, parts, num_parts, count, static_cast<T*>(out)));
}

template <typename T>
int launch_fwd_typed(const ConcatProjectParams& p, cudaStream_t stream) {
  const int64_t row_blocks = (p.rows + kRows - 1) / kRows;
  const int64_t col_blocks = (p.dim + kCols - 1) / kCols;
  if (row_blocks > 0x7fffffff || col_blocks > 65535) {
    return static_cast<int>(cudaErrorInvalidConfiguration);
  }
  const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(col_blocks));
  return static_cast<int>(
      VLMK_LAUNCH((concat_project_fwd_kernel<T>), grid, dim3(kThreads), 0, stream, p));
}

template <typename T>
int launch_bwd_typed(const ConcatProjectBwdParams& p, cudaStream_t stream) {
  const int64_t row_blocks = (p.rows + kRows - 1) / kRows;
  const int64_t column_blocks = p.sources.block_begin[p.sources.count];
  const int64_t dim_blocks = (p.dim + kRows - 1) / kRows;
  if (row_blocks > 0x7fffffff || column_blocks > 65535 || dim_blocks > 65535) {
    return static_cast<int>(cudaErrorInvalidConfiguration);
  }
  cudaError_t status = cudaSuccess;
  if (column_blocks > 0) {
    status =
        VLMK_LAUNCH((concat_project_bwd_input_kernel<T>),
                    dim3(static_cast<unsigned>(row_blocks), static_cast<unsigned>(column_blocks)),
                    dim3(kThreads), 0, stream, p);
    if (status != cudaSuccess) return static_cast<int>(status);
    status =
        VLMK_LAUNCH((concat_project_bwd_weight_kernel<T>),
                    dim3(static_cast<unsigned>(column_blocks), static_cast<unsigned>(dim_blocks),
                         static_cast<unsigned>(p.num_splits)),
                    dim3(kThreads), 0, stream, p);
    if (status != cudaSuccess) return static_cast<int>(status);
  }
  if (!p.finish) return 0;
  // Every chunk's weight partials are queued before this (same stream): sum them, then the bias.
  const int64_t weight_floats = p.num_splits * p.dim * p.features;
  int result = launch_sum<T>(p.workspace, p.num_splits, p.dim * p.features, p.grad_weight, stream);
  if (result != 0) return result;
  const int64_t bias_blocks = (p.rows + kConcatProjectBiasRows - 1) / kConcatProjectBiasRows;
  const int64_t n_blocks = (p.dim + kReduceThreads - 1) / kReduceThreads;
  if (bias_blocks > 65535 || n_blocks > 0x7fffffff) {
    return static_cast<int>(cudaErrorInvalidConfiguration);
  }
  float* bias_parts = p.workspace + weight_floats;
  status = VLMK_LAUNCH((concat_project_bwd_bias_kernel<T>),
                       dim3(static_cast<unsigned>(n_blocks), static_cast<unsigned>(bias_blocks)),
                       dim3(kReduceThreads), 0, stream, p, bias_parts);
  if (status != cudaSuccess) return static_cast<int>(status);
  return launch_sum<T>(bias_parts, bias_blocks, p.dim, p.grad_bias, stream);
}

// Binds `T` (float, __half, __nv_bfloat16) for a ConcatProjectDtype; another value returns
// cudaErrorInvalidValue.
template <typename Fn>
int dtype_switch(ConcatProjectDtype dtype, const Fn& fn) {
  switch (dtype) {
    case ConcatProjectDtype::kFloat32:
      return fn(float{});
    case ConcatProjectDtype::kFloat16:
      return fn(__half{});
    case ConcatProjectDtype::kBFloat16:
      return fn(__nv_bfloat16{});
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

// Features, columns and widths are int in the kernels.
constexpr int64_t kIndexLimit = int64_t{1} << 30;

// The source table is consistent with K: 1..8 sources inside the weight's columns, their prefix
// tables as concat_project_plan_sources fills them, 16-byte flags that hold.
bool valid_sources(const ConcatProjectSources& s, int64_t features, int64_t element_bytes,
                   bool backward) {
  if (s.count < 1 || s.count > kMaxSources || s.step_begin[0] != 0 || s.block_begin[0] != 0) {
    return false;
  }
  for (int l = 0; l < s.count; ++l) {
    const ConcatProjectSource& src = s.source[l];
    if (src.width < 0 || src.width > kIndexLimit || src.column < 0 ||
        src.column + src.width > features || (src.width > 0 && src.data == nullptr) ||
        (backward && src.width > 0 && src.grad == nullptr)) {
      return false;
    }
    if (s.step_begin[l + 1] - s.step_begin[l] != (src.width + kDepth - 1) / kDepth ||
        s.block_begin[l + 1] - s.block_begin[l] != (src.width + kCols - 1) / kCols) {
      return false;
    }
    const auto aligned = [&](const void* ptr, int64_t elements) {
      return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && (elements * element_bytes) % 16 == 0;
    };
    if (src.vector && !(aligned(src.data, src.row_stride) && aligned(src.data, src.width))) {
      return false;
    }
    if (src.weight_vector &&
        !((src.column * element_bytes) % 16 == 0 && (src.width * element_bytes) % 16 == 0 &&
          (features * element_bytes) % 16 == 0)) {
      return false;
    }
  }
  return true;
}

int64_t element_bytes(ConcatProjectDtype dtype) {
  return dtype == ConcatProjectDtype::kFloat32 ? 4 : 2;
}

}  // namespace

int launch_concat_project_fwd(const ConcatProjectParams& params, void* stream) {
  const ConcatProjectParams& p = params;
  if (p.rows < 0 || p.dim < 0 || p.features < 0 || p.dim > kIndexLimit ||
      p.features > kIndexLimit || (p.features > 0 && p.weight == nullptr) ||
      (p.partial_out == nullptr && p.out == nullptr) ||
      !valid_sources(p.sources, p.features, element_bytes(p.dtype), false)) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  if (p.rows == 0 || p.dim == 0) return 0;
  const cudaStream_t cuda_stream = static_cast<cudaStream_t>(stream);
  return dtype_switch(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    return launch_fwd_typed<T>(p, cuda_stream);
  });
}

int launch_concat_project_bwd(const ConcatProjectBwdParams& params, void* stream) {
  const ConcatProjectBwdParams& p = params;
  if (p.rows < 0 || p.dim < 0 || p.features < 0 || p.dim > kIndexLimit ||
      p.features > kIndexLimit || p.num_splits < 1 || p.num_splits > kConcatProjectMaxSplits ||
      p.rows_per_split < 1 || p.rows_per_split % kConcatProjectDepth != 0 ||
      p.num_splits * p.rows_per_split < p.rows ||
      !valid_sources(p.sources, p.features, element_bytes(p.dtype), true)) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  // No grad_out element: every gradient is zero, which the caller fills (nothing is launched).
  if (p.rows == 0 || p.dim == 0) return 0;
  if (p.workspace == nullptr || p.grad_out == nullptr || (p.features > 0 && p.weight == nullptr) ||
      (p.finish && ((p.features > 0 && p.grad_weight == nullptr) || p.grad_bias == nullptr))) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  const cudaStream_t cuda_stream = static_cast<cudaStream_t>(stream);
  return dtype_switch(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    return launch_bwd_typed<T>(p, cuda_stream);
  });
}

}  // namespace VLMK_GEMM_NAMESPACE
}  // namespace vlmk
