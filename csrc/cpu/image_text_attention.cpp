// image_text_attention on the CPU, forward and backward (semantics in cpu/image_text_attention.h).
//
// Flash-style, float32 softmax statistics, GEMMs by oneDNN's brgemm microkernel through
// at::native::cpublas::brgemm (AMX tiles for bfloat16 on CPUs that have them, AVX-512 for float32).
// The rows of one task are the Hq/Hkv query heads of one kv head times a block of queries, stacked,
// so each GEMM reads a key/value tile once for the whole GQA group.
//
// Chunk skipping: a task walks only the media chunks some of its queries may see. Consecutive
// chunks seen by the same queries form a segment (in the forward's shared packed layout only where
// no padding separates them), cut into key tiles. For each segment the task gathers the query rows
// that see it, so the GEMMs run on exactly the visible (row, key) pairs and no per-element mask is
// ever applied.
//
// Forward, per task (batch, kv head, query block [, key split]): for each tile S = Q K^T, online
// softmax (running max m, sum l, float32 accumulator; the max is rebased lazily, only when a score
// exceeds it by 2^8), acc += P V. Key tiles are packed once per call (K^T, and V in the VNNI pair
// layout AMX wants) when several query blocks share them (20% faster than packing per task when 16
// blocks share a tile, as fast with 4); otherwise (decode, one query block) each task packs its own
// tiles, or computes S^T = K Q^T straight from k. Few (batch, head, query block) tasks (decode
// with small batch) split the keys of a block across tasks and combine the partial (m, l, acc).
//
// Backward, per task (batch, kv head [, key split]): for each segment gather the rows that see it
// (q, dO, their transposes, lse, delta = rowsum(dO * out)), then for each key tile and block of
// rows
//   S = Q K^T, P = exp(scale S - lse), dP = dO V^T, dS = P (dP - delta)
//   dV^T += dO^T P,  dK^T += Q^T dS,  dQ += dS K     (dK, dQ scaled at the end)
// A task owns its keys' dK/dV and its rows' dQ outright (key splits sum their dQ afterwards), so
// there are no atomics and every run is bitwise reproducible.
#include "cpu/image_text_attention.h"

#include "cpu/attention_core.h"

