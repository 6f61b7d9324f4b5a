// A tiny test harness for the SIMT emulator's tests (no dependencies). Each test file is one
// executable: SIMT_TEST(name) { ... } registers a case, main() runs them all (or those whose
// name contains argv[1]) and exits nonzero if any check failed.
#pragma once

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "common/cuda_compat.cuh"

namespace simt_test {

struct Case {
  const char* name;
  void (*fn)();
};

inline std::vector<Case>& cases() {
  static std::vector<Case> all;
  return all;
}

inline int& failures() {
  static int count = 0;
  return count;
}

inline bool add(const char* name, void (*fn)()) {
  cases().push_back({name, fn});
  return true;
}

inline void fail(const char* file, int line, const std::string& what) {
  std::fprintf(stderr, "%s:%d: FAILED: %s\n", file, line, what.c_str());
  ++failures();
}

inline std::string show(double v) { return std::to_string(v); }
inline std::string show(float v) { return std::to_string(v); }
inline std::string show(long long v) { return std::to_string(v); }
inline std::string show(unsigned long long v) { return std::to_string(v); }
inline std::string show(long v) { return std::to_string(v); }
inline std::string show(unsigned long v) { return std::to_string(v); }
inline std::string show(int v) { return std::to_string(v); }
inline std::string show(unsigned v) { return std::to_string(v); }
inline std::string show(bool v) { return v ? "true" : "false"; }
inline std::string show(const std::string& v) { return "\"" + v + "\""; }
inline std::string show(const char* v) { return show(std::string(v)); }

}  // namespace simt_test

#define SIMT_TEST(name)                                               \
  static void name();                                                 \
  static const bool name##_registered = simt_test::add(#name, &name); \
  static void name()

#define CHECK(cond)                                                       \
  do {                                                                    \
    if (!(cond)) simt_test::fail(__FILE__, __LINE__, "CHECK(" #cond ")"); \
  } while (0)

#define CHECK_EQ(a, b)                                                                    \
  do {                                                                                    \
    const auto check_a_ = (a);                                                            \
    const auto check_b_ = (b);                                                            \
    if (!(check_a_ == check_b_)) {                                                        \
      simt_test::fail(__FILE__, __LINE__,                                                 \
                      "CHECK_EQ(" #a ", " #b "): " + simt_test::show(check_a_) + " vs " + \
                          simt_test::show(check_b_));                                     \
    }                                                                                     \
  } while (0)

#define CHECK_NEAR(a, b, tol)                                                               \
  do {                                                                                      \
    const double check_a_ = (a);                                                            \
    const double check_b_ = (b);                                                            \
    if (!(std::fabs(check_a_ - check_b_) <= (tol))) {                                       \
      simt_test::fail(__FILE__, __LINE__,                                                   \
                      "CHECK_NEAR(" #a ", " #b "): " + simt_test::show(check_a_) + " vs " + \
                          simt_test::show(check_b_));                                       \
    }                                                                                       \
  } while (0)

#define CHECK_CUDA(expr)                                                         \
  do {                                                                           \
    const cudaError_t check_e_ = (expr);                                         \
    if (check_e_ != cudaSuccess) {                                               \
      simt_test::fail(__FILE__, __LINE__,                                        \
                      std::string(#expr " -> ") + cudaGetErrorString(check_e_)); \
    }                                                                            \
  } while (0)

// Checks that `text` contains `part`.
#define CHECK_CONTAINS(text, part)                                                        \
  do {                                                                                    \
    const std::string check_t_ = (text);                                                  \
    if (check_t_.find(part) == std::string::npos) {                                       \
      simt_test::fail(__FILE__, __LINE__,                                                 \
                      "expected to find \"" + std::string(part) + "\" in:\n" + check_t_); \
    }                                                                                     \
  } while (0)

int main(int argc, char** argv) {
  int run = 0;
  for (const simt_test::Case& c : simt_test::cases()) {
    if (argc > 1 && std::strstr(c.name, argv[1]) == nullptr) continue;
    const int before = simt_test::failures();
    const auto start = std::chrono::steady_clock::now();
    c.fn();
    const double ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    std::printf("[%s] %s (%.1f ms)\n", simt_test::failures() == before ? "  OK  " : "FAILED",
                c.name, ms);
    ++run;
  }
  std::printf("%d test(s), %d failed check(s)\n", run, simt_test::failures());
  return simt_test::failures() == 0 && run > 0 ? 0 : 1;
}
