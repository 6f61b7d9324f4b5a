// concat_project, CUDA kernels: the projection of the feature-axis concatenation of L sources
// without the concatenated buffer (semantics: vlm_kernels/reference/concat_project.py, DESIGN
// §3.2).
//
//   source l: X_l [T, D_l] (rows of any stride, last dim contiguous), weight W [N, K] contiguous,
//   K = sum_l D_l, columns [c_l, c_l + D_l) of W belong to source l; bias [N].
//   out [T, N]            = sum_l X_l W[:, c_l : c_l + D_l]^T + bias   (one GEMM whose K loop walks
//                                                                       the sources' pointers)
//   backward, for dY [T, N] contiguous:
//   grad X_l [T, D_l]     = dY W[:, c_l : c_l + D_l]                   (straight into its tensor)
//   grad W[:, c_l + ..]   = dY^T X_l        (split over T into float32 partials, summed in order)
//   grad bias             = sum over T of dY (row-block partials, summed in order)
//
// One launch walks at most kConcatProjectMaxSources sources (a fixed pointer table passed by
// value). More sources: the forward runs the table in chunks, each chunk but the last adding its
// float32 product into a [T, N] workspace that the next chunk continues from (one rounding, at the
// end); the backward's gradients are per column, so chunks are independent launches over one
// shared weight-partial workspace. float32 runs 3xTF32, bfloat16 / float16 run m16n8k16; float32
// accumulation everywhere. Deterministic: every output element is written by one thread, partials
// are summed in a fixed order, no atomics. Kernels and launchers: concat_project.cu; the same
// source runs on the CPU through the SIMT emulator (namespace vlmk::sim, csrc/sim/).
//
// Torch-free: shared by the CUDA build, the emulator build and the torch glue.
#pragma once

#include <cstdint>