namespace vlmk {
namespace cpu {
namespace {

constexpr int64_t kDirectMaxRows = 64;  // unpacked forward (S^T = K Q^T) up to this many rows

// Keys per chunk in the packed K^T / V layouts: even for VNNI pairs, and a multiple of 16 for long
// chunks so that tiles start on 64-byte boundaries (brgemm runs ~2x slower on misaligned B rows).
// Chunks of media_len keys are merged into common tiles only when no padding separates them.
int64_t packed_chunk_len(int64_t media_len, int64_t pair) {
  return media_len >= 256 ? round_up(media_len, kRowAlign) : round_up(media_len, pair);
}

// ---- visibility, segments and tiles -------------------------------------------------------------

// Effective chunk visibility [B][Lq][M] (uint8, contiguous), with the `uniform` rule applied: a row
// that sees no chunk sees them all.
std::vector<uint8_t> effective_visibility(const uint8_t* mask, int64_t stride_batch,
                                          int64_t stride_query, int64_t stride_chunk, int64_t batch,
                                          int64_t query_len, int64_t chunks, bool uniform) {
  std::vector<uint8_t> visible(static_cast<size_t>(batch * query_len * chunks));
  at::parallel_for(0, batch * query_len, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const uint8_t* src =
          mask + (row / query_len) * stride_batch + (row % query_len) * stride_query;
      uint8_t* dst = visible.data() + row * chunks;
      uint8_t any = 0;
      for (int64_t c = 0; c < chunks; ++c) any |= dst[c] = src[c * stride_chunk] != 0;
      if (uniform && !any) std::fill(dst, dst + chunks, uint8_t{1});
    }
  });
  return visible;
}

// A run of keys [key_begin, key_begin + keys) seen by the same queries; packed_begin is the column
// of its first key in the packed key layout (chunks padded to packed_chunk_len keys).
struct Tile {
  int64_t key_begin;
  int64_t keys;
  int64_t packed_begin;
  int64_t chunk;  // first chunk of the tile's segment: its visibility column selects the rows
};

// The tiles of the chunks seen by queries [t_begin, t_end) of one batch entry (visible: [Lq][M]).
// Consecutive chunks seen by the same queries merge into one segment when `merge` (the packed
// layout has no padding between chunks); a segment is cut into near-equal tiles of at most max_keys
// keys.
std::vector<Tile> visible_tiles(const uint8_t* visible, int64_t chunks, int64_t t_begin,
                                int64_t t_end, int64_t media_len, int64_t packed_chunk_len,
                                int64_t max_keys, bool merge) {
  std::vector<Tile> tiles;
  auto column_seen = [&](int64_t c) {
    for (int64_t t = t_begin; t < t_end; ++t) {
      if (visible[t * chunks + c]) return true;
    }
    return false;
  };
  auto same_column = [&](int64_t c0, int64_t c1) {
    for (int64_t t = t_begin; t < t_end; ++t) {
      if (visible[t * chunks + c0] != visible[t * chunks + c1]) return false;
    }
    return true;
  };
  int64_t c = 0;
  while (c < chunks) {
    if (!column_seen(c)) {
      ++c;
      continue;
    }
    int64_t end = c + 1;
    while (merge && end < chunks && same_column(c, end)) ++end;
    const int64_t keys = (end - c) * media_len;
    const int64_t count = ceil_div(keys, max_keys);
    const int64_t tile_keys = std::min(max_keys, round_up(ceil_div(keys, count), kRowAlign));
    for (int64_t offset = 0; offset < keys; offset += tile_keys) {
      tiles.push_back(Tile{c * media_len + offset, std::min(tile_keys, keys - offset),
                           c * packed_chunk_len + offset, c});
    }
    c = end;
  }
  return tiles;
}

// ==== forward ====================================================================================

template <typename T>
class Forward {
 public:
  explicit Forward(const ImageTextAttentionFwdParams& p) : p_(p) {
    group_ = p.heads_q / p.heads_kv;
    head_words_ = ceil_div(p.head_dim, kPair<T>);
    head_dim_padded_ = head_words_ * kPair<T>;
    block_q_ = std::max<int64_t>(1, std::min(p.query_len, kFwdRows / group_));
    num_blocks_ = ceil_div(p.query_len, block_q_);
    rows_ = block_q_ * group_;
    rows_padded_ = padded_rows(rows_);
    packed_chunk_len_ = packed_chunk_len(p.media_len, kPair<T>);
    packed_len_ = round_up(p.num_chunks * packed_chunk_len_, kRowAlign);
    const int64_t threads = at::get_num_threads();
    const int64_t base_tasks = p.batch * p.heads_kv * num_blocks_;
    // Key splits when (batch, kv head, query block) alone leaves threads idle: decode.
    splits_ = 1;
    if (base_tasks < 4 * threads) {
      splits_ = std::min(ceil_div(4 * threads, base_tasks),
                         std::max<int64_t>(1, ceil_div(p.num_chunks * p.media_len, kFwdKeys)));
    }
    prepack_ = num_blocks_ >= 2;
    direct_ = !prepack_ && rows_padded_ <= kDirectMaxRows &&
              (kPair<T> == 1 || p.head_dim % kPair<T> == 0);
  }

  void run() {
    visible_ = effective_visibility(p_.media_mask, p_.mask_stride_batch, p_.mask_stride_query,
                                    p_.mask_stride_chunk, p_.batch, p_.query_len, p_.num_chunks,
                                    p_.empty_rows == EmptyRows::kUniform);
    if (prepack_) pack_keys_values();
    const int64_t num_tasks = p_.batch * p_.heads_kv * num_blocks_ * splits_;
    if (splits_ > 1) {
      partial_max_ = make_buffer<float>(num_tasks * rows_);
      partial_sum_ = make_buffer<float>(num_tasks * rows_);
      partial_acc_ = make_buffer<float>(num_tasks * rows_ * p_.head_dim);
    }
    run_tasks(
        num_tasks, [&] { return Worker(*this); },
        [&](int64_t task, Worker& worker) { run_task(task, worker); });
    if (splits_ > 1) combine_splits();
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
      row_max = make_buffer<float>(f.rows_);
      row_sum = make_buffer<float>(f.rows_);
      alpha = make_buffer<float>(rows);
      row_of.resize(f.rows_);
      query_set.resize(f.block_q_);
      if (!f.prepack_) {
        key_tile = make_buffer<T>(dhp * kFwdLd, true);
        if constexpr (kPair<T> == 2) value_tile = make_buffer<T>((kFwdKeys + 2) * dh, true);
        if (f.direct_) scores_t = make_buffer<float>(kFwdKeys * rows, true);
      }
    }
    ~Worker() { release_gemm<T>(); }
    Worker(Worker&&) = default;
    Buffer<T> q, probs, key_tile, value_tile;
    Buffer<float> scores, scores_t, out_tile, acc, row_max, row_sum, alpha;
    std::vector<int64_t> row_of;     // gathered row -> block row (query * group + head)
    std::vector<uint8_t> query_set;  // block queries in the current gather
  };

  const T* q_ptr() const { return static_cast<const T*>(p_.q); }
  const T* k_ptr() const { return static_cast<const T*>(p_.k); }
  const T* v_ptr() const { return static_cast<const T*>(p_.v); }

