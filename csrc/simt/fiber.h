// Fibers for the SIMT emulator: a stack per emulated CUDA thread and a context switch.
//
// x86-64 uses a hand-written switch of the callee-saved integer registers (a few ns; the SSE/x87
// control words are not switched: every fiber runs with the floating-point environment of the
// thread that runs the block, and kernels do not change it);
// other targets, or any build with -DSIMT_USE_UCONTEXT, use POSIX ucontext (swapcontext makes a
// sigprocmask system call per switch: ~0.5 us, still fine for tests).
//
// A fiber never migrates between OS threads: the fibers of one block are created, run and
// abandoned on the worker thread that runs the block. That is what makes `thread_local` state
// (the current thread index, `__shared__` storage) correct inside fibers.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#if !defined(__x86_64__) && !defined(SIMT_USE_UCONTEXT)
#define SIMT_USE_UCONTEXT 1
#endif

#if defined(SIMT_USE_UCONTEXT)
#include <ucontext.h>
#endif

namespace simt {
namespace detail {

using FiberEntry = void (*)(void*);

#if !defined(SIMT_USE_UCONTEXT)

// simt_v1_switch(save_sp, load_sp): pushes the callee-saved state on the current stack, stores
// the stack pointer in *save_sp, loads load_sp and pops the state saved there.
// simt_v1_start: the first "return address" of a new fiber; calls entry(arg) with entry in r12
// and arg in rbx, and never returns (the entry function switches away for good).
// Emitted in a COMDAT group with weak, hidden symbols so that every translation unit that includes
// this header may carry a copy and the linker keeps one.
__asm__(
    ".pushsection .text.simt_v1_switch,\"axG\",@progbits,simt_v1_switch,comdat\n"
    ".weak simt_v1_switch\n"
    ".hidden simt_v1_switch\n"
    ".type simt_v1_switch,@function\n"
    ".p2align 4\n"
    "simt_v1_switch:\n"
    "  .cfi_startproc\n"
    "  pushq %rbp\n"
    "  pushq %rbx\n"
    "  pushq %r12\n"
    "  pushq %r13\n"
    "  pushq %r14\n"
    "  pushq %r15\n"
    "  movq %rsp, (%rdi)\n"
    "  movq %rsi, %rsp\n"
    "  popq %r15\n"
    "  popq %r14\n"
    "  popq %r13\n"
    "  popq %r12\n"
    "  popq %rbx\n"
    "  popq %rbp\n"
    "  ret\n"
    "  .cfi_endproc\n"
    ".size simt_v1_switch, .-simt_v1_switch\n"
    ".popsection\n"
    ".pushsection .text.simt_v1_start,\"axG\",@progbits,simt_v1_start,comdat\n"
    ".weak simt_v1_start\n"
    ".hidden simt_v1_start\n"
    ".type simt_v1_start,@function\n"
    ".p2align 4\n"
    "simt_v1_start:\n"
    "  .cfi_startproc\n"
    "  .cfi_undefined rip\n"
    "  movq %rbx, %rdi\n"
    "  callq *%r12\n"
    "  ud2\n"
    "  .cfi_endproc\n"
    ".size simt_v1_start, .-simt_v1_start\n"
    ".popsection\n");

extern "C" __attribute__((visibility("hidden"))) void simt_v1_switch(void** save_sp, void* load_sp);
extern "C" __attribute__((visibility("hidden"))) void simt_v1_start();

// A saved execution context: the stack pointer of a suspended fiber or scheduler.
struct Context {
  void* sp = nullptr;
};

// Prepares `ctx` so that the first switch to it runs entry(arg) on the stack [stack, stack+size).
inline void make_context(Context* ctx, void* stack, size_t size, FiberEntry entry, void* arg) {
  const uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + size) & ~uintptr_t(15);
  void** frame = reinterpret_cast<void**>(top) - 7;
  frame[0] = nullptr;                                  // r15
  frame[1] = nullptr;                                  // r14
  frame[2] = nullptr;                                  // r13
  frame[3] = reinterpret_cast<void*>(entry);           // r12: function to call
  frame[4] = arg;                                      // rbx: its argument
  frame[5] = nullptr;                                  // rbp
  frame[6] = reinterpret_cast<void*>(&simt_v1_start);  // return address, at top - 8
  ctx->sp = frame;
}

// Saves the running context into `from` and resumes `to`.
inline void switch_context(Context* from, Context* to) { simt_v1_switch(&from->sp, to->sp); }

#else  // SIMT_USE_UCONTEXT

struct Context {
  ucontext_t uc;
};

inline void ucontext_trampoline(unsigned hi_entry, unsigned lo_entry, unsigned hi_arg,
                                unsigned lo_arg) {
  auto entry = reinterpret_cast<FiberEntry>((uintptr_t(hi_entry) << 32) | uintptr_t(lo_entry));
  void* arg = reinterpret_cast<void*>((uintptr_t(hi_arg) << 32) | uintptr_t(lo_arg));
  entry(arg);
  std::abort();  // entry never returns
}

inline void make_context(Context* ctx, void* stack, size_t size, FiberEntry entry, void* arg) {
  if (getcontext(&ctx->uc) != 0) {
    std::fprintf(stderr, "simt: getcontext failed\n");
    std::abort();
  }
  ctx->uc.uc_stack.ss_sp = stack;
  ctx->uc.uc_stack.ss_size = size;
  ctx->uc.uc_link = nullptr;
  uintptr_t e = reinterpret_cast<uintptr_t>(entry);
  uintptr_t a = reinterpret_cast<uintptr_t>(arg);
  makecontext(&ctx->uc, reinterpret_cast<void (*)()>(&ucontext_trampoline), 4,
              unsigned(uint64_t(e) >> 32), unsigned(e & 0xffffffffu), unsigned(uint64_t(a) >> 32),
              unsigned(a & 0xffffffffu));
}

inline void switch_context(Context* from, Context* to) { swapcontext(&from->uc, &to->uc); }

#endif  // SIMT_USE_UCONTEXT

// Stacks for up to `count` fibers in one mapping, each below a PROT_NONE guard page so that a
// stack overflow faults instead of silently corrupting the neighbouring fiber. Pages are touched
// lazily (MAP_NORESERVE), so a large virtual size costs little resident memory.
class StackArena {
 public:
  StackArena() = default;
  StackArena(const StackArena&) = delete;
  StackArena& operator=(const StackArena&) = delete;
  ~StackArena() { release(); }

