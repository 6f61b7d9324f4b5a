// common/tensor_core.cuh under the SIMT emulator: mma (bf16, f16, tf32) against a host product,
// ldmatrix x1/x2/x4 (+ .trans) element by element, cp.async pipelines and zero-fill, and the
// planted faults each must catch (a transposed fragment, a missing wait, a missing barrier).
#include <cstdint>
#include <random>
#include <vector>

#include "simt/tests/check.h"
#include "simt/tests/tensor_core_kernels.cuh"

namespace {

// Sets the race checker for one scope.
struct RacecheckScope {
  explicit RacecheckScope(bool on) : saved(simt::get_config()) {
    simt::Config c = saved;
    c.racecheck = on;
    simt::set_config(c);
  }
  ~RacecheckScope() { simt::set_config(saved); }
  simt::Config saved;
};

float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

float half_value(uint16_t h, bool bf16) {
  return bf16 ? simt::detail::bf16_bits_to_float(h) : simt::detail::half_bits_to_float(h);
}

uint16_t half_bits(float f, bool bf16) {
  return bf16 ? simt::detail::float_to_bf16_bits(f) : simt::detail::float_to_half_bits(f);
}

// A random 16x8x16 problem in 16-bit: A [m][k], B [k][n], C [m][n], and the reference D.
struct Problem16 {
  std::vector<uint16_t> a, b;  // bits
  std::vector<float> c;
  std::vector<double> d;  // reference, from the rounded inputs
  double scale = 0;       // sum |a b| + |c| (largest row), for the tolerance
};

Problem16 make_problem16(bool bf16, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-2.0f, 2.0f);
  Problem16 p;
  p.a.resize(16 * 16);
  p.b.resize(16 * 8);
  p.c.resize(16 * 8);
  p.d.assign(16 * 8, 0.0);
  for (auto& v : p.a) v = half_bits(u(rng), bf16);
  for (auto& v : p.b) v = half_bits(u(rng), bf16);
  for (auto& v : p.c) v = u(rng);
  for (int m = 0; m < 16; ++m) {
    for (int n = 0; n < 8; ++n) {
      double acc = p.c[m * 8 + n];
      double mag = std::fabs(acc);
      for (int k = 0; k < 16; ++k) {
        const double prod =
            double(half_value(p.a[m * 16 + k], bf16)) * half_value(p.b[k * 8 + n], bf16);
        acc += prod;
        mag += std::fabs(prod);
      }
      p.d[m * 8 + n] = acc;
      p.scale = std::max(p.scale, mag);
    }
  }
  return p;
}

// Packs 16-bit elements two per word (element 2i in the low half).
std::vector<uint32_t> words(const std::vector<uint16_t>& h) {
  std::vector<uint32_t> w(h.size() / 2);
  for (size_t i = 0; i < w.size(); ++i) w[i] = uint32_t(h[2 * i]) | (uint32_t(h[2 * i + 1]) << 16);
  return w;
}

template <bool kBf16, int kBLayout, int kFault>
double mma16_max_error(const Problem16& p, cudaError_t* error) {
  std::vector<uint16_t> b_stored(16 * 8);
  for (int k = 0; k < 16; ++k) {
    for (int n = 0; n < 8; ++n) {
      if (kBLayout == tck::kBKMajor) {
        b_stored[n * 16 + k] = p.b[k * 8 + n];
      } else {
        b_stored[k * 8 + n] = p.b[k * 8 + n];
      }
    }
  }
  const std::vector<uint32_t> aw = words(p.a), bw = words(b_stored);
  std::vector<float> d(16 * 8, -1.0f);
  *error = VLMK_LAUNCH((tck::mma_m16n8k16_kernel<kBf16, kBLayout, kFault>), 1, 32, 0, nullptr,
                       aw.data(), bw.data(), p.c.data(), d.data());
  double err = 0;
  for (int i = 0; i < 16 * 8; ++i) {
    const double e = std::fabs(double(d[i]) - p.d[i]);
    err = std::isnan(e) ? INFINITY : std::max(err, e);
  }
  return err;
}

