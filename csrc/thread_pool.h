// A process-wide pool of worker threads that grows on demand and is never torn down mid-call.
// Several callers may use it at once; each call is limited to the threads it asks for.
// Workers run plain C++ only: they never touch Python objects.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace speciesclf {

class ThreadPool {
 public:
  static ThreadPool& instance();

  // Calls task(i) for every i in [0, count) on at most `threads` threads, the caller's included,
  // and returns when all are done. `task` must not throw.
  void parallel_for(std::size_t count, int threads, const std::function<void(std::size_t)>& task);

  int worker_count();

  ~ThreadPool();

 private:
  struct Job;
  void ensure_workers(int wanted);
  void worker_loop();

  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<Job*> queue_;  // one entry per helper a job still wants
  std::vector<std::thread> workers_;
  bool stopping_ = false;
};

}  // namespace speciesclf
