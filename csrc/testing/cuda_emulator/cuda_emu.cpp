// The emulator's scheduler: fibers, barriers, shared memory and launch checks (see cuda_emu.h).
#include "cuda_emu.h"

#include <signal.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <random>
#include <string>
#include <vector>

uint3 threadIdx;
uint3 blockIdx;
dim3 blockDim;
dim3 gridDim;

namespace cuda_emu {
namespace {

// ---- fibers: the emulated threads' contexts --------------------------------------------------------------------
// On x86-64 a switch saves the callee-saved registers and the FP control words on the old stack and loads
// them from the new one: a few nanoseconds, where swapcontext spends a system call (the signal mask) on
// each of the millions of switches a test makes. Elsewhere (or built with -DCUDA_EMU_UCONTEXT), ucontext.
#if defined(__x86_64__) && !defined(CUDA_EMU_UCONTEXT)
constexpr const char* kFibers = "x86-64 switch";
struct Fiber {
  void* sp = nullptr;
};

extern "C" void cuda_emu_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .p2align 4
  .type cuda_emu_switch, @function
cuda_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuda_emu_switch, .-cuda_emu_switch
)");

// A fresh fiber that runs entry() (which must never return) on [stack, stack + bytes).
void fiber_init(Fiber* f, char* stack, size_t bytes, void (*entry)()) {
  auto* top = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(stack + bytes) & ~uintptr_t{15});
  // Control words, six registers, entry, a null return address, padding. entry starts as if called:
  // with rsp (at the null return address) 8 mod 16, as the ABI has it.
  uint64_t* sp = top - 11;
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  sp[0] = mxcsr | (uint64_t{fpucw} << 32);
  for (int i = 1; i <= 6; ++i) sp[i] = 0;
  sp[7] = reinterpret_cast<uint64_t>(entry);  // popped by ret
  sp[8] = sp[9] = sp[10] = 0;
  f->sp = sp;
}
void fiber_switch(Fiber* from, Fiber* to) { cuda_emu_switch(&from->sp, to->sp); }
// From the fault handler (on its own stack): to `to`, abandoning the current context.
[[noreturn]] void fiber_jump(Fiber* to) {
  void* discard;
  cuda_emu_switch(&discard, to->sp);
  __builtin_unreachable();
}
#else
constexpr const char* kFibers = "ucontext";
struct Fiber {
  ucontext_t ctx;
};
void fiber_init(Fiber* f, char* stack, size_t bytes, void (*entry)()) {
  getcontext(&f->ctx);
  f->ctx.uc_stack.ss_sp = stack;
  f->ctx.uc_stack.ss_size = bytes;
  f->ctx.uc_link = nullptr;
  makecontext(&f->ctx, entry, 0);
}
void fiber_switch(Fiber* from, Fiber* to) { swapcontext(&from->ctx, &to->ctx); }
[[noreturn]] void fiber_jump(Fiber* to) {
  setcontext(&to->ctx);  // restores the scheduler's signal mask too
  std::abort();
}
#endif

enum class State { kReady, kAtBlockBarrier, kAtWarpBarrier, kDone };

struct AsyncCopy {
  void* dst;
  const void* src;
  int bytes, src_bytes;  // src_bytes < bytes: the rest is zero-filled
};

struct Thread {
  Fiber ctx;
  State state = State::kReady;
  Collective collective = Collective::kSyncwarp;  // the warp collective it waits at
  int or_pred = 0;
  std::vector<AsyncCopy> open;                 // cp.async copies not yet committed to a group
  std::vector<std::vector<AsyncCopy>> groups;  // committed groups, oldest first
};

constexpr size_t kStackBytes = 256 * 1024;  // per thread, above a guard page
constexpr size_t kGuardBytes = 256;
constexpr unsigned char kPoison = 0xFF;  // NaN in fp32, fp16 and bf16: shared memory and its guards

struct Block {
  std::vector<Thread> threads;
  std::vector<int> warp_order, lane_order;  // the order warps, and lanes within a warp, run in
  std::vector<uint64_t> exchange;  // 32 slots per warp
  std::vector<const void*> pointers;  // 32 x 4 per warp
  unsigned char* smem = nullptr;
  int current = -1;
  int or_result = 0;
  size_t smem_bytes = 0;
  Fiber scheduler;
  bool failed = false;
  cudaError_t error = cudaSuccess;  // of the fault, when failed
};

Block* g_block = nullptr;
// Set while an emulated thread runs (not the scheduler), on the OS thread g_kernel_tid that runs the
// launch: a fault elsewhere (another OS thread, the scheduler itself) is not the kernel's. Plain globals
// the fault handler can read without touching thread-local storage.
volatile sig_atomic_t g_in_kernel = 0;
volatile pid_t g_kernel_tid = 0;
pid_t current_tid() { return static_cast<pid_t>(syscall(SYS_gettid)); }  // async-signal-safe
const std::function<void()>* g_body = nullptr;
std::string g_error;
cudaError_t g_last = cudaSuccess;
// Schedules 0-3 run warps serially, in ascending (0, 2) or descending (1, 3) order, with cp.async copies
// landing at their wait (1, 2) or at their issue (0, 3); n >= 4 interleaves warps at random (seed n),
// landing copies at their wait when n is odd.
int g_schedule = 0;
size_t g_smem_optin = 166912;  // the emulated device's opt-in limit (sm_80, the smallest targeted: 163 KiB)
std::map<const void*, int> g_func_smem;
char g_fault_message[256];  // written by the fault handler, which must not allocate
size_t g_last_block_threads = 0;  // of the last launch, for tests of launch configurations

bool serial() { return g_schedule < 4; }
bool descending() { return g_schedule == 1 || g_schedule == 3; }
bool land_at_wait() { return g_schedule < 4 ? g_schedule == 1 || g_schedule == 2 : g_schedule % 2 == 1; }

const char* collective_name(Collective c) {
  switch (c) {
    case Collective::kSyncwarp:
      return "__syncwarp";
    case Collective::kShuffle:
      return "a shuffle";
    case Collective::kMma:
      return "mma.sync";
    case Collective::kLdmatrix:
      return "ldmatrix";
  }
  return "?";
}

// Thread stacks: mmap'd, each above a PROT_NONE page, so an overflow faults instead of corrupting.
// Kept for the process and grown as launches need more threads (launches do not nest).
struct Stacks {
  std::vector<char*> base;  // the guard page; the stack starts one page above
  size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  void reserve(size_t n) {
    while (base.size() < n) {
      void* m = mmap(nullptr, page + kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (m == MAP_FAILED) throw std::bad_alloc();
      if (mprotect(m, page, PROT_NONE) != 0) {  // no guard page, no stack: an overflow must not go unseen
        munmap(m, page + kStackBytes);
        throw std::bad_alloc();
      }
      base.push_back(static_cast<char*>(m));
    }
  }
  char* stack(size_t i) const { return base[i] + page; }
  bool in_guard(const void* addr) const {
    for (char* b : base)
      if (addr >= b && addr < b + page) return true;
    return false;
  }
};

Stacks g_stack_pool;
const Stacks* g_stacks = nullptr;

void thread_main() {
  (*g_body)();
  g_block->threads[g_block->current].state = State::kDone;
  fiber_switch(&g_block->threads[g_block->current].ctx, &g_block->scheduler);
}

void yield(State s) {
  Thread& t = g_block->threads[g_block->current];
  t.state = s;
  fiber_switch(&t.ctx, &g_block->scheduler);
}

// Resumes thread i until it reaches a barrier or ends.
void resume(int i) {
  Block& b = *g_block;
  b.current = i;
  threadIdx = uint3{static_cast<unsigned>(i) % blockDim.x, static_cast<unsigned>(i) / blockDim.x % blockDim.y,
                    static_cast<unsigned>(i) / (blockDim.x * blockDim.y)};
  g_in_kernel = 1;
  fiber_switch(&b.scheduler, &b.threads[i].ctx);
  g_in_kernel = 0;
}

// Runs warp w's ready lanes (in b.lane_order) until each reaches a barrier or ends. Returns true when
// the warp can go on: all its lanes reached a warp collective, which is released. False when it waits
// at __syncthreads or has ended, or on a fault (b.failed or divergence; g_error set).
bool step_warp(Block& b, int w, bool* fault) {
  const int n = static_cast<int>(b.threads.size());
  const int lanes = std::min(n, 32 * w + 32) - 32 * w;
  for (int l : b.lane_order)
    if (l < lanes && b.threads[32 * w + l].state == State::kReady) {
      resume(32 * w + l);
      if (b.failed) {
        if (g_fault_message[0] != 0) g_error = g_fault_message;
        g_fault_message[0] = 0;
        return !(*fault = true);
      }
    }
  int waiting = 0, done = 0;
  for (int l = 0; l < lanes; ++l) {
    waiting += b.threads[32 * w + l].state == State::kAtWarpBarrier;
    done += b.threads[32 * w + l].state == State::kDone;
  }
  if (waiting == 0) return false;
  if (waiting < lanes) {
    g_error = "warp divergence: in warp " + std::to_string(w) + ", " + std::to_string(waiting) + " of " +
              std::to_string(lanes) + " lanes wait at a warp collective (__syncwarp, shuffle, mma or ldmatrix) while " +
              std::to_string(lanes - waiting - done) + " lanes wait elsewhere and " + std::to_string(done) +
              " have exited";
    return !(*fault = true);
  }
  if (lanes < 32) {
    g_error = "a full-warp collective (" + std::string(collective_name(b.threads[32 * w].collective)) + ") in warp " +
              std::to_string(w) + ", which has only " + std::to_string(lanes) + " threads";
    return !(*fault = true);
  }
  for (int l = 1; l < lanes; ++l)
    if (b.threads[32 * w + l].collective != b.threads[32 * w].collective) {
      g_error = "warp divergence: in warp " + std::to_string(w) + ", lane 0 waits at " +
                collective_name(b.threads[32 * w].collective) + " while lane " + std::to_string(l) + " waits at " +
                collective_name(b.threads[32 * w + l].collective);
      return !(*fault = true);
    }
  for (int l = 0; l < lanes; ++l) b.threads[32 * w + l].state = State::kReady;
  return true;
}

// Runs one block to completion; returns false (with g_error set) on a fault. Between two __syncthreads:
//   serial (schedules 0 to 3): warps run one at a time, in b.warp_order, each up to the barrier, so a
//     missing __syncthreads between one warp's writes and another's reads shows;
//   interleaved (shuffled schedules): a random warp runs for a random burst of warp collectives (one,
//     sixteen, or up to the barrier), then another, so a warp's shared memory can change under it
//     between two of its collectives if a race allows.
bool run_block(Block& b, const Stacks& stacks, std::mt19937* rng) {
  const int n = static_cast<int>(b.threads.size());
  for (int i = 0; i < n; ++i) {
    Thread& t = b.threads[i];
    t.state = State::kReady;
    t.or_pred = 0;
    t.open.clear();  // copies a thread never waited for are never read (a read would have waited)
    t.groups.clear();
    fiber_init(&t.ctx, stacks.stack(static_cast<size_t>(i)), kStackBytes, thread_main);
  }
  bool fault = false;
  for (;;) {
    if (rng == nullptr) {
      for (int w : b.warp_order) {
        while (step_warp(b, w, &fault)) {
        }
        if (fault) break;
      }
    } else {
      std::vector<int> active = b.warp_order;
      while (!active.empty() && !fault) {
        const size_t k = (*rng)() % active.size();
        // A burst of one warp collective, of sixteen, or up to the barrier: fine interleaving and
        // warps that run far ahead of the others both occur.
        const uint32_t r = (*rng)() % 4;
        int burst = r == 0 ? 1 << 30 : r == 1 ? 16 : 1;
        bool runnable = true;
        while (burst-- > 0 && (runnable = step_warp(b, active[k], &fault))) {
        }
        if (!runnable) active.erase(active.begin() + static_cast<std::ptrdiff_t>(k));
      }
    }
    if (fault) return false;
    int done = 0, at_block = 0;
    for (const Thread& t : b.threads) {
      done += t.state == State::kDone;
      at_block += t.state == State::kAtBlockBarrier;
    }
    if (done == n) return true;
    if (done > 0) {
      g_error = "barrier divergence: " + std::to_string(at_block) + " threads wait at __syncthreads but " +
                std::to_string(done) + " have exited";
      return false;
    }
    int any = 0;
    for (const Thread& t : b.threads) any |= t.or_pred;
    b.or_result = any;
    for (Thread& t : b.threads) {
      t.state = State::kReady;
      t.or_pred = 0;
    }
  }
}

}  // namespace

void block_barrier() { yield(State::kAtBlockBarrier); }

int block_barrier_or(int pred) {
  g_block->threads[g_block->current].or_pred = pred != 0;
  yield(State::kAtBlockBarrier);
  return g_block->or_result;
}

void warp_barrier(unsigned mask, Collective kind) {
  if (mask != 0xffffffffu) fail("warp collective: only full-warp masks are emulated");
  g_block->threads[g_block->current].collective = kind;
  yield(State::kAtWarpBarrier);
}

// cp.async: a copy may land in shared memory at any moment between its issue and its thread's wait for
// its group. Some schedules land it at the issue (a buffer refilled while another warp still reads it
// changes under that warp), the others at the wait (a read that does not wait sees the poison or a
// stale tile); the same bits under both show neither race is there.
void land(const AsyncCopy& c) {
  std::memcpy(c.dst, c.src, static_cast<size_t>(c.src_bytes));
  std::memset(static_cast<char*>(c.dst) + c.src_bytes, 0, static_cast<size_t>(c.bytes - c.src_bytes));
}

void async_copy(void* dst, const void* src, int bytes, int src_bytes) {
  check_shared(dst, static_cast<size_t>(bytes), "cp.async: the destination");
  if (src_bytes > 0 && is_shared(src)) fail("cp.async: the source is in shared memory, not global memory");
  const AsyncCopy c{dst, src, bytes, src_bytes};
  if (!land_at_wait())
    land(c);
  else
    g_block->threads[g_block->current].open.push_back(c);
}

void async_commit() {
  Thread& t = g_block->threads[g_block->current];
  t.groups.push_back(std::move(t.open));
  t.open.clear();
}

void async_wait(int pending) {
  Thread& t = g_block->threads[g_block->current];
  while (static_cast<int>(t.groups.size()) > pending) {
    for (const AsyncCopy& c : t.groups.front()) land(c);
    t.groups.erase(t.groups.begin());
  }
}

uint64_t* warp_exchange() { return g_block->exchange.data() + 32 * (g_block->current / 32); }
const void** warp_pointers() { return g_block->pointers.data() + 128 * (g_block->current / 32); }
unsigned char* dynamic_smem() { return g_block->smem; }

bool is_shared(const void* p) {
  const auto* c = static_cast<const unsigned char*>(p);
  return c >= g_block->smem && c < g_block->smem + g_block->smem_bytes;
}

void check_shared(const void* p, size_t bytes, const char* what) {
  const auto* c = static_cast<const unsigned char*>(p);
  if (c < g_block->smem || c + bytes > g_block->smem + g_block->smem_bytes) {
    const std::string msg = std::string(what) + " is outside the block's " + std::to_string(g_block->smem_bytes) +
                            " bytes of shared memory (offset " + std::to_string(c - g_block->smem) + ")";
    fail(msg.c_str(), cudaErrorIllegalAddress);
  }
}

void fail(const char* what, cudaError_t err) {
  g_error = what;
  g_block->failed = true;
  g_block->error = err;
  fiber_switch(&g_block->threads[g_block->current].ctx, &g_block->scheduler);
  std::abort();  // never resumed
}

cudaError_t host_error(cudaError_t err, const char* what) {
  g_error = what;
  return err;
}

namespace {


// A fault in kernel code (SIGSEGV, SIGBUS; SIGILL from a sanitizer trap; SIGFPE from an integer division
// by zero, which a GPU does not trap but which is a bug all the same) ends the launch with an error: the
// handler, on its own stack, switches to the scheduler, which never resumes the faulting thread. Faults
// anywhere else (the scheduler, another OS thread) keep their old handling.
constexpr int kNumFaultSignals = 4;
constexpr int kFaultSignals[kNumFaultSignals] = {SIGSEGV, SIGBUS, SIGILL, SIGFPE};
struct sigaction g_old_actions[kNumFaultSignals];
void on_fault(int sig, siginfo_t* info, void* /*context*/) {
  Block* b = g_block;
  if (b == nullptr || !g_in_kernel || current_tid() != g_kernel_tid || b->failed) {
    for (int i = 0; i < kNumFaultSignals; ++i)
      if (kFaultSignals[i] == sig) sigaction(sig, &g_old_actions[i], nullptr);
    return;  // the instruction faults again, under the old handler
  }
  const unsigned t = static_cast<unsigned>(b->current);
  if (sig == SIGFPE) {
    const bool integer = info->si_code == FPE_INTDIV || info->si_code == FPE_INTOVF;
    snprintf(g_fault_message, sizeof g_fault_message, "thread %u: %s", t,
             integer ? "integer division by zero (or INT_MIN / -1)" : "a floating-point trap");
    b->error = cudaErrorLaunchFailure;
  } else if (sig == SIGILL) {
    snprintf(g_fault_message, sizeof g_fault_message,
             "thread %u: a misaligned access or an index past a fixed-size array (sanitizer trap)", t);
    b->error = cudaErrorLaunchFailure;
  } else if (g_stacks != nullptr && g_stacks->in_guard(info->si_addr)) {
    snprintf(g_fault_message, sizeof g_fault_message, "thread %u: stack overflow (%zu KiB per thread)", t,
             kStackBytes / 1024);
    b->error = cudaErrorLaunchFailure;
  } else {
    snprintf(g_fault_message, sizeof g_fault_message, "thread %u: illegal memory access at address %p", t,
             info->si_addr);
    b->error = cudaErrorIllegalAddress;
  }
  b->failed = true;
  fiber_jump(&b->scheduler);
}

// Installs the fault handlers (and a stack for them) for one launch.
struct FaultHandlers {
  stack_t old_stack{};
  std::vector<char> stack = std::vector<char>(64 * 1024);
  FaultHandlers() {
    const stack_t ss{stack.data(), 0, stack.size()};
    sigaltstack(&ss, &old_stack);
    struct sigaction sa {};
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    for (int i = 0; i < kNumFaultSignals; ++i) sigaction(kFaultSignals[i], &sa, &g_old_actions[i]);
  }
  ~FaultHandlers() {
    for (int i = 0; i < kNumFaultSignals; ++i) sigaction(kFaultSignals[i], &g_old_actions[i], nullptr);
    sigaltstack(&old_stack, nullptr);
  }
};

}  // namespace

std::vector<LaunchRecord>& launch_log() {
  static std::vector<LaunchRecord> log;
  return log;
}

cudaError_t run_grid(const LaunchConfig& cfg, const std::function<void()>& body) {
  g_error.clear();
  launch_log().push_back({int64_t(cfg.grid.x) * cfg.grid.y * cfg.grid.z,
                          int64_t(cfg.block.x) * cfg.block.y * cfg.block.z, cfg.dynamic_smem});
  auto finish = [](cudaError_t err, const std::string& msg) {
    g_last = err;
    if (err != cudaSuccess) g_error = msg;
    return err;
  };
  if (g_block != nullptr) return finish(cudaErrorNotSupported, "a launch from inside a kernel");
  const dim3 gr = cfg.grid, bl = cfg.block;
  const size_t threads = size_t(bl.x) * bl.y * bl.z;
  g_last_block_threads = threads;
  if (threads == 0 || threads > 1024 || bl.x > 1024 || bl.y > 1024 || bl.z > 64 || gr.x == 0 || gr.y == 0 ||
      gr.z == 0 || gr.x > 0x7fffffffu || gr.y > 65535 || gr.z > 65535)
    return finish(cudaErrorInvalidConfiguration,
                  "invalid launch configuration: grid (" + std::to_string(gr.x) + ", " + std::to_string(gr.y) + ", " +
                      std::to_string(gr.z) + "), block (" + std::to_string(bl.x) + ", " + std::to_string(bl.y) +
                      ", " + std::to_string(bl.z) + ")");
  const auto attr = g_func_smem.find(cfg.kernel);
  const size_t allowed = attr == g_func_smem.end() ? 48 * 1024 : static_cast<size_t>(attr->second);
  if (cfg.dynamic_smem > allowed)
    return finish(cudaErrorInvalidValue, "dynamic shared memory " + std::to_string(cfg.dynamic_smem) +
                                             " bytes > the kernel's limit " + std::to_string(allowed) +
                                             " (cudaFuncSetAttribute raises it)");

  Block b;
  b.threads.resize(threads);
  b.exchange.assign(32 * ((threads + 31) / 32), 0);
  b.pointers.assign(128 * ((threads + 31) / 32), nullptr);
  for (int w = 0; w < static_cast<int>((threads + 31) / 32); ++w) b.warp_order.push_back(w);
  for (int l = 0; l < 32; ++l) b.lane_order.push_back(l);
  std::vector<uint3> blocks;
  for (unsigned z = 0; z < gr.z; ++z)
    for (unsigned y = 0; y < gr.y; ++y)
      for (unsigned x = 0; x < gr.x; ++x) blocks.push_back(uint3{x, y, z});
  std::mt19937 rng(static_cast<unsigned>(g_schedule));
  if (descending()) {
    std::reverse(b.warp_order.begin(), b.warp_order.end());
    std::reverse(b.lane_order.begin(), b.lane_order.end());
    std::reverse(blocks.begin(), blocks.end());
  } else if (!serial()) {
    std::shuffle(blocks.begin(), blocks.end(), rng);
  }
  g_stack_pool.reserve(threads);
  const Stacks& stacks = g_stack_pool;
  std::vector<unsigned char> smem_buf(cfg.dynamic_smem + 2 * kGuardBytes + 128);
  unsigned char* base = smem_buf.data() + (128 - reinterpret_cast<uintptr_t>(smem_buf.data()) % 128) % 128;
  b.smem = base + kGuardBytes;
  b.smem_bytes = cfg.dynamic_smem;

  g_block = &b;
  g_kernel_tid = current_tid();
  g_body = &body;
  g_stacks = &stacks;
  blockDim = bl;
  gridDim = gr;
  std::string err;
  cudaError_t code = cudaSuccess;
  {
    const FaultHandlers handlers;
    for (const uint3& idx : blocks) {
      blockIdx = idx;
      if (!serial()) {
        std::shuffle(b.warp_order.begin(), b.warp_order.end(), rng);
        std::shuffle(b.lane_order.begin(), b.lane_order.end(), rng);
      }
      // Poison and guards: NaN bytes (a read of either poisons the result; a write to a guard shows).
      std::memset(base, kPoison, cfg.dynamic_smem + 2 * kGuardBytes);
      const std::string where = "block (" + std::to_string(idx.x) + ", " + std::to_string(idx.y) + ", " +
                                std::to_string(idx.z) + "): ";
      if (!run_block(b, stacks, serial() ? nullptr : &rng)) {
        err = where + g_error;
        code = b.failed ? b.error : cudaErrorLaunchFailure;
        break;
      }
      for (size_t i = 0; i < kGuardBytes; ++i)
        if (base[i] != kPoison || b.smem[cfg.dynamic_smem + i] != kPoison) {
          err = where + "a write outside the block's " + std::to_string(cfg.dynamic_smem) +
                " bytes of dynamic shared memory";
          code = cudaErrorLaunchFailure;
          break;
        }
      if (!err.empty()) break;
    }
  }
  g_block = nullptr;
  g_body = nullptr;
  g_stacks = nullptr;
  return finish(code, err);
}

cudaError_t take_last_error() {
  const cudaError_t e = g_last;
  g_last = cudaSuccess;
  return e;
}

cudaError_t set_func_max_dynamic_smem(const void* kernel, int bytes) {
  if (bytes < 0 || static_cast<size_t>(bytes) > g_smem_optin)
    return host_error(cudaErrorInvalidValue, ("cudaFuncSetAttribute asked for " + std::to_string(bytes) +
                                              " bytes of dynamic shared memory; the device allows " +
                                              std::to_string(g_smem_optin))
                                                 .c_str());
  g_func_smem[kernel] = bytes;
  return cudaSuccess;
}

size_t smem_optin() { return g_smem_optin; }

}  // namespace cuda_emu

extern "C" cudaError_t cudaGetLastError() { return cuda_emu::take_last_error(); }

// Knobs and the last failure's message, for the Python tests (ctypes).
extern "C" void emu_set_schedule(int schedule) { cuda_emu::g_schedule = schedule; }
extern "C" void emu_set_smem_optin(long long bytes) { cuda_emu::g_smem_optin = static_cast<size_t>(bytes); }
extern "C" const char* emu_last_error() { return cuda_emu::g_error.c_str(); }
extern "C" long long emu_last_block_threads() { return static_cast<long long>(cuda_emu::g_last_block_threads); }
extern "C" const char* emu_fibers() { return cuda_emu::kFibers; }  // which fiber switch this build uses
