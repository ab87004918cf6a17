// A simulated host<->device link: a TransferEngine whose "device memory" is host memory.
//
// It behaves as a GPU's copy engines do, so the pipeline's scheduling is measured and
// tested on a machine without one:
//   - one copy engine per direction (host->device and device->host run at once, as on
//     a GPU with two copy engines), each a thread that runs one copy at a time;
//   - each stream runs its operations in the order they were queued (a copy starts only
//     after the one before it on the same stream finished; an event completes when
//     everything queued before it on its stream has run);
//   - a copy of n bytes takes latency + n / bandwidth of link time, and starts when it
//     was queued, its link was free and the copy before it on its stream had ended,
//     whichever is last, all by the model's clock (the memcpy itself runs inside that
//     time): copies queued back to back run back to back, and a late wake-up of the
//     engine thread delays when a copy is seen complete, never the link.
// A bandwidth of 0 means "as fast as memcpy". Page-locked memory is ordinary aligned
// memory. Thread safe.
#pragma once

#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <map>
#include <mutex>
#include <thread>
#include <unordered_map>

#include "core/transfer_engine.h"

namespace tb {

struct LinkModel {
  double bandwidth_gbs = 0;  // per direction, in GB/s (1e9 bytes/s); 0: unlimited
  double latency_us = 0;     // per copy
  // When a copy's bytes move: at its start (the default: its completion then comes on
  // time) or at its end, as late as the model allows, so a test sees a staging block
  // read or rewritten before the copy that uses it has completed.
  bool copy_at_end = false;
};

/// Bounds of the model (the constructor refuses what lies outside, and NaN or infinity):
/// a bandwidth of 0 (unlimited) or at least kMinLinkGBs, a latency up to kMaxLatencyUs.
constexpr double kMinLinkGBs = 1e-6;
constexpr double kMaxLatencyUs = 1e7;

class SimulatedLink : public TransferEngine {
 public:
  explicit SimulatedLink(LinkModel model = {});
  ~SimulatedLink() override;
  SimulatedLink(const SimulatedLink&) = delete;
  SimulatedLink& operator=(const SimulatedLink&) = delete;

  void* alloc_pinned(size_t nbytes) override;
  void free_pinned(void* ptr) noexcept override;
  void copy_to_host_async(void* host, const void* device, size_t n, StreamHandle s) override;
  void copy_to_device_async(void* device, const void* host, size_t n, StreamHandle s) override;
  EventHandle create_event() override;
  void destroy_event(EventHandle e) noexcept override;
  void record(EventHandle e, StreamHandle s) override;
  bool query(EventHandle e) override;
  void synchronize(EventHandle e) override;
  void synchronize_stream(StreamHandle s) override;

  /// Waits until everything queued so far on every stream has run (in a forked child:
  /// returns at once, there is nothing of its own to wait for).
  void drain();
  /// True in a process forked after this link was made: its engine threads are the
  /// parent's and did not come along, so every call raises there, and whoever owns the
  /// link should leak it rather than destroy it (its locks may be held for good).
  bool forked() const noexcept { return getpid() != pid_; }
  const LinkModel& model() const { return model_; }
  /// Bytes moved so far in each direction.
  uint64_t bytes_to_device() const;
  uint64_t bytes_to_host() const;

 private:
  enum class Kind { kToDevice = 0, kToHost = 1, kRecord = 2 };
  struct Op {
    Kind kind;
    char* dst = nullptr;
    const char* src = nullptr;
    size_t n = 0;
    EventHandle event = 0;
    uint64_t generation = 0;
    uint64_t seq = 0;  // its place in its stream
  };
  using Clock = std::chrono::steady_clock;
  struct Stream {
    std::deque<std::pair<Op, Clock::time_point>> ops;  // and when each was queued
    bool running = false;     // its first op is being copied by an engine thread
    Clock::time_point ready;  // when its last copy ended, by the model
    uint64_t queued = 0;      // ops queued so far, and of those, done (in order)
    uint64_t done = 0;
  };
  struct EventState {
    uint64_t recorded = 0, completed = 0;
  };

  void enqueue_locked(StreamHandle s, Op op);
  // Waits (lock held) until every op queued on the streams so far has run.
  void wait_for_locked(std::unique_lock<std::mutex>& lock,
                       const std::map<StreamHandle, uint64_t>& seqs);
  // Completes the events at the head of `s` (nothing before them is left). Lock held.
  void advance_locked(Stream& s);
  // An engine thread: runs the copies of one direction.
  void engine_loop(Kind kind);
  Stream* next_for_locked(Kind kind);

  void check_process() const;  // throws in a forked child

  const LinkModel model_;
  const pid_t pid_ = getpid();
  mutable std::mutex m_;
  std::condition_variable work_cv_;  // an op was queued or finished, or stop
  std::condition_variable done_cv_;  // an event completed or a stream drained
  std::map<StreamHandle, Stream> streams_;
  std::unordered_map<EventHandle, EventState> events_;
  EventHandle next_event_ = 1;
  uint64_t moved_[2] = {0, 0};
  Clock::time_point free_at_[2];  // when each direction's link is next free
  bool stop_ = false;
  std::thread engines_[2];
};

}  // namespace tb