  // K^T (and V as VNNI pairs for bfloat16) of every chunk some query of a batch entry sees, once.
  void pack_keys_values() {
    const int64_t dhp = head_dim_padded_, dh = p_.head_dim, len = p_.media_len;
    const int64_t heads = p_.batch * p_.heads_kv;
    key_pack_ = make_buffer<T>(heads * dhp * packed_len_);
    value_pack_ = make_buffer<T>(heads * packed_len_ * dh);
    std::vector<uint8_t> seen(static_cast<size_t>(p_.batch * p_.num_chunks), 0);
    for (int64_t b = 0; b < p_.batch; ++b) {
      for (int64_t t = 0; t < p_.query_len; ++t) {
        for (int64_t c = 0; c < p_.num_chunks; ++c) {
          seen[b * p_.num_chunks + c] |= visible_[(b * p_.query_len + t) * p_.num_chunks + c];
        }
      }
    }
    at::parallel_for(0, heads * p_.num_chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t bh = item / p_.num_chunks, c = item % p_.num_chunks;
        const int64_t b = bh / p_.heads_kv, h = bh % p_.heads_kv;
        if (!seen[b * p_.num_chunks + c]) continue;
        const T* k =
            k_ptr() + b * p_.k_stride_batch + c * len * p_.k_stride_token + h * p_.k_stride_head;
        pack_transposed(k, p_.k_stride_token, len, dh,
                        key_pack_.get() + bh * dhp * packed_len_ + c * packed_chunk_len_ * kPair<T>,
                        packed_len_);
        // V as VNNI row pairs (bfloat16) or dense rows (float32: q/k/v rows are often 4 KB apart,
        // which maps a GEMM's B block onto a few cache sets).
        const T* v =
            v_ptr() + b * p_.v_stride_batch + c * len * p_.v_stride_token + h * p_.v_stride_head;
        T* v_dst = value_pack_.get() + (bh * packed_len_ + c * packed_chunk_len_) * dh;
        if constexpr (kPair<T> == 2) {
          pack_row_pairs(v, p_.v_stride_token, len, dh, v_dst);
        } else {
          for (int64_t j = 0; j < len; ++j) {
            std::memcpy(v_dst + j * dh, v + j * p_.v_stride_token, sizeof(T) * dh);
          }
        }
      }
    });
  }

  // Gathers the block rows whose query sees chunk `chunk` into worker.q; returns the row count.
  int64_t gather_rows(const uint8_t* visible_block, int64_t queries, int64_t chunk, int64_t b,
                      int64_t t0, int64_t kv_head, Worker& w, bool& changed) const {
    bool same = true;
    for (int64_t i = 0; i < queries; ++i) {
      const uint8_t in = visible_block[i * p_.num_chunks + chunk];
      same &= in == w.query_set[i];
      w.query_set[i] = in;
    }
    changed = !same;
    int64_t rows = 0;
    for (int64_t i = 0; i < queries; ++i) rows += w.query_set[i] ? group_ : 0;
    if (same) return rows;
    const int64_t dh = p_.head_dim, dhp = head_dim_padded_;
    int64_t row = 0;
    for (int64_t i = 0; i < queries; ++i) {
      if (!w.query_set[i]) continue;
      const T* q = q_ptr() + b * p_.q_stride_batch + (t0 + i) * p_.q_stride_token +
                   kv_head * group_ * p_.q_stride_head;
      for (int64_t g = 0; g < group_; ++g, ++row) {
        w.row_of[row] = i * group_ + g;
        T* dst = w.q.get() + row * dhp;
        std::memcpy(dst, q + g * p_.q_stride_head, sizeof(T) * dh);
        if (dhp > dh) fill_zero(dst + dh, dhp - dh);
      }
    }
    const int64_t rows_padded = padded_rows(rows);
    fill_zero(w.q.get() + rows * dhp, (rows_padded - rows) * dhp);
    return rows;
  }

  void run_task(int64_t task, Worker& w) {
    const int64_t split = task % splits_;
    const int64_t block = (task / splits_) % num_blocks_;
    const int64_t kv_head = (task / splits_ / num_blocks_) % p_.heads_kv;
    const int64_t b = task / splits_ / num_blocks_ / p_.heads_kv;
    const int64_t t0 = block * block_q_;
    const int64_t queries = std::min(block_q_, p_.query_len - t0);
    const int64_t rows = queries * group_;
    const int64_t dh = p_.head_dim, dhp = head_dim_padded_;
    const uint8_t* visible_block = visible_.data() + (b * p_.query_len + t0) * p_.num_chunks;

    const std::vector<Tile> tiles =
        visible_tiles(visible_block, p_.num_chunks, 0, queries, p_.media_len, packed_chunk_len_,
                      kFwdKeys, can_merge());
    const int64_t tile_begin = static_cast<int64_t>(tiles.size()) * split / splits_;
    const int64_t tile_end = static_cast<int64_t>(tiles.size()) * (split + 1) / splits_;

    std::fill(w.row_max.get(), w.row_max.get() + rows, -kInf);
    std::fill(w.row_sum.get(), w.row_sum.get() + rows, 0.f);
    fill_zero(w.acc.get(), padded_rows(rows) * dh);
    std::fill(w.query_set.begin(), w.query_set.end(), uint8_t{0});

    const int64_t bh = b * p_.heads_kv + kv_head;
    const T* k_head = k_ptr() + b * p_.k_stride_batch + kv_head * p_.k_stride_head;
    const T* v_head = v_ptr() + b * p_.v_stride_batch + kv_head * p_.v_stride_head;
    int64_t gathered = 0;
    for (int64_t i = tile_begin; i < tile_end; ++i) {
      const Tile& tile = tiles[i];
      bool changed = false;
      gathered = gather_rows(visible_block, queries, tile.chunk, b, t0, kv_head, w, changed);
      if (gathered == 0) continue;
      const int64_t m = padded_rows(gathered), n = tile.keys;
      const int64_t n_pairs = round_up(n, kPair<T>);

      // scores[m][n] = Q K^T
      const T* values;
      int64_t ld_values;
      if (prepack_) {
        const T* keys = key_pack_.get() + bh * dhp * packed_len_ + tile.packed_begin * kPair<T>;
        gemm(m, n, dhp, dhp, packed_len_, kFwdLd, false, w.q.get(), keys, w.scores.get());
      } else if (direct_) {
        // S^T = K Q^T straight from k (its rows are the A operand), then transposed.
        if (changed || i == tile_begin)
          pack_transposed(w.q.get(), dhp, m, dhp, w.key_tile.get(), m);
        gemm(n, m, dhp, p_.k_stride_token, m, m, false, k_head + tile.key_begin * p_.k_stride_token,
             w.key_tile.get(), w.scores_t.get());
        for (int64_t r = 0; r < m; ++r) {
          float* dst = w.scores.get() + r * kFwdLd;
          for (int64_t j = 0; j < n; ++j) dst[j] = w.scores_t[j * m + r];
        }
      } else {
        pack_transposed(k_head + tile.key_begin * p_.k_stride_token, p_.k_stride_token, n, dh,
                        w.key_tile.get(), kFwdLd);
        gemm(m, n, dhp, dhp, kFwdLd, kFwdLd, false, w.q.get(), w.key_tile.get(), w.scores.get());
      }
      if (prepack_) {
        values = value_pack_.get() + (bh * packed_len_ + tile.packed_begin) * dh;
        ld_values = dh;
      } else if constexpr (kPair<T> == 1) {
        values = v_head + tile.key_begin * p_.v_stride_token;
        ld_values = p_.v_stride_token;
      } else {
        pack_row_pairs(v_head + tile.key_begin * p_.v_stride_token, p_.v_stride_token, n, dh,
                       w.value_tile.get());
        values = w.value_tile.get();
        ld_values = dh;
      }

      // Online softmax over the tile (probabilities in T for the second GEMM), then acc += P V.
      const bool rescale =
          online_softmax_tile(w.scores.get(), kFwdLd, gathered, m, n, p_.scale, w.row_of.data(),
                              w.row_max.get(), w.row_sum.get(), w.alpha.get(), w.probs.get());
      accumulate_pv(w.probs.get(), kFwdLd, gathered, m, n_pairs, values, ld_values, dh,
                    gathered == rows && !rescale, w.row_of.data(), w.alpha.get(), w.out_tile.get(),
                    w.acc.get());
    }

    if (splits_ == 1) {
      write_rows(b, t0, kv_head, rows, w.row_max.get(), w.row_sum.get(), w.acc.get());
    } else {
      std::memcpy(partial_max_.get() + task * rows_, w.row_max.get(), sizeof(float) * rows);
      std::memcpy(partial_sum_.get() + task * rows_, w.row_sum.get(), sizeof(float) * rows);
      std::memcpy(partial_acc_.get() + task * rows_ * dh, w.acc.get(), sizeof(float) * rows * dh);
    }
  }

  // out = acc / sum, lse = max + log(sum); rows that saw nothing: 0 and -inf. A NaN sum (a NaN or
  // an inf - inf among the row's visible scores) is not "nothing": it writes NaN, as SDPA does.
  void write_rows(int64_t b, int64_t t0, int64_t kv_head, int64_t rows, const float* row_max,
                  const float* row_sum, const float* acc) const {
    const int64_t dh = p_.head_dim;
    T* out = static_cast<T*>(p_.out);
    for (int64_t row = 0; row < rows; ++row) {
      const int64_t t = t0 + row / group_, h = kv_head * group_ + row % group_;
      T* dst = out + ((b * p_.query_len + t) * p_.heads_q + h) * dh;
      float* lse = p_.lse + (b * p_.heads_q + h) * p_.query_len + t;
      if (row_sum[row] != 0.f) {
        store_scaled(dst, acc + row * dh, 1.f / row_sum[row], dh);
        *lse = row_max[row] + std::log(row_sum[row]);
      } else {
        fill_zero(dst, dh);
        *lse = -kInf;
      }
    }
  }

  void combine_splits() {
    const int64_t dh = p_.head_dim;
    const int64_t blocks = p_.batch * p_.heads_kv * num_blocks_;
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> row_max(rows_), row_sum(rows_), acc(rows_ * dh), weight(splits_);
      for (int64_t block_task = begin; block_task < end; ++block_task) {
        const int64_t block = block_task % num_blocks_;
        const int64_t kv_head = (block_task / num_blocks_) % p_.heads_kv;
        const int64_t b = block_task / num_blocks_ / p_.heads_kv;
        const int64_t t0 = block * block_q_;
        const int64_t rows = std::min(block_q_, p_.query_len - t0) * group_;
        for (int64_t row = 0; row < rows; ++row) {
          float top = -kInf;
          bool poisoned = false;  // a split saw NaN: the row's output is NaN (write_rows)
          for (int64_t s = 0; s < splits_; ++s) {
            const int64_t task = block_task * splits_ + s;
            const float sum = partial_sum_[task * rows_ + row];
            poisoned |= std::isnan(sum);
            if (sum > 0.f) top = std::max(top, partial_max_[task * rows_ + row]);
          }
          if (poisoned) {
            row_max[row] = row_sum[row] = std::numeric_limits<float>::quiet_NaN();
            std::fill(acc.data() + row * dh, acc.data() + (row + 1) * dh, row_sum[row]);
            continue;
          }
          float total = 0.f;
          for (int64_t s = 0; s < splits_; ++s) {
            const int64_t task = block_task * splits_ + s;
            const float sum = partial_sum_[task * rows_ + row];
            weight[s] = sum > 0.f ? std::exp(partial_max_[task * rows_ + row] - top) : 0.f;
            total += weight[s] * sum;
          }
          float* dst = acc.data() + row * dh;
          std::fill(dst, dst + dh, 0.f);
          for (int64_t s = 0; s < splits_; ++s) {
            if (weight[s] == 0.f) continue;
            const int64_t task = block_task * splits_ + s;
            const float* src = partial_acc_.get() + (task * rows_ + row) * dh;
            for (int64_t d = 0; d < dh; ++d) dst[d] += weight[s] * src[d];
          }
          row_max[row] = top;
          row_sum[row] = total;
        }
        write_rows(b, t0, kv_head, rows, row_max.data(), row_sum.data(), acc.data());
      }
    });
  }

  // Whether consecutive chunks can share a tile: tiles packed per task always can; the shared
  // packed layout only when it has no padding between chunks.
  bool can_merge() const { return !prepack_ || packed_chunk_len_ == p_.media_len; }

  const ImageTextAttentionFwdParams& p_;
  int64_t group_, head_words_, head_dim_padded_, block_q_, num_blocks_, rows_, rows_padded_;
  int64_t packed_chunk_len_, packed_len_, splits_;
  bool prepack_, direct_;
  std::vector<uint8_t> visible_;
  Buffer<T> key_pack_, value_pack_;
  Buffer<float> partial_max_, partial_sum_, partial_acc_;
};

