// A host-only TransferEngine for testing the pipeline and the pool without a GPU.
//
// "Device memory" is ordinary host memory. A stream is a worker thread that runs the
// queued copies in order, optionally after a delay, so a staging block reused before
// its copy finished shows up as corrupted data; an event completes when the worker
// reaches the point where it was recorded. Pinning can be made to fail after a number
// of allocations, to exercise the pageable fallback.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <unordered_map>

#include "core/transfer_engine.h"

namespace tb {

class HostEngine final : public TransferEngine {
 public:
  /// fail_copy_after: the copy call after that many succeeded throws (-1: never), to test
  /// that a failed transfer leaves the pool consistent.
  explicit HostEngine(int delay_us = 0, int64_t fail_pinning_after = -1,
                      int64_t fail_copy_after = -1);
  ~HostEngine() override;

  void* alloc_pinned(size_t nbytes) override;
  void free_pinned(void* ptr) noexcept override;
  void copy_to_host_async(void* host, const void* device, size_t n, StreamHandle s) override;
  void copy_to_device_async(void* device, const void* host, size_t n, StreamHandle s) override;
  EventHandle create_event() override;
  void destroy_event(EventHandle e) noexcept override;
  void record(EventHandle e, StreamHandle s) override;
  bool query(EventHandle e) override;
  void synchronize(EventHandle e) override;
  void synchronize_stream(StreamHandle) override { drain(); }

  /// Waits until everything queued so far has run.
  void drain();
  /// The next synchronize() throws instead of waiting (as a device error would).
  void fail_next_synchronize() { fail_next_sync_ = true; }
  int64_t pinned_allocations() const { return allocations_; }
  int64_t live_pinned() const { return live_; }

 private:
  struct EventState {
    uint64_t recorded = 0, completed = 0;
  };
  void enqueue(std::function<void()> task);
  void maybe_fail_copy();
  void loop();

  const int delay_us_;
  const int64_t fail_after_;
  const int64_t fail_copy_after_;
  int64_t copies_ = 0;
  int64_t allocations_ = 0;
  int64_t live_ = 0;
  std::mutex m_;
  std::condition_variable cv_;       // tasks queued, or stop
  std::condition_variable done_cv_;  // an event completed, or the queue drained
  std::deque<std::function<void()>> queue_;
  bool busy_ = false;
  std::atomic<bool> fail_next_sync_{false};
  bool stop_ = false;
  std::unordered_map<EventHandle, EventState> events_;
  EventHandle next_event_ = 1;
  std::thread worker_;
};

}  // namespace tb
