// The copy/event interface the transfer pipeline runs on.
//
// The CUDA implementation (csrc/cuda/cuda_engine.cu) maps it onto cudaMemcpyAsync,
// events and cudaHostAlloc; the simulated link (core/sim_link.h, which
// testing/host_engine.h extends with fault switches) runs the same "asynchronous" copies
// on threads of its own, so the scheduling logic - chunking, buffer rotation, completion
// tracking, the pinned pool - is tested without a GPU.
#pragma once

#include <cstddef>
#include <cstdint>

namespace tb {

using StreamHandle = uintptr_t;  // a cudaStream_t (0: the legacy default stream)
using EventHandle = uintptr_t;   // a cudaEvent_t

class TransferEngine {
 public:
  virtual ~TransferEngine() = default;

  /// Page-locked memory; throws std::runtime_error when it cannot be had.
  virtual void* alloc_pinned(size_t nbytes) = 0;
  virtual void free_pinned(void* ptr) noexcept = 0;

  /// Queue a copy on `stream`; neither side may be touched until an event recorded
  /// after it has completed.
  virtual void copy_to_host_async(void* host, const void* device, size_t n, StreamHandle s) = 0;
  virtual void copy_to_device_async(void* device, const void* host, size_t n, StreamHandle s) = 0;

  virtual EventHandle create_event() = 0;
  virtual void destroy_event(EventHandle e) noexcept = 0;
  /// Marks the point in `s` after everything queued so far.
  virtual void record(EventHandle e, StreamHandle s) = 0;
  /// True once everything before the last record() has completed (true if never recorded).
  virtual bool query(EventHandle e) = 0;
  /// Blocks until query() would return true.
  virtual void synchronize(EventHandle e) = 0;
  /// Blocks until everything queued on `s` so far has run (used on error paths).
  virtual void synchronize_stream(StreamHandle s) = 0;

  /// Called on each copy thread of a transfer before its first call into the engine
  /// (the thread that called the pipeline is entered by its caller): the CUDA engine
  /// makes its device current there, so copies, events and the legacy default stream
  /// are those of the transfer's device, and no context is made on another GPU.
  virtual void enter_thread() {}
};

}  // namespace tb
