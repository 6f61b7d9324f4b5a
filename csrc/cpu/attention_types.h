// Types shared by the declarations of the CPU attention kernels (cpu/image_text_attention.h,
// cpu/perceiver_attention.h).
#pragma once

#include <cstdint>

namespace vlmk {

// Element type of q, k, v, out and the gradients (float16 is converted to float32 by the glue).
enum class AttentionDtype : int32_t { kFloat32 = 0, kBFloat16 = 1 };

// Strides, in elements, of a [B, N, H, Dh] tensor whose last dim is contiguous.
struct TokenStrides {
  int64_t batch;  // between x[b] and x[b + 1]
  int64_t token;  // between x[b, n] and x[b, n + 1]
  int64_t head;   // between x[b, n, h] and x[b, n, h + 1]
};

}  // namespace vlmk
