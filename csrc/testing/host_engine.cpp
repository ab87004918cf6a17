#include "testing/host_engine.h"

#include <cstring>
#include <stdexcept>

namespace tb {

HostEngine::HostEngine(int delay_us, int64_t fail_pinning_after, int64_t fail_copy_after,
                       double bandwidth_gbs)
    : SimulatedLink(LinkModel{bandwidth_gbs, static_cast<double>(delay_us), true}),
      fail_after_(fail_pinning_after),
      fail_copy_after_(fail_copy_after) {}

void HostEngine::maybe_fail_copy() {
  std::lock_guard<std::mutex> lock(m_);
  if (fail_copy_after_ >= 0 && copies_++ == fail_copy_after_)
    throw std::runtime_error("HostEngine: injected copy failure (test setting)");
}

void HostEngine::enter_thread() {
  std::lock_guard<std::mutex> lock(m_);
  entered_.insert(std::this_thread::get_id());
}

void HostEngine::check_entered() {
  std::lock_guard<std::mutex> lock(m_);
  if (entered_.count(std::this_thread::get_id()) == 0)
    throw std::logic_error("HostEngine: a copy from a thread the engine was never entered on");
}

void* HostEngine::alloc_pinned(size_t nbytes) {
  {
    std::lock_guard<std::mutex> lock(m_);
    if (fail_after_ >= 0 && allocations_ >= fail_after_)
      throw std::runtime_error("HostEngine: pinning refused (test setting)");
  }
  void* p = SimulatedLink::alloc_pinned(nbytes);
  std::memset(p, 0xCD, nbytes);  // stale bytes, never zeros, so unwritten data shows
  std::lock_guard<std::mutex> lock(m_);
  ++allocations_;
  ++live_;
  return p;
}

void HostEngine::free_pinned(void* ptr) noexcept {
  {
    std::lock_guard<std::mutex> lock(m_);
    --live_;
  }
  SimulatedLink::free_pinned(ptr);
}

void HostEngine::copy_to_host_async(void* host, const void* device, size_t n, StreamHandle s) {
  check_entered();
  maybe_fail_copy();
  SimulatedLink::copy_to_host_async(host, device, n, s);
}

void HostEngine::copy_to_device_async(void* device, const void* host, size_t n, StreamHandle s) {
  check_entered();
  maybe_fail_copy();
  SimulatedLink::copy_to_device_async(device, host, n, s);
}

void HostEngine::synchronize(EventHandle e) {
  if (fail_next_sync_.exchange(false))
    throw std::runtime_error("HostEngine: injected wait failure");
  SimulatedLink::synchronize(e);
}

int64_t HostEngine::pinned_allocations() const {
  std::lock_guard<std::mutex> lock(m_);
  return allocations_;
}

int64_t HostEngine::live_pinned() const {
  std::lock_guard<std::mutex> lock(m_);
  return live_;
}

}  // namespace tb
