#include "core/thread_pool.h"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace tb {
namespace {

// One parallel_for call. Workers and the caller claim indices from `next`;
// the caller waits until `finished` reaches n.
struct Job {
  const std::function<void(int64_t)>* fn;
  int64_t n;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> finished{0};
  std::mutex m;
  std::condition_variable cv;

  // Claims and runs indices until none are left.
  void work() {
    int64_t done = 0;
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n;) {
      (*fn)(i);
      ++done;
    }
    if (done && finished.fetch_add(done, std::memory_order_acq_rel) + done == n) {
      std::lock_guard<std::mutex> lock(m);
      cv.notify_all();
    }
  }
};

class Pool {
 public:
  explicit Pool(int nthreads) : nthreads_(std::max(1, nthreads)) {
    try {
      for (int i = 0; i + 1 < nthreads_; ++i) workers_.emplace_back([this] { loop(); });
    } catch (const std::exception& e) {
      // The OS refused a thread: stop the ones already started (they would otherwise
      // wait forever for work) and report, so no caller ever waits on a half-built pool.
      const size_t started = workers_.size();
      stop_and_join();
      throw std::runtime_error("could not start copy thread " + std::to_string(started + 1) +
                               " of " + std::to_string(nthreads_ - 1) + " (" + e.what() +
                               "): call tensorbridge.set_num_threads() with a smaller count");
    }
  }
  ~Pool() { stop_and_join(); }
  int size() const { return nthreads_; }

  void run(int64_t n, const std::function<void(int64_t)>& fn) {
    auto job = std::make_shared<Job>();
    job->fn = &fn;
    job->n = n;
    const int64_t helpers = std::min<int64_t>(n - 1, static_cast<int64_t>(workers_.size()));
    if (helpers > 0) {
      bool wake;
      {
        std::lock_guard<std::mutex> lock(m_);
        for (int64_t i = 0; i < helpers; ++i) queue_.push_back(job);
        queued_.fetch_add(helpers, std::memory_order_release);
        wake = sleepers_ > 0;
      }
      if (wake) cv_.notify_all();
    }
    job->work();
    const auto finished = [&] { return job->finished.load(std::memory_order_acquire) == n; };
    if (spin_until(finished)) return;
    std::unique_lock<std::mutex> lock(job->m);
    job->cv.wait(lock, finished);
  }

 private:
  // Waking a sleeping thread costs tens of microseconds, as much as copying a few
  // hundred KiB: threads that just finished work poll for a short while first, so
  // back-to-back copies (a data loader's batches) stay parallel at small sizes.
  template <class Pred>
  static bool spin_until(Pred&& pred) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::microseconds(50);
    for (int i = 0;; ++i) {
      if (pred()) return true;
      if ((i & 63) == 63 && std::chrono::steady_clock::now() > deadline) return false;
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
    }
  }

  void stop_and_join() {
    {
      std::lock_guard<std::mutex> lock(m_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }

  void loop() {
    for (;;) {
      std::shared_ptr<Job> job;
      spin_until([&] { return queued_.load(std::memory_order_acquire) > 0; });
      {
        std::unique_lock<std::mutex> lock(m_);
        ++sleepers_;
        cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
        --sleepers_;
        if (stop_ && queue_.empty()) return;
        job = std::move(queue_.front());
        queue_.pop_front();
        queued_.fetch_sub(1, std::memory_order_relaxed);
      }
      job->work();
    }
  }

  const int nthreads_;
  std::vector<std::thread> workers_;
  std::deque<std::shared_ptr<Job>> queue_;
  std::mutex m_;
  std::condition_variable cv_;
  std::atomic<int64_t> queued_{0};  // tickets in queue_, readable without the lock
  int sleepers_ = 0;                // workers blocked on cv_
  bool stop_ = false;
};

int default_threads() {
  // Host copies are bound by memory bandwidth, which a dozen threads saturate even on
  // large machines; beyond that more threads only add wake-up latency. (On a 16-core
  // H100 host, benchmarks/tune_gpu.py: 12 threads beat 8 by 10-30% on 64-256 MiB
  // pageable transfers, and 16 were no better at 16 MiB.)
  const unsigned hw = std::thread::hardware_concurrency();
  return static_cast<int>(std::clamp<unsigned>(hw, 1u, 12u));
}

// Both deliberately leaked at exit: joining threads from a static destructor can hang
// while the interpreter tears down.
std::mutex* g_pool_mutex = new std::mutex();
std::shared_ptr<Pool>* g_pool = new std::shared_ptr<Pool>();
int g_requested = 0;  // 0: default

// After fork() the child has the pool object but none of its threads, and the mutex
// may have been held by another thread at the time: give the child fresh ones and
// leak the parent's.
void reset_after_fork() {
  g_pool_mutex = new std::mutex();
  g_pool = new std::shared_ptr<Pool>();
}
const bool g_atfork_registered = (pthread_atfork(nullptr, nullptr, &reset_after_fork), true);

std::shared_ptr<Pool> current_pool() {
  std::lock_guard<std::mutex> lock(*g_pool_mutex);
  auto& pool = *g_pool;
  if (!pool) pool = std::make_shared<Pool>(g_requested > 0 ? g_requested : default_threads());
  return pool;
}

}  // namespace

int get_num_threads() {
  {
    std::lock_guard<std::mutex> lock(*g_pool_mutex);
    if (g_requested > 0) return g_requested;
  }
  return current_pool()->size();
}

void set_num_threads(int n) {
  if (n < 1 || n > kMaxThreads)
    throw std::invalid_argument("set_num_threads: n must be between 1 and " +
                                std::to_string(kMaxThreads));
  std::shared_ptr<Pool> old;
  {
    std::lock_guard<std::mutex> lock(*g_pool_mutex);
    g_requested = n;
    old = std::move(*g_pool);
  }
  // `old` joins its workers here, or later in whichever caller still holds it.
}

void parallel_for(int64_t n, const std::function<void(int64_t)>& fn) {
  if (n <= 0) return;
  if (n == 1) {
    fn(0);
    return;
  }
  current_pool()->run(n, fn);
}

}  // namespace tb