template <bool kBf16>
void check_mma16(const char* dtype) {
  for (unsigned seed = 1; seed <= 3; ++seed) {
    const Problem16 p = make_problem16(kBf16, seed);
    // fp32 accumulation of 16 exact products: a few ulps of the largest partial sum.
    const double tol = 16 * p.scale * 6e-8;
    cudaError_t e;
    const double k_major = mma16_max_error<kBf16, tck::kBKMajor, tck::kNoFault>(p, &e);
    CHECK_CUDA(e);
    CHECK_NEAR(k_major, 0.0, tol);
    const double n_major = mma16_max_error<kBf16, tck::kBNMajor, tck::kNoFault>(p, &e);
    CHECK_CUDA(e);
    CHECK_NEAR(n_major, 0.0, tol);
    // Planted faults: each gives a product that is plainly wrong.
    const double swapped = mma16_max_error<kBf16, tck::kBKMajor, tck::kSwapA12>(p, &e);
    CHECK_CUDA(e);
    const double wrong_b_k = mma16_max_error<kBf16, tck::kBKMajor, tck::kWrongBTrans>(p, &e);
    CHECK_CUDA(e);
    const double wrong_b_n = mma16_max_error<kBf16, tck::kBNMajor, tck::kWrongBTrans>(p, &e);
    CHECK_CUDA(e);
    CHECK(swapped > 0.5);
    CHECK(wrong_b_k > 0.5);
    CHECK(wrong_b_n > 0.5);
    if (seed == 1) {
      std::printf(
          "  %s: max |err| %.3g (K-major B), %.3g (N-major B), tol %.3g; faults: "
          "a1<->a2 %.3g, B no-trans/trans swapped %.3g / %.3g\n",
          dtype, k_major, n_major, tol, swapped, wrong_b_k, wrong_b_n);
    }
  }
}

}  // namespace

SIMT_TEST(mma_m16n8k16_bf16_matches_host_product) { check_mma16<true>("bf16"); }

SIMT_TEST(mma_m16n8k16_f16_matches_host_product) { check_mma16<false>("f16"); }

namespace {

double tf32_value(float x) { return double(bits_float(vlmk::tc::to_tf32(x))); }

template <int kFault>
double tf32_max_error(unsigned seed, double* tol, cudaError_t* error) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-2.0f, 2.0f);
  std::vector<float> a(16 * 8), b(8 * 8), c(16 * 8), d(16 * 8, -1.0f);
  for (auto& v : a) v = u(rng);
  for (auto& v : b) v = u(rng);
  for (auto& v : c) v = u(rng);
  *error = VLMK_LAUNCH((tck::mma_m16n8k8_tf32_kernel<kFault>), 1, 32, 0, nullptr, a.data(),
                       b.data(), c.data(), d.data());
  double err = 0, scale = 0;
  for (int m = 0; m < 16; ++m) {
    for (int n = 0; n < 8; ++n) {
      double acc = c[m * 8 + n], mag = std::fabs(acc);
      for (int k = 0; k < 8; ++k) {
        const double prod = tf32_value(a[m * 8 + k]) * tf32_value(b[k * 8 + n]);
        acc += prod;
        mag += std::fabs(prod);
      }
      scale = std::max(scale, mag);
      const double e = std::fabs(double(d[m * 8 + n]) - acc);
      err = std::isnan(e) ? INFINITY : std::max(err, e);
    }
  }
  *tol = 8 * scale * 6e-8;
  return err;
}

}  // namespace

SIMT_TEST(mma_m16n8k8_tf32_matches_host_product) {
  for (unsigned seed = 1; seed <= 3; ++seed) {
    double tol;
    cudaError_t e;
    const double err = tf32_max_error<tck::kNoFault>(seed, &tol, &e);
    CHECK_CUDA(e);
    CHECK_NEAR(err, 0.0, tol);
    double tol2;
    const double swapped = tf32_max_error<tck::kSwapA12>(seed, &tol2, &e);
    CHECK_CUDA(e);
    CHECK(swapped > 0.5);
    if (seed == 1) {
      std::printf("  tf32: max |err| %.3g, tol %.3g; fault a1<->a2 %.3g\n", err, tol, swapped);
    }
  }
}

