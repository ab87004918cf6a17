// A pool of page-locked staging blocks, reused across transfers.
//
// Blocks come in size classes (eight per doubling, so at most 12.5% is wasted, never
// power-of-two rounding). A released block carries the event recorded after its last
// asynchronous copy and is handed out again only once that event has completed. The
// pool never holds more than its byte budget: over budget it frees idle blocks, waits
// for a pending block of the right class, or answers nullptr so the caller takes the
// pageable path. Part of the budget can be reserved for memory pinned outside the pool
// (arrays page-locked in place), so both together stay within it. Thread safe.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>

#include "core/event.h"
#include "core/transfer_engine.h"

namespace tb {

/// A staging block: page-locked memory and the event recorded after its last copy.
/// Owned through BlockPtr; destroying it frees both.
struct PinnedBlock {
  PinnedMemory memory;
  size_t size = 0;
  Event event;
  char* data() const { return static_cast<char*>(memory.get()); }
};
using BlockPtr = std::unique_ptr<PinnedBlock>;

struct PoolStats {
  size_t bytes_held = 0;    // pinned bytes owned by the pool
  size_t bytes_in_use = 0;  // of which handed out right now
  size_t budget = 0;
  uint64_t hits = 0;       // acquire() served by a cached block
  uint64_t misses = 0;     // acquire() that pinned a new block
  uint64_t waits = 0;      // acquire() that waited for a pending block
  uint64_t fallbacks = 0;  // acquire() answered nullptr (budget full or pinning failed)
  uint64_t pin_failures = 0;
  uint64_t frees = 0;  // blocks unpinned to make room or on trim()
};

/// The pinned budget of a pool nobody set one for: an eighth of physical memory, within
/// [256 MiB, 8 GiB]. The Python layer divides it among the ranks of a node.
size_t default_pinned_budget();

class PinnedPool {
 public:
  /// `reserved`: bytes of the budget already taken by memory pinned outside the pool.
  PinnedPool(TransferEngine& engine, size_t budget_bytes, size_t reserved = 0);
  // Frees the idle blocks without waiting for them: call release_all() first. (The CUDA
  // pools are never destroyed: see cuda/cuda_engine.h.)
  ~PinnedPool() = default;
  PinnedPool(const PinnedPool&) = delete;
  PinnedPool& operator=(const PinnedPool&) = delete;

  /// A block of at least nbytes whose last copy has completed, or nullptr (the caller
  /// then uses pageable memory).
  BlockPtr acquire(size_t nbytes);
  /// Returns a block; record its event after its last asynchronous copy first.
  void release(BlockPtr block) noexcept;
  /// Takes a block out of circulation for good (its state is unknown after an engine
  /// error): drops it from the accounting and leaks it, since a copy may still use it.
  void discard(BlockPtr block) noexcept;

  PoolStats stats();
  size_t budget();
  /// Changes the budget; idle blocks beyond it are freed now, busy ones when released.
  void set_budget(size_t bytes);
  /// Frees every idle block whose last copy has completed.
  void trim();
  /// Takes nbytes of the budget for memory pinned outside the pool: true when they fit
  /// beside the bytes held (idle, completed blocks are freed to make room), false and no
  /// change otherwise. Checked under the pool's lock, so blocks pinned concurrently and
  /// the reservations never exceed the budget together.
  bool reserve(size_t nbytes);
  /// Gives reserved bytes back (at most those reserved).
  void unreserve(size_t nbytes) noexcept;
  size_t reserved();
  /// Frees all idle blocks, waiting for pending ones (for tests and explicit shutdown).
  void release_all();

  static size_t size_class(size_t nbytes);

 private:
  // Frees idle, completed blocks (largest first) until `need` more bytes fit. Lock held.
  void make_room_locked(size_t need);
  // held_ + reserved_ + need fit in the budget. Lock held.
  bool fits_locked(size_t need) const;
  void free_block_locked(std::multimap<size_t, BlockPtr>::iterator it);
  // True when b's last copy has completed (false on an engine error). Never throws.
  static bool idle_done(PinnedBlock& b) noexcept;

  TransferEngine& engine_;
  std::mutex m_;
  std::multimap<size_t, BlockPtr> idle_;  // by size class
  size_t budget_;
  size_t held_ = 0;      // includes bytes reserved for allocations in progress
  size_t reserved_ = 0;  // budget taken by memory pinned outside the pool (reserve())
  size_t in_use_ = 0;
  PoolStats counters_;
};

}  // namespace tb
