#include "core/pinned_pool.h"

#include <unistd.h>

#include <algorithm>
#include <stdexcept>
#include <vector>

namespace tb {

size_t default_pinned_budget() {
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
  const size_t ram = pages > 0 && page > 0 ? size_t(pages) * size_t(page) : size_t{8} << 30;
  return std::clamp(ram / 8, size_t{256} << 20, size_t{8} << 30);
}

PinnedPool::PinnedPool(TransferEngine& engine, size_t budget_bytes, size_t reserved)
    : engine_(engine), budget_(budget_bytes), reserved_(reserved) {}

bool PinnedPool::fits_locked(size_t need) const {
  // (written so that no sum can overflow: a budget of 2**63 is a valid "no limit")
  return held_ <= budget_ && reserved_ <= budget_ - held_ && need <= budget_ - held_ - reserved_;
}

size_t PinnedPool::size_class(size_t nbytes) {
  constexpr size_t kPage = 4096;
  if (nbytes <= 16 * kPage) return std::max<size_t>(kPage, (nbytes + kPage - 1) / kPage * kPage);
  size_t top = size_t{1} << (63 - __builtin_clzll(nbytes));  // highest power of two <= n
  const size_t granule = std::max(kPage, top / 8);           // eight classes per doubling
  return (nbytes + granule - 1) / granule * granule;
}

BlockPtr PinnedPool::acquire(size_t nbytes) {
  const size_t cls = size_class(nbytes);
  std::unique_lock<std::mutex> lock(m_);
  // 1. A cached block of this class whose last copy has completed.
  auto range = idle_.equal_range(cls);
  for (auto it = range.first; it != range.second; ++it) {
    if (idle_done(*it->second)) {
      BlockPtr b = std::move(it->second);
      idle_.erase(it);
      in_use_ += cls;
      ++counters_.hits;
      return b;
    }
  }
  // 2. A new block, if the budget allows (after freeing idle blocks of other classes).
  if (!fits_locked(cls)) make_room_locked(cls);
  if (fits_locked(cls)) {
    held_ += cls;  // reserved now, so concurrent callers cannot overshoot the budget
    in_use_ += cls;
    lock.unlock();
    auto block = std::make_unique<PinnedBlock>();
    block->size = cls;
    try {
      block->event = Event(engine_);
      block->memory = alloc_pinned(engine_, cls);
    } catch (const std::exception&) {
      block.reset();
      lock.lock();
      held_ -= cls;
      in_use_ -= cls;
      ++counters_.pin_failures;
      ++counters_.fallbacks;
      return nullptr;
    }
    lock.lock();
    ++counters_.misses;
    return block;
  }
  // 3. Over budget: wait for a pending block of this class rather than over-allocate.
  // (Any block of this class still cached was pending in step 1.)
  if (auto pending = idle_.find(cls); pending != idle_.end()) {
    BlockPtr b = std::move(pending->second);
    idle_.erase(pending);
    in_use_ += cls;
    ++counters_.waits;
    lock.unlock();
    try {
      b->event.wait();
    } catch (...) {
      lock.lock();
      in_use_ -= cls;
      idle_.emplace(cls, std::move(b));  // back where it was; idle_done() keeps it out of use
      throw;
    }
    return b;
  }
  ++counters_.fallbacks;
  return nullptr;
}

void PinnedPool::release(BlockPtr block) noexcept {
  if (!block) return;
  std::lock_guard<std::mutex> lock(m_);
  in_use_ -= block->size;
  if (!fits_locked(0) && idle_done(*block)) {  // the budget shrank while this block was out
    held_ -= block->size;
    ++counters_.frees;
    return;  // (block frees its memory and event here)
  }
  try {
    idle_.emplace(block->size, std::move(block));
  } catch (...) {           // out of memory for the map node: give the block up, leaked, not freed,
    held_ -= block->size;   // since its last copy may still be running (emplace did not
    (void)block.release();  // take it: the node allocation failed before the move)
  }
}

void PinnedPool::discard(BlockPtr block) noexcept {
  if (!block) return;
  std::lock_guard<std::mutex> lock(m_);
  in_use_ -= block->size;
  held_ -= block->size;
  ++counters_.frees;
  // Leaked, not freed: a copy into or out of it may still be running (a small leak on a
  // rare error, never a use-after-free).
  (void)block.release();
}

void PinnedPool::free_block_locked(std::multimap<size_t, BlockPtr>::iterator it) {
  held_ -= it->second->size;
  ++counters_.frees;
  idle_.erase(it);  // frees the block's memory and event
}

void PinnedPool::make_room_locked(size_t need) {
  while (!fits_locked(need)) {
    auto victim = idle_.end();
    for (auto it = idle_.rbegin(); it != idle_.rend(); ++it) {  // largest first
      if (idle_done(*it->second)) {
        victim = std::prev(it.base());
        break;
      }
    }
    if (victim == idle_.end()) return;
    free_block_locked(victim);
  }
}

bool PinnedPool::idle_done(PinnedBlock& b) noexcept {
  try {
    return b.event.done();
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
  if (!fits_locked(0)) make_room_locked(0);
}

bool PinnedPool::reserve(size_t nbytes) {
  std::lock_guard<std::mutex> lock(m_);
  if (!fits_locked(nbytes)) make_room_locked(nbytes);
  if (!fits_locked(nbytes)) return false;
  reserved_ += nbytes;
  return true;
}

void PinnedPool::unreserve(size_t nbytes) noexcept {
  std::lock_guard<std::mutex> lock(m_);
  reserved_ -= std::min(nbytes, reserved_);
}

size_t PinnedPool::reserved() {
  std::lock_guard<std::mutex> lock(m_);
  return reserved_;
}

void PinnedPool::trim() {
  std::lock_guard<std::mutex> lock(m_);
  for (auto it = idle_.begin(); it != idle_.end();) {
    auto next = std::next(it);
    if (idle_done(*it->second)) free_block_locked(it);
    it = next;
  }
}

void PinnedPool::release_all() {
  std::lock_guard<std::mutex> lock(m_);
  for (auto& [size, b] : idle_) b->event.wait();
  while (!idle_.empty()) free_block_locked(idle_.begin());
}

}  // namespace tb
