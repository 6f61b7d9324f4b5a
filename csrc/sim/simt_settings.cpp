// The emulator's settings (see simt_settings.h). One process-wide Config lives in simt/runtime.h;
// every sim TU of the extension shares it (an inline function's static).
#define VLMK_SIMT 1
#include "sim/simt_settings.h"

#include <stdexcept>

#include "common/cuda_compat.cuh"

namespace vlmk {
namespace sim {

namespace {

const char* schedule_name(simt::Schedule s) {
  switch (s) {
    case simt::Schedule::kAlternate:
      return "alternate";
    case simt::Schedule::kForward:
      return "forward";
    case simt::Schedule::kReverse:
      return "reverse";
    case simt::Schedule::kRandom:
      return "random";
  }
  return "alternate";
}

simt::Schedule schedule_from_name(const std::string& name) {
  for (simt::Schedule s : {simt::Schedule::kAlternate, simt::Schedule::kForward,
                           simt::Schedule::kReverse, simt::Schedule::kRandom}) {
    if (name == schedule_name(s)) return s;
  }
  throw std::invalid_argument("unknown SIMT schedule '" + name +
                              "' (alternate, forward, reverse or random)");
}

// A planted fault: each thread writes its slot and reads its neighbour's with no __syncthreads
// in between (a write-read race), so the neighbour's slot may still hold the poison.
__global__ void race_probe_kernel(float* out) {
  VLMK_SHARED(float[kRaceProbeThreads], slots);
  const unsigned t = threadIdx.x;
  st_shared(&slots[t], 1.0f);
  out[t] = ld_shared(&slots[(t + 1) % kRaceProbeThreads]);
}

}  // namespace

RaceProbe simt_race_probe() {
  float out[kRaceProbeThreads];
  const cudaError_t e = VLMK_LAUNCH(race_probe_kernel, 1, kRaceProbeThreads, 0, nullptr, out);
  RaceProbe probe;
  if (e != cudaSuccess) {
    probe.message = cudaGetErrorString(e);
  } else {
    probe.first_value = out[0];
  }
  return probe;
}

SimtSettings simt_settings() {
  const simt::Config c = simt::get_config();
  return {c.racecheck, schedule_name(c.schedule), c.seed, c.num_threads};
}

void set_simt_settings(const SimtSettings& settings) {
  if (settings.num_threads < 1) throw std::invalid_argument("num_threads must be >= 1");
  simt::Config c = simt::get_config();
  c.racecheck = settings.racecheck;
  c.schedule = schedule_from_name(settings.schedule);
  c.seed = settings.seed;
  c.num_threads = settings.num_threads;
  simt::set_config(c);
}

}  // namespace sim
}  // namespace vlmk
