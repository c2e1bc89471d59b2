// A small pool of worker threads for the matmul kernels, shared by every call in the process.
//
// Why its own pool: a kernel call lasts microseconds to a millisecond, and a decode step makes dozens of
// them, so waking workers must cost far less than that (spin briefly, then sleep on a futex). It does not
// add to XLA's threads: the XLA thread that calls the kernel takes tasks itself, the workers are at most
// the cores minus that one, and XLA's other threads wait while the custom call runs.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

namespace neox {

class ThreadPool {
 public:
  using Task = void (*)(const void* context, int64_t task);

  // The process's pool; `threads` is the default number of threads a call uses (the caller included).
  static ThreadPool& instance();
  int threads() const { return default_threads_; }

  // Runs task(context, i) for every i < tasks on up to `threads` threads (the caller is one of them) and
  // returns when all are done. Tasks are claimed one at a time, so a worker the OS has descheduled delays
  // nothing it has not claimed. A call made while another is running (XLA running two custom calls at
  // once) runs its tasks on its own thread.
  void run(Task task, const void* context, int64_t tasks, int threads);

 private:
  explicit ThreadPool(int default_threads) : default_threads_(default_threads) {}
  void grow(int workers);  // under mutex_
  void work(int index);

  // state_: generation (32 bits) | task count (16) | next unclaimed task (16); a worker claims by CAS, so a
  // claim can never take a task of a job other than the one whose generation it read.
  static constexpr uint64_t kField = 1u << 16;
  std::atomic<uint64_t> state_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<uint32_t> wake_{0};  // bumped per job; sleeping workers wait on it
  std::atomic<int> active_workers_{0};  // workers (by index) that may join the current job
  Task task_ = nullptr;
  const void* context_ = nullptr;
  std::mutex mutex_;
  std::vector<std::thread> workers_;
  const int default_threads_;
};

// Multiply-adds below which splitting a call across threads costs more than it saves (~10 us of one core's work).
constexpr int64_t kMinTaskWork = int64_t{1} << 17;
constexpr int64_t kTasksPerThread = 4;  // so that a slow (descheduled) thread's share is taken by the others

// The calling thread's floating-point mode (x86's MXCSR: XLA flushes denormals), and setting it on another.
uint32_t float_mode();
void set_float_mode(uint32_t mode);

// kernel(begin, end) over the output channels [0, n) of a matmul of `work` multiply-adds, split into tasks of
// whole `block`s on up to `threads` threads of the pool (none below kMinTaskWork a thread). Each task runs under
// the caller's floating-point mode, so a result does not depend on which thread computed it.
template <class Kernel>
void run_channels(int64_t n, int64_t block, int64_t work, int threads, const Kernel& kernel) {
  const int64_t blocks = (n + block - 1) / block;
  threads = static_cast<int>(std::min<int64_t>({threads, std::max<int64_t>(1, work / kMinTaskWork), blocks}));
  if (threads <= 1) return kernel(int64_t{0}, n);
  const int64_t tasks = std::min<int64_t>(blocks, threads * kTasksPerThread);
  struct Job {
    const Kernel* kernel;
    int64_t n, per_task;
    uint32_t mode;
  } const job{&kernel, n, (blocks + tasks - 1) / tasks * block, float_mode()};
  auto run_task = [](const void* context, int64_t task) {
    const Job& j = *static_cast<const Job*>(context);
    const uint32_t own = float_mode();
    set_float_mode(j.mode);
    (*j.kernel)(task * j.per_task, std::min(j.n, (task + 1) * j.per_task));
    set_float_mode(own);
  };
  ThreadPool::instance().run(run_task, &job, (n + job.per_task - 1) / job.per_task, threads);
}

}  // namespace neox