namespace vlmk {

enum class ConcatProjectDtype : int32_t {  // every tensor of the op
  kFloat32 = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
};

constexpr int kConcatProjectMaxSources = 8;  // sources of one launch
constexpr int kConcatProjectBlock = 64;      // output rows / columns per block
constexpr int kConcatProjectDepth = 32;      // reduction step
constexpr int kConcatProjectMaxSplits = 64;  // most T ranges of the weight gradient
constexpr int kConcatProjectMinStepsPerSplit = 4;
constexpr int kConcatProjectBiasRows = 256;  // rows per partial of the bias gradient

struct ConcatProjectSource {
  const void* data;    // X_l [T, D_l]: row r at data + r * row_stride (elements)
  void* grad;          // grad X_l [T, D_l] contiguous (backward), else null
  int64_t width;       // D_l
  int64_t row_stride;  // elements between rows
  int64_t column;      // c_l: the first column of W that multiplies it
  bool vector;         // 16-byte copies possible: data, row_stride and width 16-byte multiples
  bool weight_vector;  // the same for its W columns (weight pointer, K and c_l as well)
};

// The sources of one launch with their prefix tables (filled by concat_project_plan_sources).
struct ConcatProjectSources {
  ConcatProjectSource source[kConcatProjectMaxSources];
  int count;
  // Forward reduction steps of the sources before source l (step_begin[count] = all steps).
  int step_begin[kConcatProjectMaxSources + 1];
  // Backward column blocks (of kConcatProjectBlock) of the sources before source l.
  int block_begin[kConcatProjectMaxSources + 1];
};

struct ConcatProjectParams {
  ConcatProjectSources sources;
  const void* weight;       // [N, K] contiguous
  const void* bias;         // [N] or null (only the last chunk adds it)
  const float* partial_in;  // float32 [T, N] sum of the earlier chunks, or null (first chunk)
  float* partial_out;       // float32 [T, N] to continue in the next chunk, or null (last chunk)
  void* out;                // [T, N] contiguous (last chunk)
  int64_t rows;             // T
  int64_t dim;              // N
  int64_t features;         // K (the weight's row stride)
  ConcatProjectDtype dtype;
};

struct ConcatProjectBwdParams {
  ConcatProjectSources sources;
  const void* grad_out;  // dY [T, N] contiguous
  const void* weight;    // [N, K] contiguous
  bool grad_vector;      // dY rows allow 16-byte copies
  // float32 workspace (concat_project_bwd_workspace_floats): the weight partials
  // [num_splits, N, K], then the bias partials [ceil(T / kConcatProjectBiasRows), N].
  float* workspace;
  void* grad_weight;       // [N, K] contiguous, written by the finishing launch
  void* grad_bias;         // [N], written by the finishing launch
  bool finish;             // the last chunk: sum the partials into grad_weight and grad_bias
  int64_t rows;            // T
  int64_t dim;             // N
  int64_t features;        // K
  int64_t num_splits;      // T ranges of the weight gradient (concat_project_plan_bwd)
  int64_t rows_per_split;  // rows per range, a multiple of kConcatProjectDepth
  ConcatProjectDtype dtype;
};

// Fills the prefix tables of `s` from its sources' widths.
inline void concat_project_plan_sources(ConcatProjectSources& s) {
  s.step_begin[0] = 0;
  s.block_begin[0] = 0;
  for (int l = 0; l < s.count; ++l) {
    const int64_t width = s.source[l].width;
    s.step_begin[l + 1] =
        s.step_begin[l] + static_cast<int>((width + kConcatProjectDepth - 1) / kConcatProjectDepth);
    s.block_begin[l + 1] = s.block_begin[l] + static_cast<int>((width + kConcatProjectBlock - 1) /
                                                               kConcatProjectBlock);
  }
}

// Splits the T reduction of the weight gradient so that its grid (K tiles x N tiles x splits)
// fills about two waves of `num_sms` multiprocessors, each range at least
// kConcatProjectMinStepsPerSplit reduction steps (a range also writes and re-reads a float32
// N x K partial).
inline void concat_project_plan_bwd(ConcatProjectBwdParams& p, int64_t column_blocks, int num_sms) {
  const int64_t depth = kConcatProjectDepth;
  const int64_t tiles = column_blocks * ((p.dim + kConcatProjectBlock - 1) / kConcatProjectBlock);
  int64_t splits = tiles > 0 ? (2 * static_cast<int64_t>(num_sms) + tiles - 1) / tiles : 1;
  const int64_t steps = (p.rows + depth - 1) / depth;
  const int64_t most = steps / kConcatProjectMinStepsPerSplit;
  if (splits > most) splits = most;
  if (splits > kConcatProjectMaxSplits) splits = kConcatProjectMaxSplits;
  if (splits < 1) splits = 1;
  const int64_t steps_per_split = (steps + splits - 1) / splits;
  p.rows_per_split = (steps_per_split > 0 ? steps_per_split : 1) * depth;
  p.num_splits = p.rows > 0 ? (p.rows + p.rows_per_split - 1) / p.rows_per_split : 1;
}

// Floats of workspace the backward launches need.
inline int64_t concat_project_bwd_workspace_floats(const ConcatProjectBwdParams& p) {
  const int64_t row_blocks = (p.rows + kConcatProjectBiasRows - 1) / kConcatProjectBiasRows;
  return p.num_splits * p.dim * p.features + row_blocks * p.dim;
}

// Each returns 0 on success, else a cudaError_t value (the emulator uses the same codes):
// cudaErrorInvalidValue for an unsupported dtype, inconsistent sizes or a missing workspace.
namespace cuda {
int launch_concat_project_fwd(const ConcatProjectParams& params, void* stream);
int launch_concat_project_bwd(const ConcatProjectBwdParams& params, void* stream);
}  // namespace cuda
namespace sim {
int launch_concat_project_fwd(const ConcatProjectParams& params, void* stream);
int launch_concat_project_bwd(const ConcatProjectBwdParams& params, void* stream);
// The emulator's message for a failed launch of this host thread, else CUDA's text for `status`.
const char* concat_project_error_string(int status);
}  // namespace sim

}  // namespace vlmk
