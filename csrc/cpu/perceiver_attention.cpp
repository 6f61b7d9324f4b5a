// perceiver_attention on the CPU, forward and backward (semantics in cpu/perceiver_attention.h).
//
// Flash-style on the shared attention core (cpu/attention_core.h: brgemm GEMM tiles, the
// online-softmax tile step, the dK/dV/dQ tile step). What is particular to this op: the keys are
// two segments read in place, media then latents, and the media segment may have padding.
//
// Key tiles, per batch entry: the media segment from its first to its last real token, cut into
// near-equal tiles of at most kFwdKeys (forward) / kBwdKeys (backward) keys; a tile of padding only
// is skipped, and a tile that mixes padding with real tokens hides the padded keys' scores (-inf,
// so P = 0) — one GEMM per tile whatever the padding pattern, no cost at all for the usual trailing
// padding (variable numbers of frames). Then the latent segment, all visible.
//
// Forward, per task (batch, kv head, block of queries): the rows are the block's (query, head of
// the GQA group) pairs, stacked, so each GEMM reads a key/value tile once for the whole group. For
// each key tile: pack K^T (and V: dense rows for float32, VNNI pairs for bfloat16) from the strided
// input, S = Q K^T, online softmax, acc += P V; then out = acc / sum, lse = max + log(sum).
//
// Backward, per task (batch, kv head): load every row of the task once (q, dO, their transposes,
// lse, delta), then for each key tile run the core's tile step and write that tile's dK/dV (the
// task owns its keys), dQ accumulating over the tiles; padded media tokens get dK = dV = 0. No
// atomics: every run is bitwise reproducible.
#include "cpu/perceiver_attention.h"

#include "cpu/attention_core.h"

namespace vlmk {
namespace cpu {
namespace {

// A tile of one segment's keys [key_begin, key_begin + keys).
struct KeyTile {
  int segment;        // 0 media, 1 latents
  int64_t key_begin;  // first key, within the segment
  int64_t keys;       // count
  bool has_padding;   // some key of the tile is a padded media token
};

constexpr int kMedia = 0, kLatents = 1;

// Keys [begin, end) of `segment` cut into near-equal tiles of at most max_keys keys; tiles of
// padding only are dropped. real: 1 per real key of the segment, or nullptr when all are real.
void append_tiles(std::vector<KeyTile>& tiles, int segment, int64_t begin, int64_t end,
                  int64_t max_keys, const uint8_t* real) {
  const int64_t keys = end - begin;
  if (keys <= 0) return;
  const int64_t count = ceil_div(keys, max_keys);
  const int64_t tile_keys = std::min(max_keys, round_up(ceil_div(keys, count), kRowAlign));
  for (int64_t first = begin; first < end; first += tile_keys) {
    const int64_t last = std::min(end, first + tile_keys);
    int64_t seen = last - first;
    if (real != nullptr) seen = std::count(real + first, real + last, uint8_t{1});
    if (seen == 0) continue;
    tiles.push_back(KeyTile{segment, first, last - first, seen < last - first});
  }
}

// The element type's view of one segment of one batch entry and kv head.
template <typename T>
struct Segment {
  const T* k;  // k[j * k_stride]: key j
  const T* v;  // v[j * v_stride]: value j
  int64_t k_stride;
  int64_t v_stride;
  const uint8_t* real;  // [keys] 1 = real, or nullptr
};

// Shared by the forward and the backward: the segments and the key tiles of each batch entry.
template <typename T>
class KeySegments {
 public:
  KeySegments(const PerceiverAttentionFwdParams& p, int64_t max_keys) : p_(p) {
    if (p.media_padding_mask != nullptr && p.num_media > 0) {
      real_.resize(static_cast<size_t>(p.batch * p.num_media));
      for (int64_t b = 0; b < p.batch; ++b) {
        const uint8_t* src = p.media_padding_mask + b * p.mask_stride_batch;
        for (int64_t j = 0; j < p.num_media; ++j) {
          real_[b * p.num_media + j] = src[j * p.mask_stride_token] != 0;
        }
      }
    }
    tiles_.resize(p.batch);
    for (int64_t b = 0; b < p.batch; ++b) {
      const uint8_t* real = media_real(b);
      int64_t first = 0, end = p.num_media;
      if (real != nullptr) {  // from the first to the last real token
        while (first < end && !real[first]) ++first;
        while (end > first && !real[end - 1]) --end;
      }
      append_tiles(tiles_[b], kMedia, first, end, max_keys, real);
      append_tiles(tiles_[b], kLatents, 0, p.num_latents, max_keys, nullptr);
    }
  }

