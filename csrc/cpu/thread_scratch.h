// Per-thread scratch memory kept across calls, for CPU kernels that need megabyte-sized packing
// buffers on every call (oneDNN caches its scratchpads the same way).
//
// Allocated per call, a buffer above glibc's mmap threshold is fresh pages every time: page faults
// on first touch, measured at ~190-1,160 per call in patch_embed's and concat_project's 16-bit
// forwards, where ATen's own GEMMs in the same process took none. A slot grows when a call needs
// more and is never shrunk; it is freed when its thread exits.
#pragma once

#include <c10/util/Exception.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>

namespace vlmk {
namespace cpu {

// Slots: one buffer per (thread, slot); a kernel uses distinct slots for buffers alive together.
enum class ScratchSlot { kA, kB, kC, kCount };

// A 64-byte-aligned buffer of at least `count` T on this thread, valid until this thread asks
// for the same slot again.
template <typename T>
T* thread_scratch(ScratchSlot slot, int64_t count) {
  struct FreeDeleter {
    void operator()(void* ptr) const { std::free(ptr); }
  };
  struct Slot {
    std::unique_ptr<char[], FreeDeleter> data;
    size_t bytes = 0;
  };
  thread_local Slot slots[static_cast<int>(ScratchSlot::kCount)];
  Slot& s = slots[static_cast<int>(slot)];
  const size_t bytes = (static_cast<size_t>(count > 0 ? count : 1) * sizeof(T) + 63) / 64 * 64;
  if (bytes > s.bytes) {
    s.data.reset();
    s.bytes = 0;
    void* ptr = std::aligned_alloc(64, bytes);
    TORCH_CHECK(ptr != nullptr, "vlm_kernels (cpu): out of memory allocating ", bytes,
                " bytes of scratch");
    s.data.reset(static_cast<char*>(ptr));
    s.bytes = bytes;
  }
  return reinterpret_cast<T*>(s.data.get());
}

}  // namespace cpu
}  // namespace vlmk