SIMT_TEST(tf32_rounding_and_packing) {
  // cvt.rna: ties away from zero at bit 13, the low 13 bits cleared.
  CHECK_EQ(vlmk::tc::to_tf32(1.0f), 0x3f800000u);
  CHECK_EQ(vlmk::tc::to_tf32(bits_float(0x3f801000u)), 0x3f802000u);  // tie -> away
  CHECK_EQ(vlmk::tc::to_tf32(bits_float(0xbf801000u)), 0xbf802000u);  // negative tie -> away
  CHECK_EQ(vlmk::tc::to_tf32(bits_float(0x3f800fffu)), 0x3f800000u);  // below half -> down
  CHECK_EQ(vlmk::tc::to_tf32(bits_float(0x3f803000u)), 0x3f804000u);  // odd tie -> away too
  CHECK_EQ(vlmk::tc::to_tf32(INFINITY), 0x7f800000u);
  CHECK(std::isnan(bits_float(vlmk::tc::to_tf32(NAN))));
  CHECK_EQ(vlmk::tc::to_tf32(bits_float(0x7f7fffffu)), 0x7f800000u);  // rounds up to inf
  // pack: lo in the low half, round to nearest even.
  CHECK_EQ(vlmk::tc::pack_bf16(1.0f, -2.0f), 0xc0003f80u);
  CHECK_EQ(vlmk::tc::pack_f16(1.0f, -2.0f), 0xc0003c00u);
  CHECK_EQ(vlmk::tc::pack_bf16(bits_float(0x3f808000u), 0.0f), 0x00003f80u);  // tie -> even
  CHECK_EQ(vlmk::tc::pack_bf16(bits_float(0x3f818000u), 0.0f), 0x00003f82u);  // tie -> even
  CHECK_EQ(float_bits(0.0f), 0u);
}

// ---- ldmatrix, element by element ----------------------------------------------------------

namespace {

template <int kCount, bool kTrans>
void check_ldmatrix() {
  std::vector<uint32_t> out(32 * 4, 0);
  CHECK_CUDA(VLMK_LAUNCH((tck::ldmatrix_probe_kernel<kCount, kTrans, true>), 1, 32, 0, nullptr,
                         out.data()));
  int bad = 0;
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    for (int i = 0; i < 4; ++i) {
      uint32_t want = 0xdeadbeefu;  // registers past kCount are untouched
      if (i < kCount) {
        // Matrix i holds m*64 + r*8 + c at (r, c); lane l gets (g, 2t), (g, 2t+1), or the
        // transposed elements (2t, g), (2t+1, g).
        const uint32_t lo = kTrans ? i * 64 + 2 * t * 8 + g : i * 64 + g * 8 + 2 * t;
        const uint32_t hi = kTrans ? lo + 8 : lo + 1;
        want = lo | (hi << 16);
      }
      if (out[l * 4 + i] != want && bad++ < 4) {
        CHECK_EQ(out[l * 4 + i], want);
        std::printf("  lane %d register %d (x%d%s)\n", l, i, kCount, kTrans ? ".trans" : "");
      }
    }
  }
  CHECK_EQ(bad, 0);
}

}  // namespace

SIMT_TEST(ldmatrix_x1_x2_x4_each_element) {
  check_ldmatrix<1, false>();
  check_ldmatrix<2, false>();
  check_ldmatrix<4, false>();
}

SIMT_TEST(ldmatrix_trans_x1_x2_x4_each_element) {
  check_ldmatrix<1, true>();
  check_ldmatrix<2, true>();
  check_ldmatrix<4, true>();
}

SIMT_TEST(ldmatrix_rows_written_by_other_lanes_without_sync_is_a_race) {
  RacecheckScope on(true);
  std::vector<uint32_t> out(32 * 4, 0);
  CHECK_CUDA(
      VLMK_LAUNCH((tck::ldmatrix_probe_kernel<4, false, true>), 1, 32, 0, nullptr, out.data()));
  const cudaError_t e =
      VLMK_LAUNCH((tck::ldmatrix_probe_kernel<4, false, false>), 1, 32, 0, nullptr, out.data());
  CHECK_EQ(int(e), int(cudaErrorLaunchFailure));
  const std::string message = cudaGetErrorString(e);
  CHECK_CONTAINS(message, "shared-memory race (write-read)");
  CHECK_CONTAINS(message, "tensor_core_kernels.cuh:");
}

