// Settings of the SIMT emulator that runs the cuda_sim backend, for the Python extension: the
// emulator reads SIMT_* from the environment once per process, so tests that want the race checker
// or another thread schedule for a while switch them here (torch-free, like the rest of csrc/sim).
#pragma once

#include <cstdint>
#include <string>

namespace vlmk {
namespace sim {

struct SimtSettings {
  bool racecheck = false;  // SIMT_RACECHECK: report shared-memory races
  std::string schedule;    // SIMT_SCHEDULE: "alternate", "forward", "reverse" or "random"
  uint64_t seed = 0;       // SIMT_SEED: seed of the random schedule
  int num_threads = 1;     // SIMT_NUM_THREADS: OS threads running the blocks of a launch
};

// The settings later launches use.
SimtSettings simt_settings();

constexpr int kRaceProbeThreads = 64;

// Runs a one-block kernel with a planted shared-memory race under the current settings: `message`
// is the launch error ("" when it ran, i.e. the race checker is off) and `first_value` what thread
// 0 read from its neighbour's slot (NaN: the poison, under the default or forward schedule).
struct RaceProbe {
  std::string message;
  float first_value = 0.0f;
};
RaceProbe simt_race_probe();

// Replaces them (for launches that start afterwards). Throws std::invalid_argument for an unknown
// schedule name or num_threads < 1.
void set_simt_settings(const SimtSettings& settings);

}  // namespace sim
}  // namespace vlmk
