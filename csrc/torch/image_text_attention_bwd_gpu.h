// Torch glue of the image_text_attention backward CUDA kernels (cuda and cuda_sim backends): the
// argument checks, the effective mask and both schedules, outputs, workspace and params they
// share. The Python op has already validated; these checks guard direct callers of vlm_kernels._C.
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <tuple>

#include "cuda/block_chunk_schedule.h"
#include "cuda/image_text_attention_bwd.h"
#include "torch/block_chunk_schedule_glue.h"
#include "torch/image_text_attention_gpu.h"

namespace vlmk {

// Backward of image_text_attention (DESIGN §3.3) on the CUDA kernels:
//   grad_out, q, out [B, Lq, Hq, Dh], k/v [B, Lk, Hkv, Dh] (one float dtype, stride(-1) == 1,
//   Dh in {64, 80, 96, 128}), media_mask [B, Lq, M] bool, lse [B, Hq, Lq] float32 (the forward's)
//   -> (dq, dk, dv) contiguous in q's dtype. uniform: empty_rows="uniform" (rows that see no chunk
//   attend to all keys), else such rows get zero gradient and add nothing.
std::tuple<at::Tensor, at::Tensor, at::Tensor> image_text_attention_bwd_cuda_sim(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& media_mask, const at::Tensor& out, const at::Tensor& lse, int64_t media_len,
    double scale, bool uniform);
#if defined(VLMK_WITH_CUDA)
std::tuple<at::Tensor, at::Tensor, at::Tensor> image_text_attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& media_mask, const at::Tensor& out, const at::Tensor& lse, int64_t media_len,
    double scale, bool uniform);
#endif

// Outputs, the tensors the launch reads (kept alive until it is queued) and its params.
struct ImageTextAttentionBwdLaunch {
  at::Tensor dq, dk, dv;
  bool done = false;  // empty input: the outputs are final, nothing to launch
  at::Tensor mask, chunk_count, chunk_ids, qb_count, qb_ids, delta, out, lse;
  ImageTextAttentionBwdParams params{};
};

