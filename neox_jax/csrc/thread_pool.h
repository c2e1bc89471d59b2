// A small pool of worker threads for the matmul kernels, shared by every call in the process.
//
// Why its own pool: a kernel call lasts microseconds to a millisecond, and a decode step makes dozens of
// them, so waking workers must cost far less than that (spin briefly, then sleep on a futex). It does not
// add to XLA's threads: the XLA thread that calls the kernel takes tasks itself, the workers are at most
// the cores minus that one, and XLA's other threads wait while the custom call runs.
#pragma once

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

}  // namespace neox
