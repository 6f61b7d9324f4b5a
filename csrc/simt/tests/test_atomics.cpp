// Atomics from many blocks running on several OS threads at once: exact counts.
#include "simt/tests/check.h"

struct Counters {
  int i;
  unsigned u;
  unsigned long long ull;
  long long ll;
  float f;
  double d;
  int max_i;
  int min_i;
  unsigned long long max_ull;
  unsigned or_bits;
  unsigned and_bits;
  unsigned wrapped;
  int cas_counter;
  int exch_seen;
  __half h;
  __nv_bfloat16 b;
};

__global__ void hammer(Counters* c) {
  const int gid = int(blockIdx.x * blockDim.x + threadIdx.x);
  atomicAdd(&c->i, 1);
  atomicAdd(&c->u, 2u);
  atomicAdd(&c->ull, 3ull);
  atomicAdd(&c->ll, -1ll);
  atomicAdd(&c->f, 1.0f);  // integers below 2^24 are exact in float
  atomicAdd(&c->d, 0.5);
  atomicMax(&c->max_i, gid);
  atomicMin(&c->min_i, -gid);
  atomicMax(&c->max_ull, static_cast<unsigned long long>(gid) * 3ull);
  atomicOr(&c->or_bits, 1u << (gid % 32));
  atomicAnd(&c->and_bits, ~(1u << (gid % 16)));
  atomicInc(&c->wrapped, 999u);
  // A counter incremented with compare-and-swap retries.
  int old = c->cas_counter, assumed;
  do {
    assumed = old;
    old = atomicCAS(&c->cas_counter, assumed, assumed + 1);
  } while (old != assumed);
  atomicExch(&c->exch_seen, gid);
  if (gid < 2048) {
    atomicAdd(&c->h, __float2half(1.0f));
    atomicAdd(&c->b, __float2bfloat16(1.0f));
  }
}

SIMT_TEST(exact_counts_from_many_blocks) {
  const simt::Config saved = simt::get_config();
  simt::Config c = saved;
  c.num_threads = 4;  // more OS threads than cores: plenty of real contention
  simt::set_config(c);
  const unsigned blocks = 512, threads = 256, n = blocks * threads;
  Counters k{};
  k.min_i = 1 << 30;
  k.and_bits = 0xffffffffu;
  k.exch_seen = -1;
  k.h = __float2half(0.0f);
  k.b = __float2bfloat16(0.0f);
  CHECK_CUDA(VLMK_LAUNCH(hammer, blocks, threads, 0, nullptr, &k));
  simt::set_config(saved);
  CHECK_EQ(k.i, int(n));
  CHECK_EQ(k.u, 2u * n);
  CHECK_EQ(k.ull, 3ull * n);
  CHECK_EQ(k.ll, -static_cast<long long>(n));
  CHECK_EQ(k.f, float(n));
  CHECK_EQ(k.d, 0.5 * n);
  CHECK_EQ(k.max_i, int(n) - 1);
  CHECK_EQ(k.min_i, -(int(n) - 1));
  CHECK_EQ(k.max_ull, 3ull * (n - 1));
  CHECK_EQ(k.or_bits, 0xffffffffu);
  CHECK_EQ(k.and_bits, 0xffff0000u);
  CHECK_EQ(k.wrapped, n % 1000u);
  CHECK_EQ(k.cas_counter, int(n));
  CHECK(k.exch_seen >= 0 && k.exch_seen < int(n));
  CHECK_EQ(__half2float(k.h), 2048.0f);
  CHECK_EQ(__bfloat162float(k.b), 256.0f);  // bf16 stops counting at 256 (8-bit mantissa)
}

__global__ void old_values(unsigned* counter, unsigned* tickets) {
  tickets[blockIdx.x * blockDim.x + threadIdx.x] = atomicAdd(counter, 1u);
}

SIMT_TEST(atomic_returns_distinct_old_values) {
  const unsigned blocks = 64, threads = 128, n = blocks * threads;
  unsigned counter = 0;
  std::vector<unsigned> tickets(n);
  CHECK_CUDA(VLMK_LAUNCH(old_values, blocks, threads, 0, nullptr, &counter, tickets.data()));
  std::vector<int> seen(n, 0);
  for (unsigned t : tickets) {
    CHECK(t < n);
    if (t < n) ++seen[t];
  }
  for (int s : seen) CHECK_EQ(s, 1);
}

// The "last block finishes the job" pattern: a fence, an atomic ticket, the last block reads
// what all the others wrote.
__global__ void last_block_sums(const int* in, int* partial, unsigned* done, int* total) {
  __shared__ int block_sum;
  __shared__ bool is_last;
  if (threadIdx.x == 0) block_sum = 0;
  __syncthreads();
  atomicAdd(&block_sum, in[blockIdx.x * blockDim.x + threadIdx.x]);
  __syncthreads();
  if (threadIdx.x == 0) {
    partial[blockIdx.x] = block_sum;
    __threadfence();
    is_last = atomicAdd(done, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (is_last && threadIdx.x == 0) {
    __threadfence();
    int s = 0;
    for (unsigned b = 0; b < gridDim.x; ++b) s += atomicAdd(&partial[b], 0);
    *total = s;
  }
}

SIMT_TEST(last_block_pattern) {
  const unsigned blocks = 100, threads = 64;
  std::vector<int> in(blocks * threads), partial(blocks, 0);
  for (size_t i = 0; i < in.size(); ++i) in[i] = int(i % 9);
  unsigned done = 0;
  int total = -1;
  CHECK_CUDA(VLMK_LAUNCH(last_block_sums, blocks, threads, 0, nullptr, in.data(), partial.data(),
                         &done, &total));
  long long expect = 0;
  for (int v : in) expect += v;
  CHECK_EQ(static_cast<long long>(total), expect);
}