// `schedule(params)` runs block_chunk_schedule on the backend's device (CUDA or the emulator).
inline ImageTextAttentionBwdLaunch prepare_image_text_attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& media_mask, const at::Tensor& out, const at::Tensor& lse, int64_t media_len,
    double scale, bool uniform,
    const std::function<int(const BlockChunkScheduleParams&)>& schedule) {
  TORCH_CHECK(q.dim() == 4, "image_text_attention backward: q must be [B, Lq, Hq, Dh], got shape ",
              q.sizes());
  TORCH_CHECK(k.dim() == 4 && k.size(0) == q.size(0) && k.size(3) == q.size(3),
              "image_text_attention backward: k must be [B, Lk, Hkv, Dh] with q's B and Dh (q ",
              q.sizes(), "), got ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "image_text_attention backward: v must have k's shape ",
              k.sizes(), ", got ", v.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "image_text_attention backward: q, k and v must share a dtype, got ", q.scalar_type(),
              ", ", k.scalar_type(), ", ", v.scalar_type());
  (void)image_text_attention_dtype(q.scalar_type());  // float32, float16 or bfloat16
  TORCH_CHECK(image_text_attention_head_dim_supported(q.size(3)),
              "image_text_attention backward: head dim Dh must be 64, 80, 96 or 128, got ",
              q.size(3));
  TORCH_CHECK(k.size(2) > 0 && q.size(2) % k.size(2) == 0,
              "image_text_attention backward: Hq=", q.size(2),
              " must be a multiple of Hkv=", k.size(2));
  TORCH_CHECK(media_mask.dim() == 3 && media_mask.size(0) == q.size(0) &&
                  media_mask.size(1) == q.size(1) && media_mask.scalar_type() == at::kBool,
              "image_text_attention backward: media_mask must be bool [B, Lq, M] with q's B and "
              "Lq (q ",
              q.sizes(), "), got ", media_mask.scalar_type(), " ", media_mask.sizes());
  TORCH_CHECK(media_len >= 1 && k.size(1) == media_mask.size(2) * media_len,
              "image_text_attention backward: k has Lk=", k.size(1),
              " keys, expected M=", media_mask.size(2), " chunks of media_len=", media_len);
  TORCH_CHECK(q.size(1) * q.size(2) <= (int64_t{1} << 30) && k.size(1) <= (int64_t{1} << 30),
              "image_text_attention backward: the CUDA kernels index Lq * Hq and Lk in int (limit "
              "2^30), got Lq * Hq = ",
              q.size(1) * q.size(2), " and Lk = ", k.size(1));
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "image_text_attention backward: q, k and v need a contiguous last dim, got strides ",
              q.strides(), ", ", k.strides(), ", ", v.strides());
  TORCH_CHECK(
      k.device() == q.device() && v.device() == q.device() && media_mask.device() == q.device(),
      "image_text_attention backward: q, k, v and media_mask must be on one device, got ",
      q.device(), ", ", k.device(), ", ", v.device(), ", ", media_mask.device());
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(),
              "image_text_attention backward: grad_out and out must have q's shape ", q.sizes(),
              ", got ", grad_out.sizes(), " and ", out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              "image_text_attention backward: grad_out and out must have q's dtype ",
              q.scalar_type(), ", got ", grad_out.scalar_type(), " and ", out.scalar_type());
  TORCH_CHECK(grad_out.stride(3) == 1 && out.stride(3) == 1,
              "image_text_attention backward: grad_out and out need a contiguous last dim, got "
              "strides ",
              grad_out.strides(), " and ", out.strides());
  const int64_t batch = q.size(0), query_len = q.size(1), heads_q = q.size(2);
  const int64_t head_dim = q.size(3), key_len = k.size(1), heads_kv = k.size(2);
  const int64_t num_chunks = media_mask.size(2);
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == batch && lse.size(1) == heads_q &&
                  lse.size(2) == query_len && lse.scalar_type() == at::kFloat,
              "image_text_attention backward: lse must be float32 [B, Hq, Lq] = [", batch, ", ",
              heads_q, ", ", query_len, "], got ", lse.scalar_type(), " ", lse.sizes());
  TORCH_CHECK(
      grad_out.device() == q.device() && out.device() == q.device() && lse.device() == q.device(),
      "image_text_attention backward: grad_out, out and lse must be on q's device ", q.device());

  ImageTextAttentionBwdLaunch launch;
  launch.dq = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  launch.dk = at::empty(k.sizes(), k.options().memory_format(at::MemoryFormat::Contiguous));
  launch.dv = at::empty(k.sizes(), k.options().memory_format(at::MemoryFormat::Contiguous));
  if (batch == 0 || heads_q == 0) {
    launch.done = true;
    return launch;
  }
  if (query_len == 0 || key_len == 0) {  // nothing attends: every gradient is 0
    launch.dq.zero_();
    launch.dk.zero_();
    launch.dv.zero_();
    launch.done = true;
    return launch;
  }

  // empty_rows="uniform": a row that sees no chunk sees every chunk; the kernels know one rule.
  launch.mask =
      uniform ? media_mask.logical_or(media_mask.any(-1, true).logical_not()) : media_mask;
  // dq pass: the chunks each block of rows sees. dk/dv pass: the query blocks that see each chunk
  // (block visibility [B, nQB, M], transposed, scheduled with blocks of one row).
  const int64_t dq_block = kImageTextAttentionBwdDqBlockM;
  const int64_t dkdv_block = kImageTextAttentionBwdDkdvBlockM;
  const int64_t n_qb_dq = (query_len + dq_block - 1) / dq_block;
  const int64_t n_qb_dkdv = (query_len + dkdv_block - 1) / dkdv_block;
  {
    auto [count, ids, params] = prepare_block_chunk_schedule(launch.mask, dq_block);
    const int status = schedule(params);
    TORCH_CHECK(status == 0, "image_text_attention backward: block_chunk_schedule failed (", status,
                ")");
    launch.chunk_count = count;
    launch.chunk_ids = ids;
  }
  {
    at::Tensor padded =
        at::zeros({batch, n_qb_dkdv * dkdv_block, num_chunks}, launch.mask.options());
    padded.narrow(1, 0, query_len).copy_(launch.mask);
    at::Tensor blocks_see =
        padded.view({batch, n_qb_dkdv, dkdv_block, num_chunks}).any(2).transpose(1, 2);
    auto [count, ids, params] = prepare_block_chunk_schedule(blocks_see, 1);
    const int status = schedule(params);
    TORCH_CHECK(status == 0, "image_text_attention backward: block_chunk_schedule failed (", status,
                ")");
    launch.qb_count = count;  // [B, M, ... ] flattened [B, M]
    launch.qb_ids = ids;      // [B, M, nQB_dkdv]
  }
  launch.delta = at::empty({batch, heads_q, query_len}, q.options().dtype(at::kFloat));
  launch.out = out;
  launch.lse = lse.contiguous();

  ImageTextAttentionBwdParams& p = launch.params;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.grad_out = grad_out.data_ptr();
  p.lse = launch.lse.data_ptr<float>();
  p.media_mask = reinterpret_cast<const uint8_t*>(launch.mask.data_ptr<bool>());
  p.chunk_count = launch.chunk_count.data_ptr<int32_t>();
  p.chunk_ids = launch.chunk_ids.data_ptr<int32_t>();
  p.qb_count = launch.qb_count.data_ptr<int32_t>();
  p.qb_ids = launch.qb_ids.data_ptr<int32_t>();
  p.delta = launch.delta.data_ptr<float>();
  p.dq = launch.dq.data_ptr();
  p.dk = launch.dk.data_ptr();
  p.dv = launch.dv.data_ptr();
  p.q_stride_batch = q.stride(0);
  p.q_stride_query = q.stride(1);
  p.q_stride_head = q.stride(2);
  p.k_stride_batch = k.stride(0);
  p.k_stride_key = k.stride(1);
  p.k_stride_head = k.stride(2);
  p.v_stride_batch = v.stride(0);
  p.v_stride_key = v.stride(1);
  p.v_stride_head = v.stride(2);
  p.out_stride_batch = out.stride(0);
  p.out_stride_query = out.stride(1);
  p.out_stride_head = out.stride(2);
  p.grad_stride_batch = grad_out.stride(0);
  p.grad_stride_query = grad_out.stride(1);
  p.grad_stride_head = grad_out.stride(2);
  p.mask_stride_batch = launch.mask.stride(0);
  p.mask_stride_query = launch.mask.stride(1);
  p.mask_stride_chunk = launch.mask.stride(2);
  p.batch = batch;
  p.query_len = query_len;
  p.key_len = key_len;
  p.heads_q = heads_q;
  p.heads_kv = heads_kv;
  p.head_dim = head_dim;
  p.num_chunks = num_chunks;
  p.media_len = media_len;
  p.num_query_blocks_dq = n_qb_dq;
  p.num_query_blocks_dkdv = n_qb_dkdv;
  p.scale = static_cast<float>(scale);
  p.dtype = image_text_attention_dtype(q.scalar_type());
  return launch;
}

}  // namespace vlmk