// ==== backward ===================================================================================

template <typename T>
class Backward {
 public:
  explicit Backward(const ImageTextAttentionBwdParams& p) : p_(p) {
    group_ = p.heads_q / p.heads_kv;
    rows_max_ = round_up(p.query_len * group_, kRowAlign);
    const int64_t threads = at::get_num_threads();
    const int64_t base_tasks = p.batch * p.heads_kv;
    splits_ = 1;
    if (base_tasks < 2 * threads) {
      splits_ = std::min(ceil_div(4 * threads, base_tasks),
                         std::max<int64_t>(1, ceil_div(p.num_chunks * p.media_len, kBwdKeys)));
    }
  }

  void run() {
    visible_ = effective_visibility(p_.media_mask, p_.mask_stride_batch, p_.mask_stride_query,
                                    p_.mask_stride_chunk, p_.batch, p_.query_len, p_.num_chunks,
                                    p_.empty_rows == EmptyRows::kUniform);
    if (splits_ > 1) {
      const int64_t dq_elems = p_.batch * p_.query_len * p_.heads_q * p_.head_dim;
      dq_acc_ = make_buffer<float>(splits_ * dq_elems);
    }
    // Tiles are packed per task, so chunks seen by the same queries always merge.
    tiles_.resize(p_.batch);
    at::parallel_for(0, p_.batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        tiles_[b] = visible_tiles(visible_.data() + b * p_.query_len * p_.num_chunks, p_.num_chunks,
                                  0, p_.query_len, p_.media_len, p_.media_len, kBwdKeys, true);
      }
    });
    run_tasks(
        p_.batch * p_.heads_kv * splits_, [&] { return Worker(*this); },
        [&](int64_t task, Worker& worker) { run_task(task, worker); });
    if (splits_ > 1) sum_dq_splits();
  }

 private:
  // The tile step's scratch, plus the task's dQ rows and the gathered rows' origins.
  struct Worker : BackwardScratch<T> {
    explicit Worker(const Backward& f) : BackwardScratch<T>(f.rows_max_, f.p_.head_dim) {
      dq_task = make_buffer<float>(f.p_.query_len * f.group_ * f.p_.head_dim);
      row_of.resize(f.rows_max_);
    }
    Buffer<float> dq_task;
    std::vector<int64_t> row_of;  // gathered row -> query * group + head in group
  };

  template <typename U>
  const U* ptr(const void* p) const {
    return static_cast<const U*>(p);
  }

  // Gathers every (query, head of kv_head's group) row whose query sees `chunk`; returns the count.
  int64_t gather_rows(int64_t b, int64_t kv_head, int64_t chunk, Worker& w) const {
    const uint8_t* visible = visible_.data() + b * p_.query_len * p_.num_chunks;
    int64_t rows = 0;
    for (int64_t t = 0; t < p_.query_len; ++t) {
      if (!visible[t * p_.num_chunks + chunk]) continue;
      for (int64_t g = 0; g < group_; ++g) w.row_of[rows++] = t * group_ + g;
    }
    load_backward_rows(w, rows, p_.head_dim, [&](int64_t r) {
      const int64_t t = w.row_of[r] / group_, h = kv_head * group_ + w.row_of[r] % group_;
      return BackwardRow<T>{
          ptr<T>(p_.q) + b * p_.q_stride_batch + t * p_.q_stride_token + h * p_.q_stride_head,
          ptr<T>(p_.grad_out) + b * p_.grad_out_stride_batch + t * p_.grad_out_stride_token +
              h * p_.grad_out_stride_head,
          ptr<T>(p_.out) + b * p_.out_stride_batch + t * p_.out_stride_token +
              h * p_.out_stride_head,
          p_.lse[(b * p_.heads_q + h) * p_.query_len + t]};
    });
    return rows;
  }

  // The task's dQ rows += w.dq (gathered rows), then w.dq = 0.
  void flush_dq(int64_t rows, Worker& w) const {
    const int64_t dh = p_.head_dim;
    for (int64_t r = 0; r < rows; ++r) {
      scale_add(w.dq_task.get() + w.row_of[r] * dh, 1.f, w.dq.get() + r * dh, dh);
      fill_zero(w.dq.get() + r * dh, dh);
    }
  }

  // dq of the task's rows (all queries x the kv head's group): scale * dQ into grad_q, or the
  // unscaled partial into dq_acc_[split] when the keys are split.
  void write_dq(int64_t b, int64_t kv_head, int64_t split, const Worker& w) const {
    const int64_t dh = p_.head_dim;
    for (int64_t t = 0; t < p_.query_len; ++t) {
      const int64_t row = (b * p_.query_len + t) * p_.heads_q + kv_head * group_;
      const float* src = w.dq_task.get() + t * group_ * dh;
      if (splits_ == 1) {
        store_scaled(static_cast<T*>(p_.grad_q) + row * dh, src, p_.scale, group_ * dh);
      } else {
        const int64_t elems = p_.batch * p_.query_len * p_.heads_q * dh;
        std::memcpy(dq_acc_.get() + split * elems + row * dh, src, sizeof(float) * group_ * dh);
      }
    }
  }

  void run_task(int64_t task, Worker& w) {
    const int64_t split = task % splits_;
    const int64_t kv_head = (task / splits_) % p_.heads_kv;
    const int64_t b = task / splits_ / p_.heads_kv;
    const int64_t dh = p_.head_dim;
    const std::vector<Tile>& tiles = tiles_[b];
    const int64_t tile_begin = static_cast<int64_t>(tiles.size()) * split / splits_;
    const int64_t tile_end = static_cast<int64_t>(tiles.size()) * (split + 1) / splits_;
    const T* k_head = ptr<T>(p_.k) + b * p_.k_stride_batch + kv_head * p_.k_stride_head;
    const T* v_head = ptr<T>(p_.v) + b * p_.v_stride_batch + kv_head * p_.v_stride_head;
    T* dk_head = static_cast<T*>(p_.grad_k) +
                 (b * p_.num_chunks * p_.media_len * p_.heads_kv + kv_head) * dh;
    T* dv_head = static_cast<T*>(p_.grad_v) +
                 (b * p_.num_chunks * p_.media_len * p_.heads_kv + kv_head) * dh;
    const int64_t dkv_stride = p_.heads_kv * dh;

    if (split == 0) zero_unseen_keys(tiles, dk_head, dv_head, dkv_stride);
    fill_zero(w.dq_task.get(), p_.query_len * group_ * dh);

    int64_t gathered = 0, gathered_chunk = -1;
    for (int64_t i = tile_begin; i < tile_end; ++i) {
      const Tile& tile = tiles[i];
      if (gathered_chunk < 0 || !same_rows(b, gathered_chunk, tile.chunk)) {
        if (gathered > 0) flush_dq(gathered, w);
        gathered = gather_rows(b, kv_head, tile.chunk, w);
      }
      gathered_chunk = tile.chunk;
      const int64_t key = tile.key_begin;
      backward_tile(w, round_up(gathered, kRowAlign), k_head + key * p_.k_stride_token,
                    p_.k_stride_token, v_head + key * p_.v_stride_token, p_.v_stride_token,
                    tile.keys, dh, p_.scale);
      write_key_grads(w, tile.keys, dh, p_.scale, dk_head + key * dkv_stride,
                      dv_head + key * dkv_stride, dkv_stride);
    }
    if (gathered > 0) flush_dq(gathered, w);
    write_dq(b, kv_head, split, w);
  }

  bool same_rows(int64_t b, int64_t c0, int64_t c1) const {
    if (c0 == c1) return true;
    const uint8_t* visible = visible_.data() + b * p_.query_len * p_.num_chunks;
    for (int64_t t = 0; t < p_.query_len; ++t) {
      if (visible[t * p_.num_chunks + c0] != visible[t * p_.num_chunks + c1]) return false;
    }
    return true;
  }

  // dK = dV = 0 on keys of chunks no query of this batch entry sees.
  void zero_unseen_keys(const std::vector<Tile>& tiles, T* dk_head, T* dv_head,
                        int64_t stride) const {
    const int64_t dh = p_.head_dim;
    const int64_t keys = p_.num_chunks * p_.media_len;
    int64_t key = 0;
    size_t next = 0;
    while (key < keys) {
      const int64_t end = next < tiles.size() ? tiles[next].key_begin : keys;
      for (; key < end; ++key) {
        fill_zero(dk_head + key * stride, dh);
        fill_zero(dv_head + key * stride, dh);
      }
      if (next < tiles.size()) key = tiles[next].key_begin + tiles[next].keys;
      ++next;
    }
  }

  // dq = scale * sum over key splits of dq_acc.
  void sum_dq_splits() {
    const int64_t dh = p_.head_dim;
    const int64_t rows = p_.batch * p_.query_len * p_.heads_q;
    T* dq = static_cast<T*>(p_.grad_q);
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
      std::vector<float> sum(dh);
      for (int64_t row = begin; row < end; ++row) {
        const float* src = dq_acc_.get() + row * dh;
        std::copy(src, src + dh, sum.begin());
        for (int64_t s = 1; s < splits_; ++s) scale_add(sum.data(), 1.f, src + s * rows * dh, dh);
        store_scaled(dq + row * dh, sum.data(), p_.scale, dh);
      }
    });
  }

  const ImageTextAttentionBwdParams& p_;
  int64_t group_, rows_max_, splits_;
  std::vector<uint8_t> visible_;
  std::vector<std::vector<Tile>> tiles_;
  Buffer<float> dq_acc_;
};

