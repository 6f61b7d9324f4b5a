// 3-D grids and blocks: every thread of every block runs once with the right indices.
#include "simt/tests/check.h"

struct Ids {
  unsigned tx, ty, tz, bx, by, bz, bdx, bdy, bdz, gdx, gdy, gdz;
};

__global__ void record_ids(Ids* out, int* visits) {
  const unsigned block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const unsigned thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const unsigned global = block * (blockDim.x * blockDim.y * blockDim.z) + thread;
  out[global] = Ids{threadIdx.x, threadIdx.y, threadIdx.z, blockIdx.x, blockIdx.y, blockIdx.z,
                    blockDim.x,  blockDim.y,  blockDim.z,  gridDim.x,  gridDim.y,  gridDim.z};
  atomicAdd(&visits[global], 1);
}

SIMT_TEST(three_dimensional_grid_and_block) {
  const dim3 grid(3, 4, 2), block(5, 3, 4);
  const unsigned threads = 5 * 3 * 4, total = 3 * 4 * 2 * threads;
  std::vector<Ids> out(total);
  std::vector<int> visits(total, 0);
  CHECK_CUDA(VLMK_LAUNCH(record_ids, grid, block, 0, nullptr, out.data(), visits.data()));
  unsigned i = 0;
  for (unsigned bz = 0; bz < 2; ++bz)
    for (unsigned by = 0; by < 4; ++by)
      for (unsigned bx = 0; bx < 3; ++bx)
        for (unsigned tz = 0; tz < 4; ++tz)
          for (unsigned ty = 0; ty < 3; ++ty)
            for (unsigned tx = 0; tx < 5; ++tx, ++i) {
              const Ids& r = out[i];
              CHECK_EQ(visits[i], 1);
              CHECK(r.tx == tx && r.ty == ty && r.tz == tz);
              CHECK(r.bx == bx && r.by == by && r.bz == bz);
              CHECK(r.bdx == 5 && r.bdy == 3 && r.bdz == 4);
              CHECK(r.gdx == 3 && r.gdy == 4 && r.gdz == 2);
            }
}

__global__ void count_blocks(int* count) {
  if (threadIdx.x == 0 && threadIdx.y == 0 && threadIdx.z == 0) atomicAdd(count, 1);
}

SIMT_TEST(extreme_shapes) {
  int count = 0;
  CHECK_CUDA(VLMK_LAUNCH(count_blocks, dim3(1, 1, 300), dim3(1, 1, 64), 0, nullptr, &count));
  CHECK_EQ(count, 300);
  count = 0;
  CHECK_CUDA(VLMK_LAUNCH(count_blocks, dim3(1, 700), dim3(1, 1024), 0, nullptr, &count));
  CHECK_EQ(count, 700);
  count = 0;
  CHECK_CUDA(VLMK_LAUNCH(count_blocks, 5000, 1, 0, nullptr, &count));
  CHECK_EQ(count, 5000);
}

// A grid-stride loop, the usual 1-D idiom.
__global__ void saxpy(int n, float a, const float* __restrict__ x, float* __restrict__ y) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
    y[i] = a * x[i] + y[i];
  }
}

SIMT_TEST(grid_stride_loop) {
  const int n = 10007;
  std::vector<float> x(n), y(n);
  for (int i = 0; i < n; ++i) {
    x[i] = float(i);
    y[i] = 1.0f;
  }
  CHECK_CUDA(VLMK_LAUNCH(saxpy, 7, 96, 0, nullptr, n, 2.0f, x.data(), y.data()));
  for (int i = 0; i < n; ++i) CHECK_EQ(y[i], 2.0f * float(i) + 1.0f);
}