SIMT_TEST(ldmatrix_is_a_rendezvous_not_a_memory_barrier) {
  RacecheckScope on(true);
  std::vector<uint32_t> out(32, 0);
  CHECK_CUDA(
      VLMK_LAUNCH((tck::ldmatrix_is_not_a_barrier_kernel<true>), 1, 32, 0, nullptr, out.data()));
  const cudaError_t e =
      VLMK_LAUNCH((tck::ldmatrix_is_not_a_barrier_kernel<false>), 1, 32, 0, nullptr, out.data());
  CHECK_EQ(int(e), int(cudaErrorLaunchFailure));
  const std::string message = cudaGetErrorString(e);
  CHECK_CONTAINS(message, "race (write-read)");
  CHECK_CONTAINS(message, "thread (0,0,0) wrote it");
  CHECK_CONTAINS(message, "thread (1,0,0) reads it");
}

// ---- cp.async ---------------------------------------------------------------------------------

namespace {

constexpr int kTiles = 5;

std::vector<float> pipeline_input() {
  std::vector<float> tiles(size_t(kTiles) * tck::kPipeThreads * 4);
  for (size_t i = 0; i < tiles.size(); ++i) tiles[i] = float(i) * 0.5f + 1.0f;
  return tiles;
}

template <int kFault>
cudaError_t run_pipeline(std::vector<float>* out) {
  static const std::vector<float> tiles = pipeline_input();
  out->assign(tiles.size(), -7.0f);
  return VLMK_LAUNCH((tck::cp_async_pipeline_kernel<kFault>), 1, tck::kPipeThreads, 0, nullptr,
                     tiles.data(), kTiles, out->data());
}

}  // namespace

SIMT_TEST(cp_async_double_buffering_gives_the_data) {
  const std::vector<float> tiles = pipeline_input();
  for (bool racecheck : {false, true}) {
    RacecheckScope scope(racecheck);
    std::vector<float> out;
    CHECK_CUDA(run_pipeline<tck::kNoFault>(&out));
    int bad = 0;
    for (int t = 0; t < kTiles; ++t) {
      for (int tid = 0; tid < tck::kPipeThreads; ++tid) {
        const int src = (tid + 1) % tck::kPipeThreads;
        for (int j = 0; j < 4; ++j) {
          bad += out[(t * tck::kPipeThreads + tid) * 4 + j] !=
                 tiles[(t * tck::kPipeThreads + src) * 4 + j];
        }
      }
    }
    CHECK_EQ(bad, 0);
  }
}

SIMT_TEST(cp_async_missing_wait_reads_the_poison) {
  RacecheckScope off(false);
  std::vector<float> out;
  CHECK_CUDA(run_pipeline<tck::kMissingWait>(&out));
  int nan = 0;
  for (float v : out) nan += std::isnan(v);
  // Nothing lands before the final wait<0>: every value read is the 0xff poison.
  CHECK_EQ(nan, int(out.size()));
}

SIMT_TEST(cp_async_missing_barrier_after_wait_is_a_race) {
  RacecheckScope on(true);
  std::vector<float> out;
  const cudaError_t e = run_pipeline<tck::kMissingSync>(&out);
  CHECK_EQ(int(e), int(cudaErrorLaunchFailure));
  const std::string message = cudaGetErrorString(e);
  CHECK_CONTAINS(message, "shared-memory race");
  CHECK_CONTAINS(message, "cp_async_pipeline_kernel");
  CHECK_CONTAINS(message, "static shared 'stage'");
  CHECK_CONTAINS(message, "tensor_core_kernels.cuh:");
}

SIMT_TEST(cp_async_invalid_source_zero_fills) {
  RacecheckScope on(true);
  std::vector<float> src(tck::kPipeThreads * 4), out(tck::kPipeThreads * 4, -1.0f);
  for (size_t i = 0; i < src.size(); ++i) src[i] = float(i) + 0.25f;
  CHECK_CUDA(VLMK_LAUNCH(tck::cp_async_zfill_kernel, 1, tck::kPipeThreads, 0, nullptr, src.data(),
                         out.data()));
  int bad = 0;
  for (int tid = 0; tid < tck::kPipeThreads; ++tid) {
    const int nb = (tid + 1) % tck::kPipeThreads;
    for (int j = 0; j < 4; ++j) {
      const float want = nb % 2 == 0 ? src[nb * 4 + j] : 0.0f;
      bad += float_bits(out[tid * 4 + j]) != float_bits(want);
    }
  }
  CHECK_EQ(bad, 0);
}

