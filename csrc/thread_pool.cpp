#include "thread_pool.h"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <new>

namespace speciesclf {

namespace {

std::atomic<ThreadPool*> g_pool{nullptr};
std::mutex g_creating;

// A child of fork() has only the forking thread: the parent's workers do not exist there, and the
// pool's mutexes may have been copied while another thread held them. The child starts a pool of its
// own; the parent's is leaked, untouched (destroying its joinable threads would terminate).
void forget_pool_in_child() {
  g_pool.store(nullptr);
  new (&g_creating) std::mutex();
}

}  // namespace

struct ThreadPool::Job {
  const std::function<void(std::size_t)>* task;
  std::size_t count;
  std::atomic<std::size_t> next{0};
  std::mutex mutex;
  std::condition_variable finished;
  int running_helpers = 0;  // guarded by the pool's mutex when claimed, by `mutex` when released

  void work() {
    for (std::size_t i = next.fetch_add(1); i < count; i = next.fetch_add(1)) (*task)(i);
  }
};

ThreadPool& ThreadPool::instance() {
  ThreadPool* pool = g_pool.load(std::memory_order_acquire);
  if (pool != nullptr) return *pool;
  std::lock_guard<std::mutex> lock(g_creating);
  pool = g_pool.load(std::memory_order_acquire);
  if (pool == nullptr) {
    static const bool registered = pthread_atfork(nullptr, nullptr, forget_pool_in_child) == 0;
    (void)registered;
    // Leaked on purpose: joining threads from a static destructor at interpreter exit can deadlock.
    pool = new ThreadPool();
    g_pool.store(pool, std::memory_order_release);
  }
  return *pool;
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  for (auto& t : workers_) t.join();
}

int ThreadPool::worker_count() {
  std::lock_guard<std::mutex> lock(mutex_);
  return int(workers_.size());
}

void ThreadPool::ensure_workers(int wanted) {
  // Called with mutex_ held. A cap keeps a silly `threads=` from exhausting the process.
  wanted = std::min(wanted, 256);
  while (int(workers_.size()) < wanted) workers_.emplace_back([this] { worker_loop(); });
}

void ThreadPool::worker_loop() {
  for (;;) {
    Job* job;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
      if (stopping_) return;
      job = queue_.front();
      queue_.pop_front();
      std::lock_guard<std::mutex> job_lock(job->mutex);
      ++job->running_helpers;
    }
    job->work();
    std::lock_guard<std::mutex> job_lock(job->mutex);
    if (--job->running_helpers == 0) job->finished.notify_all();
  }
}

void ThreadPool::parallel_for(std::size_t count, int threads, const std::function<void(std::size_t)>& task) {
  const std::size_t helpers = std::min<std::size_t>(threads > 1 ? std::size_t(threads - 1) : 0,
                                                    count > 0 ? count - 1 : 0);
  Job job;
  job.task = &task;
  job.count = count;
  if (helpers > 0) {
    std::lock_guard<std::mutex> lock(mutex_);
    ensure_workers(int(helpers));
    for (std::size_t h = 0; h < helpers; ++h) queue_.push_back(&job);
  }
  if (helpers > 0) wake_.notify_all();
  job.work();
  if (helpers == 0) return;
  {
    // Helpers that have not started yet are no longer needed; those running must finish first.
    std::lock_guard<std::mutex> lock(mutex_);
    queue_.erase(std::remove(queue_.begin(), queue_.end(), &job), queue_.end());
  }
  std::unique_lock<std::mutex> job_lock(job.mutex);
  job.finished.wait(job_lock, [&job] { return job.running_helpers == 0; });
}

}  // namespace speciesclf