  const std::vector<KeyTile>& tiles(int64_t b) const { return tiles_[b]; }

  Segment<T> segment(int segment, int64_t b, int64_t kv_head) const {
    const bool media = segment == kMedia;
    const T* k = static_cast<const T*>(media ? p_.k_media : p_.k_latents);
    const T* v = static_cast<const T*>(media ? p_.v_media : p_.v_latents);
    const TokenStrides& ks = media ? p_.k_media_strides : p_.k_latents_strides;
    const TokenStrides& vs = media ? p_.v_media_strides : p_.v_latents_strides;
    return Segment<T>{k + b * ks.batch + kv_head * ks.head, v + b * vs.batch + kv_head * vs.head,
                      ks.token, vs.token, media ? media_real(b) : nullptr};
  }

 private:
  const uint8_t* media_real(int64_t b) const {
    return real_.empty() ? nullptr : real_.data() + b * p_.num_media;
  }

  const PerceiverAttentionFwdParams& p_;
  std::vector<uint8_t> real_;  // [B][Nm] 1 = real media token (empty: no mask)
  std::vector<std::vector<KeyTile>> tiles_;
};

// ==== forward ====================================================================================

template <typename T>
class Forward {
 public:
  explicit Forward(const PerceiverAttentionFwdParams& p) : p_(p), segments_(p, kFwdKeys) {
    group_ = p.heads_q / p.heads_kv;
    head_dim_padded_ = round_up(p.head_dim, kPair<T>);
    block_q_ = std::max<int64_t>(1, std::min(p.num_latents, kFwdRows / group_));
    num_blocks_ = ceil_div(p.num_latents, block_q_);
    rows_padded_ = padded_rows(block_q_ * group_);
  }

  void run() {
    run_tasks(
        p_.batch * p_.heads_kv * num_blocks_, [&] { return Worker(*this); },
        [&](int64_t task, Worker& worker) { run_task(task, worker); });
  }

 private:
  struct Worker {
    explicit Worker(const Forward& f) {
      const int64_t rows = f.rows_padded_, dh = f.p_.head_dim, dhp = f.head_dim_padded_;
      q = make_buffer<T>(rows * dhp, true);
      scores = make_buffer<float>(rows * kFwdLd, true);
      probs = make_buffer<T>(rows * kFwdLd, true);
      out_tile = make_buffer<float>(rows * dh);
      acc = make_buffer<float>(rows * dh);
      row_max = make_buffer<float>(rows);
      row_sum = make_buffer<float>(rows);
      alpha = make_buffer<float>(rows);
      key_tile = make_buffer<T>(dhp * kFwdLd, true);
      value_tile = make_buffer<T>((kFwdKeys + 2) * dh, true);
      row_of.resize(rows);
      for (int64_t r = 0; r < rows; ++r) row_of[r] = r;
    }
    ~Worker() { release_gemm<T>(); }
    Worker(Worker&&) = default;
    Buffer<T> q, probs, key_tile, value_tile;
    Buffer<float> scores, out_tile, acc, row_max, row_sum, alpha;
    std::vector<int64_t> row_of;  // the identity: every row of the block sees every key tile
  };

