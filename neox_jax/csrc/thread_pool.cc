#include "thread_pool.h"

#include <sched.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <cstdlib>
#include <string>

namespace neox {
namespace {

constexpr int kSpinRounds = 4000;  // ~100 us of polling before a worker sleeps (a decode step's gaps are shorter)

inline void pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// NEOX_JAX_CPU_THREADS if set (a positive integer), else the CPUs this process may run on.
int configured_threads() {
  if (const char* env = std::getenv("NEOX_JAX_CPU_THREADS")) {
    const int n = std::atoi(env);
    if (n > 0) return n;
  }
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

uint64_t generation(uint64_t state) { return state >> 32; }
uint64_t count(uint64_t state) { return (state >> 16) & 0xFFFF; }
uint64_t next(uint64_t state) { return state & 0xFFFF; }

}  // namespace

ThreadPool& ThreadPool::instance() {
  static ThreadPool* pool = new ThreadPool(configured_threads());  // never destroyed: workers outlive main
  return *pool;
}

void ThreadPool::grow(int workers) {
  while (static_cast<int>(workers_.size()) < workers) {
    workers_.emplace_back(&ThreadPool::work, this, static_cast<int>(workers_.size()));
    workers_.back().detach();
  }
}

void ThreadPool::run(Task task, const void* context, int64_t tasks, int threads) {
  std::unique_lock<std::mutex> lock(mutex_, std::try_to_lock);
  if (!lock.owns_lock() || threads <= 1 || tasks <= 1) {
    for (int64_t i = 0; i < tasks; ++i) task(context, i);
    return;
  }
  grow(threads - 1);
  task_ = task;
  context_ = context;
  done_.store(0, std::memory_order_relaxed);
  active_workers_.store(threads - 1, std::memory_order_relaxed);
  const uint64_t job = ((generation(state_.load(std::memory_order_relaxed)) + 1) << 32) | (uint64_t(tasks) << 16);
  state_.store(job, std::memory_order_release);
  wake_.fetch_add(1, std::memory_order_release);
  wake_.notify_all();

  uint64_t s = state_.load(std::memory_order_acquire);
  while (next(s) < count(s)) {
    if (state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel)) {
      task(context, next(s));
      done_.fetch_add(1, std::memory_order_release);
      s = state_.load(std::memory_order_acquire);
    }
  }
  while (done_.load(std::memory_order_acquire) < tasks) pause();
}

void ThreadPool::work(int index) {
  uint64_t seen = 0;
  for (;;) {
    uint64_t s = state_.load(std::memory_order_acquire);
    for (int spin = 0; generation(s) == seen && spin < kSpinRounds; ++spin) {
      pause();
      s = state_.load(std::memory_order_acquire);
    }
    if (generation(s) == seen) {
      const uint32_t ticket = wake_.load(std::memory_order_acquire);
      s = state_.load(std::memory_order_acquire);
      if (generation(s) == seen) {
        wake_.wait(ticket, std::memory_order_acquire);
        continue;
      }
    }
    seen = generation(s);
    if (index >= active_workers_.load(std::memory_order_relaxed)) continue;
    while (generation(s) == seen && next(s) < count(s)) {
      if (state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel)) {
        task_(context_, next(s));  // the job stays published until this task is counted done
        done_.fetch_add(1, std::memory_order_release);
        s = state_.load(std::memory_order_acquire);
      }
    }
  }
}

uint32_t float_mode() {
#if defined(__x86_64__) || defined(__i386__)
  return _mm_getcsr();
#else
  return 0;
#endif
}

void set_float_mode([[maybe_unused]] uint32_t mode) {
#if defined(__x86_64__) || defined(__i386__)
  _mm_setcsr(mode);
#endif
}

}  // namespace neox
