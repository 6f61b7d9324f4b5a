// perceiver_tiles.cuh — the two key/value segments of perceiver_attention as one walk of K/V tiles,
// shared by the forward and the dq kernels (torch-free; compiled for the GPU in namespace
// vlmk::cuda and, with VLMK_SIMT, for the emulator in vlmk::sim, like attention_tiles.cuh).
//
//   PerceiverSegments<T, kBlockN, kHeadDim>(p, batch, kv_head)
//       tiles [0, media_tiles) hold kBlockN keys of the media segment each, tiles [media_tiles,
//       tiles) those of the latent segment: the keys of [media ; latents], read where they lie.
//   segments.load(tile, k_s, v_s, ld, async)
//       that tile's keys and values into shared rows (rows past the segment's end become zeros).
//   segments.keys(tile, padding, mask_stride)
//       how many of its kBlockN keys are real, and a media tile's padding flags (else nullptr).
#pragma once

#include <cstdint>

#include "cuda/attention_tiles.cuh"
#include "cuda/perceiver_attention.h"

namespace vlmk {
namespace VLMK_ATTN_NAMESPACE {
namespace attention_tiles {

template <typename T, int kBlockN, int kHeadDim>
struct PerceiverSegments {
  const T* k_media;
  const T* v_media;
  const T* k_latents;
  const T* v_latents;
  int64_t k_media_stride, v_media_stride, k_latents_stride, v_latents_stride;
  int num_media, num_latents;
  int media_tiles, tiles;

  __device__ PerceiverSegments(const PerceiverAttentionParams& p, int64_t batch, int64_t kv_head)
      : k_media(static_cast<const T*>(p.k_media) + batch * p.k_media_stride_batch +
                kv_head * p.k_media_stride_head),
        v_media(static_cast<const T*>(p.v_media) + batch * p.v_media_stride_batch +
                kv_head * p.v_media_stride_head),
        k_latents(static_cast<const T*>(p.k_latents) + batch * p.k_latents_stride_batch +
                  kv_head * p.k_latents_stride_head),
        v_latents(static_cast<const T*>(p.v_latents) + batch * p.v_latents_stride_batch +
                  kv_head * p.v_latents_stride_head),
        k_media_stride(p.k_media_stride_token),
        v_media_stride(p.v_media_stride_token),
        k_latents_stride(p.k_latents_stride_token),
        v_latents_stride(p.v_latents_stride_token),
        num_media(static_cast<int>(p.num_media)),
        num_latents(static_cast<int>(p.num_latents)),
        media_tiles((num_media + kBlockN - 1) / kBlockN),
        tiles(media_tiles + (num_latents + kBlockN - 1) / kBlockN) {}

  struct TileKeys {
    int valid;               // keys [0, valid) of the tile exist
    const uint8_t* padding;  // a media tile's padding flags (stride mask_stride), else nullptr
  };

  __device__ __forceinline__ int first_key(int tile) const {
    return (tile < media_tiles ? tile : tile - media_tiles) * kBlockN;
  }

  __device__ __forceinline__ TileKeys keys(int tile, const uint8_t* padding,
                                           int64_t mask_stride) const {
    const bool media = tile < media_tiles;
    const int key0 = first_key(tile);
    return {min(kBlockN, (media ? num_media : num_latents) - key0),
            media && padding ? padding + key0 * mask_stride : nullptr};
  }

  __device__ __forceinline__ void load(int tile, T* k_s, T* v_s, int ld, bool async) const {
    const bool media = tile < media_tiles;
    const int key0 = first_key(tile);
    const int keys_valid = min(kBlockN, (media ? num_media : num_latents) - key0);
    const int64_t k_stride = media ? k_media_stride : k_latents_stride;
    const int64_t v_stride = media ? v_media_stride : v_latents_stride;
    load_tile<T, kBlockN, kHeadDim>(k_s, ld, (media ? k_media : k_latents) + key0 * k_stride,
                                    k_stride, keys_valid, async);
    load_tile<T, kBlockN, kHeadDim>(v_s, ld, (media ? v_media : v_latents) + key0 * v_stride,
                                    v_stride, keys_valid, async);
  }
};

}  // namespace attention_tiles
}  // namespace VLMK_ATTN_NAMESPACE
}  // namespace vlmk