  void run_task(int64_t task, Worker& w) {
    const int64_t block = task % num_blocks_;
    const int64_t kv_head = (task / num_blocks_) % p_.heads_kv;
    const int64_t b = task / num_blocks_ / p_.heads_kv;
    const int64_t t0 = block * block_q_;
    const int64_t queries = std::min(block_q_, p_.num_latents - t0);
    const int64_t rows = queries * group_, m = padded_rows(rows);
    const int64_t dh = p_.head_dim, dhp = head_dim_padded_;

    // Q rows (query i, head g) at row i * group + g, zero-padded to dhp columns and m rows.
    const T* q =
        static_cast<const T*>(p_.q) + b * p_.q_strides.batch + kv_head * group_ * p_.q_strides.head;
    for (int64_t i = 0; i < queries; ++i) {
      for (int64_t g = 0; g < group_; ++g) {
        T* dst = w.q.get() + (i * group_ + g) * dhp;
        std::memcpy(dst, q + (t0 + i) * p_.q_strides.token + g * p_.q_strides.head, sizeof(T) * dh);
        if (dhp > dh) fill_zero(dst + dh, dhp - dh);
      }
    }
    fill_zero(w.q.get() + rows * dhp, (m - rows) * dhp);
    std::fill(w.row_max.get(), w.row_max.get() + rows, -kInf);
    std::fill(w.row_sum.get(), w.row_sum.get() + rows, 0.f);
    fill_zero(w.acc.get(), m * dh);

    for (const KeyTile& tile : segments_.tiles(b)) {
      const Segment<T> seg = segments_.segment(tile.segment, b, kv_head);
      const int64_t n = tile.keys, n_pairs = round_up(n, kPair<T>);
      const T* keys = seg.k + tile.key_begin * seg.k_stride;
      const T* values = seg.v + tile.key_begin * seg.v_stride;
      // scores[m][n] = Q K^T
      pack_transposed(keys, seg.k_stride, n, dh, w.key_tile.get(), kFwdLd);
      gemm(m, n, dhp, dhp, kFwdLd, kFwdLd, false, w.q.get(), w.key_tile.get(), w.scores.get());
      if (tile.has_padding) {
        hide_key_columns(w.scores.get(), kFwdLd, rows, n, seg.real + tile.key_begin);
      }
      // V as VNNI row pairs (bfloat16) or dense rows (float32: k/v rows are often KBs apart, which
      // maps a GEMM's B block onto a few cache sets).
      if constexpr (kPair<T> == 2) {
        pack_row_pairs(values, seg.v_stride, n, dh, w.value_tile.get());
      } else {
        for (int64_t j = 0; j < n; ++j) {
          std::memcpy(w.value_tile.get() + j * dh, values + j * seg.v_stride, sizeof(T) * dh);
        }
      }
      const bool rescale =
          online_softmax_tile(w.scores.get(), kFwdLd, rows, m, n, p_.scale, w.row_of.data(),
                              w.row_max.get(), w.row_sum.get(), w.alpha.get(), w.probs.get());
      accumulate_pv(w.probs.get(), kFwdLd, rows, m, n_pairs, w.value_tile.get(), dh, dh, !rescale,
                    w.row_of.data(), w.alpha.get(), w.out_tile.get(), w.acc.get());
    }
    write_rows(b, t0, kv_head, rows, w);
  }

  // out = acc / sum, lse = max + log(sum). A NaN sum (a NaN or an inf - inf among the row's
  // scores) writes NaN, as SDPA does; a zero sum (every score -inf) writes 0 and lse = -inf.
  void write_rows(int64_t b, int64_t t0, int64_t kv_head, int64_t rows, const Worker& w) const {
    const int64_t dh = p_.head_dim;
    T* out = static_cast<T*>(p_.out);
    for (int64_t row = 0; row < rows; ++row) {
      const int64_t t = t0 + row / group_, h = kv_head * group_ + row % group_;
      T* dst = out + ((b * p_.num_latents + t) * p_.heads_q + h) * dh;
      float* lse = p_.lse + (b * p_.heads_q + h) * p_.num_latents + t;
      const float sum = w.row_sum[row];
      if (sum != 0.f) {
        store_scaled(dst, w.acc.get() + row * dh, 1.f / sum, dh);
        *lse = w.row_max[row] + std::log(sum);
      } else {
        fill_zero(dst, dh);
        *lse = -kInf;
      }
    }
  }

  const PerceiverAttentionFwdParams& p_;
  KeySegments<T> segments_;
  int64_t group_, head_dim_padded_, block_q_, num_blocks_, rows_padded_;
};

// ==== backward ===================================================================================

template <typename T>
class Backward {
 public:
  explicit Backward(const PerceiverAttentionBwdParams& p)
      : p_(p), f_(p.fwd), segments_(p.fwd, kBwdKeys) {
    group_ = f_.heads_q / f_.heads_kv;
    rows_ = f_.num_latents * group_;
  }

  void run() {
    run_tasks(
        f_.batch * f_.heads_kv,
        [&] { return BackwardScratch<T>(round_up(rows_, kRowAlign), f_.head_dim); },
        [&](int64_t task, BackwardScratch<T>& w) { run_task(task, w); });
  }

