// Move-only owners of an engine's events and page-locked blocks (RAII).
//
// Each one holds the engine it came from, which must outlive it: the CUDA engines live
// until exit (leaked on purpose, see cuda/cuda_engine.h) and the host engine outlives
// everything its tester creates.
#pragma once

#include <cstddef>
#include <memory>
#include <utility>

#include "core/transfer_engine.h"

namespace tb {

/// One engine event, destroyed with its owner. Remembers whether it was recorded since
/// it was last seen complete, so waiting on an event that guards nothing costs nothing.
class Event {
 public:
  Event() noexcept = default;
  /// Creates an event on `engine` (for CUDA: on the device current now).
  explicit Event(TransferEngine& engine) : engine_(&engine), handle_(engine.create_event()) {}
  Event(Event&& other) noexcept
      : engine_(std::exchange(other.engine_, nullptr)),
        handle_(std::exchange(other.handle_, 0)),
        pending_(std::exchange(other.pending_, false)) {}
  Event& operator=(Event&& other) noexcept {
    if (this != &other) {
      reset();
      engine_ = std::exchange(other.engine_, nullptr);
      handle_ = std::exchange(other.handle_, 0);
      pending_ = std::exchange(other.pending_, false);
    }
    return *this;
  }
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  ~Event() { reset(); }

  explicit operator bool() const noexcept { return handle_ != 0; }

  /// Marks the point in `stream` after everything queued so far. The event counts as
  /// pending from before the call: if recording fails, the caller cannot tell whether
  /// it happened and must settle the stream.
  void record(StreamHandle stream) {
    pending_ = true;
    engine_->record(handle_, stream);
  }
  /// True once everything before the last record() has run (true if never recorded).
  /// Throws on an engine error.
  bool done() {
    if (pending_ && engine_->query(handle_)) pending_ = false;
    return !pending_;
  }
  /// Blocks until done().
  void wait() {
    if (!pending_) return;
    engine_->synchronize(handle_);
    pending_ = false;
  }
  /// For a caller that waited by other means (the whole stream): nothing is pending.
  void mark_done() noexcept { pending_ = false; }
  /// Recorded and not yet seen complete.
  bool pending() const noexcept { return pending_; }
  /// Forgets the event without destroying it: for a forked child, where the parent's
  /// engine must not be called.
  void abandon() noexcept {
    engine_ = nullptr;
    handle_ = 0;
    pending_ = false;
  }

 private:
  void reset() noexcept {
    if (handle_ != 0) engine_->destroy_event(handle_);
    engine_ = nullptr;
    handle_ = 0;
    pending_ = false;
  }

  TransferEngine* engine_ = nullptr;
  EventHandle handle_ = 0;
  bool pending_ = false;
};

/// Frees page-locked memory through the engine that allocated it.
struct PinnedDeleter {
  TransferEngine* engine = nullptr;
  void operator()(void* ptr) const noexcept {
    if (ptr != nullptr) engine->free_pinned(ptr);
  }
};
using PinnedMemory = std::unique_ptr<void, PinnedDeleter>;

/// Page-locked memory of at least nbytes from `engine`; throws when it cannot be had.
inline PinnedMemory alloc_pinned(TransferEngine& engine, size_t nbytes) {
  return PinnedMemory(engine.alloc_pinned(nbytes), PinnedDeleter{&engine});
}

}  // namespace tb