SIMT_TEST(cp_async_wait_group_retires_the_oldest_groups) {
  std::vector<float> src(16), out(64, -1.0f);
  for (int i = 0; i < 16; ++i) src[i] = float(i + 1);
  CHECK_CUDA(VLMK_LAUNCH(tck::cp_async_groups_kernel, 1, 1, 0, nullptr, src.data(), out.data()));
  // Snapshot s (0: after issue and __syncthreads, 1: wait<2>, 2: wait<1>, 3: wait<0>): chunk q
  // (group q; chunk 3 never committed) has landed when q < s, or at wait<0>.
  for (int s = 0; s < 4; ++s) {
    for (int q = 0; q < 4; ++q) {
      const bool landed = s == 3 || q < s;
      for (int j = 0; j < 4; ++j) {
        const float v = out[s * 16 + q * 4 + j];
        if (landed) {
          CHECK_EQ(v, src[q * 4 + j]);
        } else {
          CHECK(std::isnan(v));
        }
      }
    }
  }
}

// ---- misuse is reported ----------------------------------------------------------------------

namespace {

__global__ void mma_partial_warp_kernel(float* out) {
  tck::FragA a = {{0, 0, 0, 0}};
  tck::FragB b = {{0, 0}};
  tck::FragC c = {{0, 0, 0, 0}};
  vlmk::tc::mma_m16n8k16_bf16(c, a, b, c);
  out[threadIdx.x] = c.x[0];
}

__global__ void ldmatrix_divergent_kernel(uint32_t* out) {
  VLMK_SHARED(uint32_t[64], s);
  for (int i = threadIdx.x; i < 64; i += 32) vlmk::st_shared(&s[i], 0u);
  __syncthreads();
  uint32_t r = 0;
  if (threadIdx.x % 2 == 0) {
    vlmk::tc::ldmatrix_x1(r, &s[(threadIdx.x % 8) * 4]);
  } else {
    vlmk::tc::ldmatrix_x1(r, &s[(threadIdx.x % 8) * 4]);
  }
  out[threadIdx.x] = r;
}

__global__ void ldmatrix_misaligned_kernel(uint32_t* out) {
  VLMK_SHARED(uint32_t[64], s);
  for (int i = threadIdx.x; i < 64; i += 32) vlmk::st_shared(&s[i], 0u);
  __syncthreads();
  uint32_t r = 0;
  vlmk::tc::ldmatrix_x1(r, &s[(threadIdx.x % 8) * 4 + 1]);  // 4 bytes off a 16-byte row
  out[threadIdx.x] = r;
}

__global__ void cp_async_to_global_kernel(float* dst, const float* src) {
  vlmk::tc::cp_async_16(dst, src);
  vlmk::tc::cp_async_wait<0>();
}

}  // namespace

SIMT_TEST(misuse_is_reported) {
  std::vector<float> f(64, 0.0f);
  std::vector<uint32_t> u(64, 0);
  cudaError_t e = VLMK_LAUNCH(mma_partial_warp_kernel, 1, 16, 0, nullptr, f.data());
  CHECK_EQ(int(e), int(cudaErrorLaunchFailure));
  CHECK_CONTAINS(cudaGetErrorString(e), "lanes missing");
  CHECK_CUDA(VLMK_LAUNCH(mma_partial_warp_kernel, 1, 32, 0, nullptr, f.data()));

  e = VLMK_LAUNCH(ldmatrix_divergent_kernel, 1, 32, 0, nullptr, u.data());
  CHECK_EQ(int(e), int(cudaErrorLaunchFailure));
  CHECK_CONTAINS(cudaGetErrorString(e), "different ldmatrix");

  e = VLMK_LAUNCH(ldmatrix_misaligned_kernel, 1, 32, 0, nullptr, u.data());
  CHECK_EQ(int(e), int(cudaErrorMisalignedAddress));
  CHECK_CONTAINS(cudaGetErrorString(e), "not 16-byte aligned");

  alignas(16) float dst[4] = {0, 0, 0, 0};
  alignas(16) float src[4] = {1, 2, 3, 4};
  e = VLMK_LAUNCH(cp_async_to_global_kernel, 1, 1, 0, nullptr, dst, src);
  CHECK_EQ(int(e), int(cudaErrorIllegalAddress));
  CHECK_CONTAINS(cudaGetErrorString(e), "not in the block's shared memory");
}
