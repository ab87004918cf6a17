#include "core/sim_link.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>

namespace tb {

SimulatedLink::SimulatedLink(LinkModel model) : model_(model) {
  const double bw = model.bandwidth_gbs, lat = model.latency_us;
  if (!std::isfinite(bw) || !(bw == 0 || bw >= kMinLinkGBs))
    throw std::invalid_argument(
        "simulated link: bandwidth_gbs must be 0 (unlimited) or a finite value >= 1e-06 GB/s");
  if (!std::isfinite(lat) || !(lat >= 0 && lat <= kMaxLatencyUs))
    throw std::invalid_argument(
        "simulated link: latency_us must be a finite value from 0 to 1e7 (ten seconds)");
  free_at_[0] = free_at_[1] = Clock::now();
  engines_[0] = std::thread([this] { engine_loop(Kind::kToDevice); });
  try {
    engines_[1] = std::thread([this] { engine_loop(Kind::kToHost); });
  } catch (...) {
    {
      std::lock_guard<std::mutex> lock(m_);
      stop_ = true;
    }
    work_cv_.notify_all();
    engines_[0].join();
    throw;
  }
}

SimulatedLink::~SimulatedLink() {
  if (forked()) {
    // The engine threads are the parent's: never joined here (the join would wait for
    // ever); their handles are left behind rather than destroyed while joinable.
    for (std::thread& t : engines_) new std::thread(std::move(t));
    return;
  }
  drain();  // (whoever queued a copy may still wait for it)
  {
    std::lock_guard<std::mutex> lock(m_);
    stop_ = true;
  }
  work_cv_.notify_all();
  for (std::thread& t : engines_) t.join();
}

void* SimulatedLink::alloc_pinned(size_t nbytes) {
  if (nbytes > SIZE_MAX - 4095) throw std::runtime_error("simulated link: out of memory");
  void* p = std::aligned_alloc(4096, std::max<size_t>(1, (nbytes + 4095) / 4096) * 4096);
  if (p == nullptr) throw std::runtime_error("simulated link: out of memory");
  return p;
}

void SimulatedLink::free_pinned(void* ptr) noexcept { std::free(ptr); }

void SimulatedLink::check_process() const {
  if (forked())
    throw std::runtime_error(
        "this simulated link was made by the parent process before it forked; its copy "
        "engines did not come along: make a new one in the child");
}

void SimulatedLink::copy_to_host_async(void* host, const void* device, size_t n, StreamHandle s) {
  check_process();
  {
    std::lock_guard<std::mutex> lock(m_);
    enqueue_locked(
        s, Op{Kind::kToHost, static_cast<char*>(host), static_cast<const char*>(device), n});
  }
  work_cv_.notify_all();
}

void SimulatedLink::copy_to_device_async(void* device, const void* host, size_t n, StreamHandle s) {
  check_process();
  {
    std::lock_guard<std::mutex> lock(m_);
    enqueue_locked(
        s, Op{Kind::kToDevice, static_cast<char*>(device), static_cast<const char*>(host), n});
  }
  work_cv_.notify_all();
}

EventHandle SimulatedLink::create_event() {
  check_process();
  std::lock_guard<std::mutex> lock(m_);
  const EventHandle e = next_event_++;
  events_[e] = EventState{};
  return e;
}

void SimulatedLink::destroy_event(EventHandle e) noexcept {
  if (forked()) return;  // (the lock may be held by a thread that did not come along)
  std::lock_guard<std::mutex> lock(m_);
  events_.erase(e);
}

void SimulatedLink::record(EventHandle e, StreamHandle s) {
  check_process();
  Op op{Kind::kRecord};
  op.event = e;
  {
    // (one critical section: two records of one event queue in the order they number)
    std::lock_guard<std::mutex> lock(m_);
    auto it = events_.find(e);
    if (it == events_.end()) throw std::invalid_argument("simulated link: unknown event");
    op.generation = ++it->second.recorded;
    enqueue_locked(s, op);
  }
  work_cv_.notify_all();
  done_cv_.notify_all();
}

bool SimulatedLink::query(EventHandle e) {
  check_process();
  std::lock_guard<std::mutex> lock(m_);
  auto it = events_.find(e);
  if (it == events_.end()) throw std::invalid_argument("simulated link: unknown event");
  return it->second.completed >= it->second.recorded;
}

void SimulatedLink::synchronize(EventHandle e) {
  check_process();
  std::unique_lock<std::mutex> lock(m_);
  done_cv_.wait(lock, [&] {
    auto it = events_.find(e);
    return it == events_.end() || it->second.completed >= it->second.recorded;
  });
}

void SimulatedLink::wait_for_locked(std::unique_lock<std::mutex>& lock,
                                    const std::map<StreamHandle, uint64_t>& seqs) {
  done_cv_.wait(lock, [&] {
    for (const auto& [h, seq] : seqs)
      if (streams_[h].done < seq) return false;
    return true;
  });
}

void SimulatedLink::synchronize_stream(StreamHandle s) {
  check_process();
  // What was queued on s before this call; later work (another thread's) is not waited for.
  std::unique_lock<std::mutex> lock(m_);
  wait_for_locked(lock, {{s, streams_[s].queued}});
}

void SimulatedLink::drain() {
  if (forked()) return;
  std::unique_lock<std::mutex> lock(m_);
  std::map<StreamHandle, uint64_t> seqs;
  for (const auto& [h, s] : streams_) seqs[h] = s.queued;
  wait_for_locked(lock, seqs);
}

uint64_t SimulatedLink::bytes_to_device() const {
  std::lock_guard<std::mutex> lock(m_);
  return moved_[0];
}

uint64_t SimulatedLink::bytes_to_host() const {
  std::lock_guard<std::mutex> lock(m_);
  return moved_[1];
}

void SimulatedLink::enqueue_locked(StreamHandle handle, Op op) {
  Stream& s = streams_[handle];
  op.seq = ++s.queued;
  s.ops.emplace_back(op, Clock::now());
  if (!s.running) advance_locked(s);
}

void SimulatedLink::advance_locked(Stream& s) {
  while (!s.ops.empty() && s.ops.front().first.kind == Kind::kRecord) {
    const Op& op = s.ops.front().first;
    auto it = events_.find(op.event);
    if (it != events_.end() && it->second.completed < op.generation)
      it->second.completed = op.generation;
    s.done = op.seq;
    s.ops.pop_front();
  }
}

SimulatedLink::Stream* SimulatedLink::next_for_locked(Kind kind) {
  // The copy queued first among the streams' heads, as a copy engine serves them.
  Stream* next = nullptr;
  for (auto& [h, s] : streams_)
    if (!s.running && !s.ops.empty() && s.ops.front().first.kind == kind &&
        (next == nullptr || s.ops.front().second < next->ops.front().second))
      next = &s;
  return next;
}

void SimulatedLink::engine_loop(Kind kind) {
  const int dir = static_cast<int>(kind);
  const double ns_per_byte = model_.bandwidth_gbs > 0 ? 1.0 / model_.bandwidth_gbs : 0.0;
  for (;;) {
    Stream* s = nullptr;
    Op op;
    Clock::time_point deadline;
    {
      std::unique_lock<std::mutex> lock(m_);
      work_cv_.wait(lock, [&] { return stop_ || (s = next_for_locked(kind)) != nullptr; });
      if (s == nullptr) return;  // stop requested; whatever is queued is never run
      s->running = true;
      op = s->ops.front().first;
      const auto start = std::max({s->ops.front().second, free_at_[dir], s->ready});
      // (bounded: an hour at most, so the clock arithmetic never overflows)
      const double ns =
          std::min(model_.latency_us * 1e3 + static_cast<double>(op.n) * ns_per_byte, 3.6e12);
      deadline = start + std::chrono::nanoseconds(static_cast<int64_t>(ns));
      free_at_[dir] = s->ready = deadline;
    }
    if (op.n && !model_.copy_at_end) std::memcpy(op.dst, op.src, op.n);
    if (deadline > Clock::now()) std::this_thread::sleep_until(deadline);
    if (op.n && model_.copy_at_end) std::memcpy(op.dst, op.src, op.n);
    {
      std::lock_guard<std::mutex> lock(m_);
      moved_[dir] += op.n;
      s->done = op.seq;
      s->ops.pop_front();
      s->running = false;
      advance_locked(*s);
    }
    work_cv_.notify_all();
    done_cv_.notify_all();
  }
}

}  // namespace tb
