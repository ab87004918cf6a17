// The simulated link with test switches, for testing the pipeline and the pool.
//
// Copies run as on core/sim_link.h's engine; a per-copy delay makes a staging block
// reused before its copy finished show up as corrupted data. Page-locked blocks start
// filled with 0xCD, so unwritten bytes show. Pinning can be made to fail after a number
// of allocations (to exercise the pageable fallback), a copy call after a number of
// calls, and the next event wait (as a device error would).
#pragma once

#include <atomic>
#include <cstdint>
#include <mutex>
#include <set>
#include <thread>

#include "core/sim_link.h"

namespace tb {

class HostEngine final : public SimulatedLink {
 public:
  /// fail_copy_after: the copy call after that many succeeded throws (-1: never), to test
  /// that a failed transfer leaves the pool consistent.
  explicit HostEngine(int delay_us = 0, int64_t fail_pinning_after = -1,
                      int64_t fail_copy_after = -1, double bandwidth_gbs = 0);

  void* alloc_pinned(size_t nbytes) override;
  void free_pinned(void* ptr) noexcept override;
  void copy_to_host_async(void* host, const void* device, size_t n, StreamHandle s) override;
  void copy_to_device_async(void* device, const void* host, size_t n, StreamHandle s) override;
  void synchronize(EventHandle e) override;
  /// Records the thread as entered; copies from a thread never entered throw, so a copy
  /// thread the pipeline forgot to enter (on CUDA: a wrong current device) shows.
  void enter_thread() override;

  /// The next synchronize() throws instead of waiting (as a device error would).
  void fail_next_synchronize() { fail_next_sync_ = true; }
  int64_t pinned_allocations() const;
  int64_t live_pinned() const;

 private:
  void maybe_fail_copy();
  void check_entered();

  const int64_t fail_after_;
  const int64_t fail_copy_after_;
  mutable std::mutex m_;
  int64_t copies_ = 0;
  int64_t allocations_ = 0;
  int64_t live_ = 0;
  std::atomic<bool> fail_next_sync_{false};
  std::set<std::thread::id> entered_;
};

}  // namespace tb
