#include "testing/host_engine.h"

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

namespace tb {

HostEngine::HostEngine(int delay_us, int64_t fail_pinning_after, int64_t fail_copy_after)
    : delay_us_(delay_us),
      fail_after_(fail_pinning_after),
      fail_copy_after_(fail_copy_after),
      worker_([this] { loop(); }) {}

void HostEngine::maybe_fail_copy() {
  std::lock_guard<std::mutex> lock(m_);
  if (fail_copy_after_ >= 0 && copies_++ == fail_copy_after_)
    throw std::runtime_error("HostEngine: injected copy failure (test setting)");
}

HostEngine::~HostEngine() {
  {
    std::lock_guard<std::mutex> lock(m_);
    stop_ = true;
  }
  cv_.notify_all();
  worker_.join();
}

void* HostEngine::alloc_pinned(size_t nbytes) {
  std::lock_guard<std::mutex> lock(m_);
  if (fail_after_ >= 0 && allocations_ >= fail_after_)
    throw std::runtime_error("HostEngine: pinning refused (test setting)");
  void* p = std::aligned_alloc(4096, (nbytes + 4095) / 4096 * 4096);
  if (p == nullptr) throw std::runtime_error("HostEngine: out of memory");
  std::memset(p, 0xCD, nbytes);  // stale bytes, never zeros, so unwritten data shows
  ++allocations_;
  ++live_;
  return p;
}

void HostEngine::free_pinned(void* ptr) noexcept {
  std::lock_guard<std::mutex> lock(m_);
  --live_;
  std::free(ptr);
}

void HostEngine::enqueue(std::function<void()> task) {
  {
    std::lock_guard<std::mutex> lock(m_);
    queue_.push_back(std::move(task));
  }
  cv_.notify_all();
}

void HostEngine::copy_to_host_async(void* host, const void* device, size_t n, StreamHandle) {
  maybe_fail_copy();
  const int delay = delay_us_;
  enqueue([=] {
    if (delay) std::this_thread::sleep_for(std::chrono::microseconds(delay));
    std::memcpy(host, device, n);
  });
}

void HostEngine::copy_to_device_async(void* device, const void* host, size_t n, StreamHandle) {
  maybe_fail_copy();
  const int delay = delay_us_;
  enqueue([=] {
    if (delay) std::this_thread::sleep_for(std::chrono::microseconds(delay));
    std::memcpy(device, host, n);
  });
}

EventHandle HostEngine::create_event() {
  std::lock_guard<std::mutex> lock(m_);
  const EventHandle e = next_event_++;
  events_[e] = EventState{};
  return e;
}

void HostEngine::destroy_event(EventHandle e) noexcept {
  std::lock_guard<std::mutex> lock(m_);
  events_.erase(e);
}

void HostEngine::record(EventHandle e, StreamHandle) {
  uint64_t generation;
  {
    std::lock_guard<std::mutex> lock(m_);
    auto it = events_.find(e);
    if (it == events_.end()) throw std::invalid_argument("HostEngine: unknown event");
    generation = ++it->second.recorded;
  }
  enqueue([this, e, generation] {
    std::lock_guard<std::mutex> lock(m_);
    auto it = events_.find(e);
    if (it != events_.end() && it->second.completed < generation) it->second.completed = generation;
  });
}

bool HostEngine::query(EventHandle e) {
  std::lock_guard<std::mutex> lock(m_);
  auto it = events_.find(e);
  if (it == events_.end()) throw std::invalid_argument("HostEngine: unknown event");
  return it->second.completed >= it->second.recorded;
}

void HostEngine::synchronize(EventHandle e) {
  if (fail_next_sync_.exchange(false))
    throw std::runtime_error("HostEngine: injected wait failure");
  std::unique_lock<std::mutex> lock(m_);
  done_cv_.wait(lock, [&] {
    auto it = events_.find(e);
    return it == events_.end() || it->second.completed >= it->second.recorded;
  });
}

void HostEngine::drain() {
  std::unique_lock<std::mutex> lock(m_);
  done_cv_.wait(lock, [&] { return queue_.empty() && !busy_; });
}

void HostEngine::loop() {
  for (;;) {
    std::function<void()> task;
    {
      std::unique_lock<std::mutex> lock(m_);
      cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stop requested and nothing left
      task = std::move(queue_.front());
      queue_.pop_front();
      busy_ = true;
    }
    task();
    {
      std::lock_guard<std::mutex> lock(m_);
      busy_ = false;
    }
    done_cv_.notify_all();
  }
}

}  // namespace tb