// ---- empty_rows = "mean"
// -------------------------------------------------------------------------- A "mean" row's scores
// are all equal, so its softmax is uniform over the Lk keys whatever q and k are: its output is the
// mean of the values of its kv head and its gradient reaches v only. The attention kernels run such
// rows as "zero" rows (no visible key: out 0, dq 0, nothing to dk/dv); these passes then write the
// mean rows and add their dv term, per (batch, kv head), in float32.

// Whether row t of batch b sees no chunk (read from the caller's mask, not the effective one).
template <typename Params>
bool row_is_empty(const Params& p, int64_t b, int64_t t) {
  const uint8_t* row = p.media_mask + b * p.mask_stride_batch + t * p.mask_stride_query;
  for (int64_t c = 0; c < p.num_chunks; ++c) {
    if (row[c * p.mask_stride_chunk] != 0) return false;
  }
  return true;
}

// [B][Lq] 1 where the row sees no chunk; returns whether any row does.
template <typename Params>
bool empty_rows_of(const Params& p, std::vector<uint8_t>& empty) {
  empty.assign(static_cast<size_t>(p.batch * p.query_len), 0);
  std::atomic<bool> any{false};
  at::parallel_for(0, p.batch * p.query_len, 1024, [&](int64_t begin, int64_t end) {
    bool found = false;
    for (int64_t row = begin; row < end; ++row) {
      empty[row] = row_is_empty(p, row / p.query_len, row % p.query_len);
      found |= empty[row] != 0;
    }
    if (found) any.store(true, std::memory_order_relaxed);
  });
  return any.load();
}