 private:
  void run_task(int64_t task, BackwardScratch<T>& w) {
    const int64_t kv_head = task % f_.heads_kv, b = task / f_.heads_kv;
    const int64_t dh = f_.head_dim;
    // Row r = query t * group + head g of kv_head's group.
    load_backward_rows(w, rows_, dh, [&](int64_t r) {
      const int64_t t = r / group_, h = kv_head * group_ + r % group_;
      const TokenStrides& qs = f_.q_strides;
      const TokenStrides& gs = p_.grad_out_strides;
      const TokenStrides& os = p_.out_strides;
      return BackwardRow<T>{
          static_cast<const T*>(f_.q) + b * qs.batch + t * qs.token + h * qs.head,
          static_cast<const T*>(p_.grad_out) + b * gs.batch + t * gs.token + h * gs.head,
          static_cast<const T*>(p_.out) + b * os.batch + t * os.token + h * os.head,
          p_.lse[(b * f_.heads_q + h) * f_.num_latents + t]};
    });
    const int64_t rows_padded = round_up(rows_, kRowAlign);
    fill_zero(w.dq.get(), rows_padded * dh);

    // dK / dV rows of this (batch, kv head) in each segment's contiguous gradient.
    const int64_t stride = f_.heads_kv * dh;
    T* dk[2] = {
        static_cast<T*>(p_.grad_k_media) + (b * f_.num_media * f_.heads_kv + kv_head) * dh,
        static_cast<T*>(p_.grad_k_latents) + (b * f_.num_latents * f_.heads_kv + kv_head) * dh};
    T* dv[2] = {
        static_cast<T*>(p_.grad_v_media) + (b * f_.num_media * f_.heads_kv + kv_head) * dh,
        static_cast<T*>(p_.grad_v_latents) + (b * f_.num_latents * f_.heads_kv + kv_head) * dh};

    int64_t media_written = 0;  // media keys [0, media_written) have their dK / dV
    for (const KeyTile& tile : segments_.tiles(b)) {
      const Segment<T> seg = segments_.segment(tile.segment, b, kv_head);
      if (tile.segment == kMedia) {
        zero_keys(dk[kMedia], dv[kMedia], stride, media_written, tile.key_begin);
        media_written = tile.key_begin + tile.keys;
      }
      backward_tile(w, rows_padded, seg.k + tile.key_begin * seg.k_stride, seg.k_stride,
                    seg.v + tile.key_begin * seg.v_stride, seg.v_stride, tile.keys, dh, f_.scale,
                    tile.has_padding ? seg.real + tile.key_begin : nullptr);
      write_key_grads(w, tile.keys, dh, f_.scale, dk[tile.segment] + tile.key_begin * stride,
                      dv[tile.segment] + tile.key_begin * stride, stride);
    }
    zero_keys(dk[kMedia], dv[kMedia], stride, media_written, f_.num_media);

    // dq = scale * dQ; the group's heads of one query are adjacent in grad_q.
    T* dq = static_cast<T*>(p_.grad_q);
    for (int64_t t = 0; t < f_.num_latents; ++t) {
      store_scaled(dq + ((b * f_.num_latents + t) * f_.heads_q + kv_head * group_) * dh,
                   w.dq.get() + t * group_ * dh, f_.scale, group_ * dh);
    }
  }

  // dK = dV = 0 on keys [begin, end) of the media segment (padding that no tile covers).
  void zero_keys(T* dk, T* dv, int64_t stride, int64_t begin, int64_t end) const {
    const int64_t dh = f_.head_dim;
    for (int64_t j = begin; j < end; ++j) {
      fill_zero(dk + j * stride, dh);
      fill_zero(dv + j * stride, dh);
    }
  }

  const PerceiverAttentionBwdParams& p_;
  const PerceiverAttentionFwdParams& f_;
  KeySegments<T> segments_;
  int64_t group_, rows_;
};

}  // namespace

bool perceiver_attention_supported() { return avx512_supported(); }

void perceiver_attention_fwd(const PerceiverAttentionFwdParams& params) {
  if (params.dtype == AttentionDtype::kBFloat16) {
    Forward<BFloat16>(params).run();
  } else {
    Forward<float>(params).run();
  }
}

void perceiver_attention_bwd(const PerceiverAttentionBwdParams& params) {
  if (params.fwd.dtype == AttentionDtype::kBFloat16) {
    Backward<BFloat16>(params).run();
  } else {
    Backward<float>(params).run();
  }
}

}  // namespace cpu
}  // namespace vlmk

#if VLMK_ATTENTION_AVX512
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif
