// The emulator's scheduler: fibers, barriers, shared memory and launch checks (see cuda_emu.h).
#include "cuda_emu.h"

#include <ucontext.h>

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

enum class State { kReady, kAtBlockBarrier, kAtWarpBarrier, kDone };

struct AsyncCopy {
  void* dst;
  const void* src;
  int bytes, src_bytes;  // src_bytes < bytes: the rest is zero-filled
};

struct Thread {
  ucontext_t ctx;
  State state = State::kReady;
  int or_pred = 0;
  std::vector<AsyncCopy> open;                 // cp.async copies not yet committed to a group
  std::vector<std::vector<AsyncCopy>> groups;  // committed groups, oldest first
};

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kGuardBytes = 256;
constexpr unsigned char kGuard = 0xA5;

struct Block {
  std::vector<Thread> threads;
  std::vector<int> warp_order, lane_order;  // the order warps, and lanes within a warp, run in
  std::vector<uint64_t> exchange;  // 32 slots per warp
  std::vector<const void*> pointers;  // 32 x 4 per warp
  unsigned char* smem = nullptr;
  int current = -1;
  int or_result = 0;
  ucontext_t scheduler;
  bool failed = false;
};

Block* g_block = nullptr;
const std::function<void()>* g_body = nullptr;
std::string g_error;
cudaError_t g_last = cudaSuccess;
int g_schedule = 0;        // 0 ascending, 1 descending, n >= 2: shuffled with seed n
size_t g_smem_optin = 166912;  // the smallest opt-in limit of the targeted archs (sm_80: 163 KiB)
std::map<const void*, int> g_func_smem;

void thread_main() {
  (*g_body)();
  g_block->threads[g_block->current].state = State::kDone;
  swapcontext(&g_block->threads[g_block->current].ctx, &g_block->scheduler);
}

void yield(State s) {
  Thread& t = g_block->threads[g_block->current];
  t.state = s;
  swapcontext(&t.ctx, &g_block->scheduler);
}

// Resumes thread i until it reaches a barrier or ends.
void resume(int i) {
  Block& b = *g_block;
  b.current = i;
  threadIdx = uint3{static_cast<unsigned>(i) % blockDim.x, static_cast<unsigned>(i) / blockDim.x % blockDim.y,
                    static_cast<unsigned>(i) / (blockDim.x * blockDim.y)};
  swapcontext(&b.scheduler, &b.threads[i].ctx);
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
      if (b.failed) return !(*fault = true);
    }
  int waiting = 0, done = 0;
  for (int l = 0; l < lanes; ++l) {
    waiting += b.threads[32 * w + l].state == State::kAtWarpBarrier;
    done += b.threads[32 * w + l].state == State::kDone;
  }
  if (waiting == 0) return false;
  if (waiting < lanes) {
    g_error = "warp divergence: in warp " + std::to_string(w) + ", " + std::to_string(waiting) + " of " +
              std::to_string(lanes) + " lanes wait at a warp collective (__syncwarp, shuffle, mma or ldmatrix) that " +
              std::to_string(lanes - waiting - done) + " lanes wait elsewhere and " + std::to_string(done) +
              " have exited";
    return !(*fault = true);
  }
  for (int l = 0; l < lanes; ++l) b.threads[32 * w + l].state = State::kReady;
  return true;
}

// Runs one block to completion; returns false (with g_error set) on a fault. Between two __syncthreads:
//   serial (schedules 0 and 1): warps run one at a time, in b.warp_order, each up to the barrier, so a
//     missing __syncthreads between one warp's writes and another's reads shows;
//   interleaved (shuffled schedules): a random warp runs for a random burst of warp collectives (one,
//     sixteen, or up to the barrier), then another, so a warp's shared memory can change under it
//     between two of its collectives if a race allows.
bool run_block(Block& b, const std::vector<char*>& stacks, std::mt19937* rng) {
  const int n = static_cast<int>(b.threads.size());
  for (int i = 0; i < n; ++i) {
    Thread& t = b.threads[i];
    t.state = State::kReady;
    t.or_pred = 0;
    t.open.clear();  // copies a thread never waited for are never read (a read would have waited)
    t.groups.clear();
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = stacks[i];
    t.ctx.uc_stack.ss_size = kStackBytes;
    t.ctx.uc_link = nullptr;
    makecontext(&t.ctx, thread_main, 0);
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

void warp_barrier(unsigned mask) {
  if (mask != 0xffffffffu) fail("__syncwarp: only full-warp masks are emulated");
  yield(State::kAtWarpBarrier);
}

// cp.async: a copy may land in shared memory at any moment between its issue and its thread's wait for
// its group. Even schedules land it at the issue (a buffer refilled while another warp still reads it
// changes under that warp), odd ones at the wait (a read that does not wait sees the poison or a stale
// tile); the same bits under both show neither race is there.
void land(const AsyncCopy& c) {
  std::memcpy(c.dst, c.src, static_cast<size_t>(c.src_bytes));
  std::memset(static_cast<char*>(c.dst) + c.src_bytes, 0, static_cast<size_t>(c.bytes - c.src_bytes));
}

void async_copy(void* dst, const void* src, int bytes, int src_bytes) {
  const AsyncCopy c{dst, src, bytes, src_bytes};
  if (g_schedule % 2 == 0)
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

void fail(const char* what) {
  g_error = what;
  g_block->failed = true;
  swapcontext(&g_block->threads[g_block->current].ctx, &g_block->scheduler);
  std::abort();  // never resumed
}

cudaError_t run_grid(const LaunchConfig& cfg, const std::function<void()>& body) {
  auto finish = [](cudaError_t err, const std::string& msg) {
    g_last = err;
    if (err != cudaSuccess) g_error = msg;
    return err;
  };
  const size_t threads = size_t(cfg.block.x) * cfg.block.y * cfg.block.z;
  if (threads == 0 || threads > 1024 || cfg.grid.x == 0 || cfg.grid.y == 0 || cfg.grid.z == 0)
    return finish(cudaErrorInvalidConfiguration, "invalid launch configuration");
  const auto attr = g_func_smem.find(cfg.kernel);
  const size_t allowed = attr == g_func_smem.end() ? 48 * 1024 : static_cast<size_t>(attr->second);
  if (cfg.dynamic_smem > allowed)
    return finish(cudaErrorInvalidValue, "dynamic shared memory " + std::to_string(cfg.dynamic_smem) +
                                             " bytes > the kernel's limit " + std::to_string(allowed) +
                                             " (cudaFuncSetAttribute raises it)");
  if (allowed > g_smem_optin)
    return finish(cudaErrorInvalidValue, "cudaFuncSetAttribute asked for " + std::to_string(allowed) +
                                             " bytes of shared memory; the device allows " +
                                             std::to_string(g_smem_optin));

  Block b;
  b.threads.resize(threads);
  b.exchange.assign(32 * ((threads + 31) / 32), 0);
  b.pointers.assign(128 * ((threads + 31) / 32), nullptr);
  for (int w = 0; w < static_cast<int>((threads + 31) / 32); ++w) b.warp_order.push_back(w);
  for (int l = 0; l < 32; ++l) b.lane_order.push_back(l);
  if (g_schedule == 1) {
    std::reverse(b.warp_order.begin(), b.warp_order.end());
    std::reverse(b.lane_order.begin(), b.lane_order.end());
  }
  std::mt19937 rng(static_cast<unsigned>(g_schedule));
  std::vector<char*> stacks(threads);
  for (auto& s : stacks) s = static_cast<char*>(std::malloc(kStackBytes));
  std::vector<unsigned char> smem_buf(cfg.dynamic_smem + 2 * kGuardBytes + 128);
  unsigned char* base = smem_buf.data() + (128 - reinterpret_cast<uintptr_t>(smem_buf.data()) % 128) % 128;
  b.smem = base + kGuardBytes;

  Block* prev_block = g_block;
  const std::function<void()>* prev_body = g_body;
  g_block = &b;
  g_body = &body;
  blockDim = cfg.block;
  gridDim = cfg.grid;
  std::string err;
  for (unsigned z = 0; z < cfg.grid.z && err.empty(); ++z)
    for (unsigned y = 0; y < cfg.grid.y && err.empty(); ++y)
      for (unsigned x = 0; x < cfg.grid.x && err.empty(); ++x) {
        blockIdx = uint3{x, y, z};
        if (g_schedule >= 2) {
          std::shuffle(b.warp_order.begin(), b.warp_order.end(), rng);
          std::shuffle(b.lane_order.begin(), b.lane_order.end(), rng);
        }
        std::memset(base, kGuard, kGuardBytes);
        std::memset(b.smem, 0xFF, cfg.dynamic_smem);  // NaN in fp32, fp16 and bf16
        std::memset(b.smem + cfg.dynamic_smem, kGuard, kGuardBytes);
        const std::string where = "block (" + std::to_string(x) + ", " + std::to_string(y) + ", " +
                                  std::to_string(z) + "): ";
        if (!run_block(b, stacks, g_schedule >= 2 ? &rng : nullptr)) {
          err = where + g_error;
          break;
        }
        for (size_t i = 0; i < kGuardBytes; ++i)
          if (base[i] != kGuard || b.smem[cfg.dynamic_smem + i] != kGuard) {
            err = where + "a write outside the block's " + std::to_string(cfg.dynamic_smem) +
                  " bytes of dynamic shared memory";
            break;
          }
      }
  for (auto* s : stacks) std::free(s);
  g_block = prev_block;
  g_body = prev_body;
  return finish(err.empty() ? cudaSuccess : cudaErrorLaunchFailure, err);
}

cudaError_t take_last_error() {
  const cudaError_t e = g_last;
  g_last = cudaSuccess;
  return e;
}

void set_func_max_dynamic_smem(const void* kernel, int bytes) { g_func_smem[kernel] = bytes; }

}  // namespace cuda_emu

extern "C" cudaError_t cudaGetLastError() { return cuda_emu::take_last_error(); }

// Knobs and the last failure's message, for the Python tests (ctypes).
extern "C" void emu_set_schedule(int schedule) { cuda_emu::g_schedule = schedule; }
extern "C" void emu_set_smem_optin(long long bytes) { cuda_emu::g_smem_optin = static_cast<size_t>(bytes); }
extern "C" const char* emu_last_error() { return cuda_emu::g_error.c_str(); }