  // Makes room for `count` stacks of `stack_bytes` each; returns false when mmap fails.
  bool reserve(size_t count, size_t stack_bytes) {
    const size_t page = size_t(sysconf(_SC_PAGESIZE));
    stack_bytes = (stack_bytes + page - 1) / page * page;
    if (count <= count_ && stack_bytes == stack_bytes_) return true;
    if (count < count_) count = count_;
    release();
    const size_t stride = stack_bytes + page;
    void* base = mmap(nullptr, stride * count, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
    if (base == MAP_FAILED) return false;
    for (size_t i = 0; i < count; ++i) {
      mprotect(static_cast<char*>(base) + i * stride, page, PROT_NONE);
    }
    base_ = static_cast<char*>(base);
    count_ = count;
    stack_bytes_ = stack_bytes;
    page_ = page;
    return true;
  }

  // The lowest usable address of stack `i` (above its guard page).
  void* stack(size_t i) const { return base_ + i * (stack_bytes_ + page_) + page_; }
  size_t stack_bytes() const { return stack_bytes_; }

 private:
  void release() {
    if (base_ != nullptr) munmap(base_, (stack_bytes_ + page_) * count_);
    base_ = nullptr;
    count_ = 0;
  }

  char* base_ = nullptr;
  size_t count_ = 0;
  size_t stack_bytes_ = 0;
  size_t page_ = 4096;
};

}  // namespace detail
}  // namespace simt