// out[b, t, h] = mean_j v[b, j, h / group] and lse[b, h, t] = log(Lk) on the empty rows.
template <typename T>
void write_mean_rows(const ImageTextAttentionFwdParams& p) {
  std::vector<uint8_t> empty;
  if (!empty_rows_of(p, empty)) return;
  const int64_t dh = p.head_dim, keys = p.num_chunks * p.media_len, group = p.heads_q / p.heads_kv;
  const T* v = static_cast<const T*>(p.v);
  T* out = static_cast<T*>(p.out);
  const float lse_value = std::log(static_cast<float>(keys));
  at::parallel_for(0, p.batch * p.heads_kv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> mean(dh);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / p.heads_kv, hk = task % p.heads_kv;
      std::fill(mean.begin(), mean.end(), 0.f);
      const T* v_head = v + b * p.v_stride_batch + hk * p.v_stride_head;
      for (int64_t j = 0; j < keys; ++j) {
        const T* row = v_head + j * p.v_stride_token;
        for (int64_t d = 0; d < dh; ++d) mean[d] += static_cast<float>(row[d]);
      }
      for (int64_t d = 0; d < dh; ++d) mean[d] /= static_cast<float>(keys);
      for (int64_t t = 0; t < p.query_len; ++t) {
        if (!empty[b * p.query_len + t]) continue;
        for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
          T* dst = out + ((b * p.query_len + t) * p.heads_q + h) * dh;
          for (int64_t d = 0; d < dh; ++d) dst[d] = static_cast<T>(mean[d]);
          p.lse[(b * p.heads_q + h) * p.query_len + t] = lse_value;
        }
      }
    }
  });
}

