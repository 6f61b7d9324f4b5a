// Compile-time dispatch shared by the image_text_attention forward and backward launchers: binds
// the element type `T` (float, __half, __nv_bfloat16) for an ImageTextAttentionDtype and `kHeadDim`
// for a head dim of 64, 80, 96 or 128; any other value returns cudaErrorInvalidValue from the
// lambda.
#pragma once

#define VLMK_ITA_DTYPE_SWITCH(DTYPE, ...)           \
  [&] {                                             \
    switch (DTYPE) {                                \
      case ImageTextAttentionDtype::kFloat32: {     \
        using T = float;                            \
        return __VA_ARGS__();                       \
      }                                             \
      case ImageTextAttentionDtype::kFloat16: {     \
        using T = __half;                           \
        return __VA_ARGS__();                       \
      }                                             \
      case ImageTextAttentionDtype::kBFloat16: {    \
        using T = __nv_bfloat16;                    \
        return __VA_ARGS__();                       \
      }                                             \
    }                                               \
    return static_cast<int>(cudaErrorInvalidValue); \
  }()

// Compile-time dispatch: binds `constexpr int kHeadDim` for the supported head dims.
#define VLMK_ITA_HEAD_DIM_SWITCH(HEAD_DIM, ...)     \
  [&] {                                             \
    switch (HEAD_DIM) {                             \
      case 64: {                                    \
        constexpr int kHeadDim = 64;                \
        return __VA_ARGS__();                       \
      }                                             \
      case 80: {                                    \
        constexpr int kHeadDim = 80;                \
        return __VA_ARGS__();                       \
      }                                             \
      case 96: {                                    \
        constexpr int kHeadDim = 96;                \
        return __VA_ARGS__();                       \
      }                                             \
      case 128: {                                   \
        constexpr int kHeadDim = 128;               \
        return __VA_ARGS__();                       \
      }                                             \
    }                                               \
    return static_cast<int>(cudaErrorInvalidValue); \
  }()
