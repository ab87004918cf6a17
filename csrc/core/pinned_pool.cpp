#include "core/pinned_pool.h"

#include <algorithm>
#include <stdexcept>
#include <vector>

namespace tb {

PinnedPool::PinnedPool(TransferEngine& engine, size_t budget_bytes)
    : engine_(engine), budget_(budget_bytes) {}

PinnedPool::~PinnedPool() {
  // Blocks are not freed here: the CUDA pool lives until exit, where calling into a
  // driver that may already be shutting down is unsafe; tests call release_all().
  for (auto& [size, block] : idle_) delete block;
}

size_t PinnedPool::size_class(size_t nbytes) {
  constexpr size_t kPage = 4096;
  if (nbytes <= 16 * kPage) return std::max<size_t>(kPage, (nbytes + kPage - 1) / kPage * kPage);
  size_t top = size_t{1} << (63 - __builtin_clzll(nbytes));  // highest power of two <= n
  const size_t granule = std::max(kPage, top / 8);             // eight classes per doubling
  return (nbytes + granule - 1) / granule * granule;
}

PinnedBlock* PinnedPool::acquire(size_t nbytes) {
  const size_t cls = size_class(nbytes);
  std::unique_lock<std::mutex> lock(m_);
  // 1. A cached block of this class whose last copy has completed.
  PinnedBlock* pending = nullptr;
  auto range = idle_.equal_range(cls);
  for (auto it = range.first; it != range.second; ++it) {
    PinnedBlock* b = it->second;
    if (idle_done(b)) {
      b->recorded = false;
      idle_.erase(it);
      in_use_ += cls;
      ++counters_.hits;
      return b;
    }
    pending = b;
  }
  // 2. A new block, if the budget allows (after freeing idle blocks of other classes).
  if (held_ + cls > budget_) make_room_locked(cls);
  if (held_ + cls <= budget_) {
    held_ += cls;  // reserved now, so concurrent callers cannot overshoot the budget
    in_use_ += cls;
    lock.unlock();
    auto block = std::make_unique<PinnedBlock>();
    block->size = cls;
    try {
      block->event = engine_.create_event();
      block->ptr = engine_.alloc_pinned(cls);
    } catch (const std::exception&) {
      if (block->event) engine_.destroy_event(block->event);
      lock.lock();
      held_ -= cls;
      in_use_ -= cls;
      ++counters_.pin_failures;
      ++counters_.fallbacks;
      return nullptr;
    }
    lock.lock();
    ++counters_.misses;
    return block.release();
  }
  // 3. Over budget: wait for a pending block of this class rather than over-allocate.
  if (pending != nullptr) {
    for (auto it = idle_.begin(); it != idle_.end(); ++it) {
      if (it->second == pending) {
        idle_.erase(it);
        break;
      }
    }
    in_use_ += cls;
    ++counters_.waits;
    lock.unlock();
    try {
      engine_.synchronize(pending->event);
    } catch (...) {
      lock.lock();
      in_use_ -= cls;
      idle_.emplace(cls, pending);  // back where it was; idle_done() keeps it out of use
      throw;
    }
    pending->recorded = false;
    return pending;
  }
  ++counters_.fallbacks;
  return nullptr;
}

void PinnedPool::release(PinnedBlock* block) noexcept {
  if (block == nullptr) return;
  std::lock_guard<std::mutex> lock(m_);
  in_use_ -= block->size;
  if (held_ > budget_) {  // the budget shrank while this block was out
    if (idle_done(block)) {
      held_ -= block->size;
      engine_.free_pinned(block->ptr);
      engine_.destroy_event(block->event);
      ++counters_.frees;
      delete block;
      return;
    }
  }
  try {
    idle_.emplace(block->size, block);
  } catch (...) {  // out of memory for the map node: give the block up (leaked, not freed)
    held_ -= block->size;
  }
}

void PinnedPool::discard(PinnedBlock* block) noexcept {
  if (block == nullptr) return;
  {
    std::lock_guard<std::mutex> lock(m_);
    in_use_ -= block->size;
    held_ -= block->size;
    ++counters_.frees;
  }
  engine_.free_pinned(block->ptr);
  engine_.destroy_event(block->event);
  delete block;
}

void PinnedPool::free_block_locked(std::multimap<size_t, PinnedBlock*>::iterator it) {
  PinnedBlock* b = it->second;
  idle_.erase(it);
  held_ -= b->size;
  engine_.free_pinned(b->ptr);
  engine_.destroy_event(b->event);
  ++counters_.frees;
  delete b;
}

void PinnedPool::make_room_locked(size_t need) {
  while (held_ + need > budget_) {
    auto victim = idle_.end();
    for (auto it = idle_.rbegin(); it != idle_.rend(); ++it) {  // largest first
      if (idle_done(it->second)) {
        victim = std::prev(it.base());
        break;
      }
    }
    if (victim == idle_.end()) return;
    free_block_locked(victim);
  }
}

bool PinnedPool::idle_done(PinnedBlock* b) noexcept {
  if (!b->recorded) return true;
  try {
    return engine_.query(b->event);
  } catch (...) {
    return false;  // an engine error: keep the block out of circulation
  }
}

PoolStats PinnedPool::stats() {
  std::lock_guard<std::mutex> lock(m_);
  PoolStats s = counters_;
  s.bytes_held = held_;
  s.bytes_in_use = in_use_;
  s.budget = budget_;
  return s;
}

size_t PinnedPool::budget() {
  std::lock_guard<std::mutex> lock(m_);
  return budget_;
}

void PinnedPool::set_budget(size_t bytes) {
  std::lock_guard<std::mutex> lock(m_);
  budget_ = bytes;
  if (held_ > budget_) make_room_locked(0);
}

void PinnedPool::trim() {
  std::lock_guard<std::mutex> lock(m_);
  for (auto it = idle_.begin(); it != idle_.end();) {
    auto next = std::next(it);
    if (idle_done(it->second)) free_block_locked(it);
    it = next;
  }
}

void PinnedPool::release_all() {
  std::lock_guard<std::mutex> lock(m_);
  for (auto& [size, b] : idle_) {
    if (b->recorded) engine_.synchronize(b->event);
  }
  while (!idle_.empty()) free_block_locked(idle_.begin());
}

}  // namespace tb