// dv[b, j, hk] += (sum of grad_out over the empty rows of the query heads of hk) / Lk, every key j.
template <typename T>
void add_mean_rows_grad(const ImageTextAttentionBwdParams& p) {
  std::vector<uint8_t> empty;
  if (!empty_rows_of(p, empty)) return;
  const int64_t dh = p.head_dim, keys = p.num_chunks * p.media_len, group = p.heads_q / p.heads_kv;
  const T* grad_out = static_cast<const T*>(p.grad_out);
  T* dv = static_cast<T*>(p.grad_v);
  at::parallel_for(0, p.batch * p.heads_kv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> sum(dh);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / p.heads_kv, hk = task % p.heads_kv;
      std::fill(sum.begin(), sum.end(), 0.f);
      for (int64_t t = 0; t < p.query_len; ++t) {
        if (!empty[b * p.query_len + t]) continue;
        for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
          const T* row = grad_out + b * p.grad_out_stride_batch + t * p.grad_out_stride_token +
                         h * p.grad_out_stride_head;
          for (int64_t d = 0; d < dh; ++d) sum[d] += static_cast<float>(row[d]);
        }
      }
      for (int64_t d = 0; d < dh; ++d) sum[d] /= static_cast<float>(keys);
      T* dv_head = dv + (b * keys * p.heads_kv + hk) * dh;  // grad_v is contiguous
      for (int64_t j = 0; j < keys; ++j) {
        T* dst = dv_head + j * p.heads_kv * dh;
        for (int64_t d = 0; d < dh; ++d)
          dst[d] = static_cast<T>(static_cast<float>(dst[d]) + sum[d]);
      }
    }
  });
}

}  // namespace

bool image_text_attention_supported() { return avx512_supported(); }

void image_text_attention_fwd(const ImageTextAttentionFwdParams& params) {
  const bool mean = params.empty_rows == EmptyRows::kMean;
  if (params.dtype == AttentionDtype::kBFloat16) {
    Forward<BFloat16>(params).run();
    if (mean) write_mean_rows<BFloat16>(params);
  } else {
    Forward<float>(params).run();
    if (mean) write_mean_rows<float>(params);
  }
}

void image_text_attention_bwd(const ImageTextAttentionBwdParams& params) {
  const bool mean = params.empty_rows == EmptyRows::kMean;
  if (params.dtype == AttentionDtype::kBFloat16) {
    Backward<BFloat16>(params).run();
    if (mean) add_mean_rows_grad<BFloat16>(params);
  } else {
    Backward<float>(params).run();
    if (mean) add_mean_rows_grad<float>(params);
  }
}

}  // namespace cpu
}  // namespace vlmk

#if VLMK_ATTENTION_AVX512
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif
