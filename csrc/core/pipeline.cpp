#include "core/pipeline.h"

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <stdexcept>

#include "core/pack.h"
#include "core/strided_copy.h"
#include "core/thread_pool.h"

namespace tb {
namespace {

int64_t product(const Dims& v, size_t from) {
  int64_t p = 1;
  for (size_t i = from; i < v.size(); ++i) p *= v[i];
  return p;
}

void plan(const Dims& shape, int64_t itemsize, size_t chunk_bytes, int depth,
          std::vector<int64_t>& prefix, size_t& offset, std::vector<Chunk>& out) {
  const int64_t slice = product(shape, depth + 1) * itemsize;  // bytes per index of `depth`
  const int64_t n = shape[depth];
  if (static_cast<size_t>(slice) > chunk_bytes && depth + 1 < static_cast<int>(shape.size())) {
    for (int64_t i = 0; i < n; ++i) {  // one index at a time, split deeper
      prefix.push_back(i);
      plan(shape, itemsize, chunk_bytes, depth + 1, prefix, offset, out);
      prefix.pop_back();
    }
    return;
  }
  const int64_t per = std::max<int64_t>(1, static_cast<int64_t>(chunk_bytes) / slice);
  for (int64_t b = 0; b < n; b += per) {
    Chunk c;
    c.depth = depth;
    c.prefix = prefix;
    c.begin = b;
    c.end = std::min(n, b + per);
    c.bytes = static_cast<size_t>((c.end - c.begin) * slice);
    c.offset = offset;
    offset += c.bytes;
    out.push_back(std::move(c));
  }
}

// The host side of one chunk: the user's sub-array, and its dense twin in staging.
struct ChunkViews {
  Dims shape, host_strides, dense_strides;
  char* host = nullptr;
};

// Byte strides of a dense C-order array of `shape`.
Dims c_strides(const Dims& shape, int64_t itemsize) {
  Dims s(shape.size());
  int64_t acc = itemsize;
  for (int d = static_cast<int>(shape.size()) - 1; d >= 0; --d) {
    s[d] = acc;
    acc *= shape[d];
  }
  return s;
}

ChunkViews chunk_views(const HostView& v, const Chunk& c) {
  ChunkViews cv;
  char* p = v.data;
  for (int d = 0; d < c.depth; ++d) p += c.prefix[d] * v.strides[d];
  p += c.begin * v.strides[c.depth];
  cv.host = p;
  cv.shape.assign(v.shape.begin() + c.depth, v.shape.end());
  cv.shape[0] = c.end - c.begin;
  cv.host_strides.assign(v.strides.begin() + c.depth, v.strides.end());
  cv.dense_strides = c_strides(cv.shape, v.itemsize);
  return cv;
}

// One chunk's host copy. `parallel`: split it across the thread pool (when a single
// copy thread runs); several copy threads each copy their own chunk on their own core.
void host_copy(char* dst, const Dims& ds, const char* src, const Dims& ss, const Dims& shape,
               int64_t itemsize, int swap_unit, bool parallel = true) {
  CopyOptions opt;
  opt.swap_unit = swap_unit;
  if (!parallel) opt.min_parallel_bytes = INT64_MAX;
  if (!strided_copy({dst, ds.data()}, {const_cast<char*>(src), ss.data()}, shape.data(),
                    static_cast<int>(shape.size()), itemsize, opt))
    throw std::invalid_argument("transfer: unsupported itemsize or byte-swap unit");
}

// Host to device, one chunk: waits until block b's previous DMA has read it, copies chunk
// c of `v` into it densely, queues the DMA to `device_dst` and records b's event.
void stage_to_device(TransferEngine& engine, PinnedBlock& b, const HostView& v, const Chunk& c,
                     char* device_dst, StreamHandle stream, int swap_unit, bool parallel = true) {
  b.event.wait();
  const ChunkViews cv = chunk_views(v, c);
  host_copy(b.data(), cv.dense_strides, cv.host, cv.host_strides, cv.shape, v.itemsize, swap_unit,
            parallel);
  engine.copy_to_device_async(device_dst, b.data(), c.bytes, stream);
  b.event.record(stream);  // (a failure here is settled by the caller)
}

// Leases staging blocks and always returns them to the pool: a failed transfer never
// leaves a block marked in use. After an engine error, settle() decides how.
class Leases {
 public:
  explicit Leases(PinnedPool& pool) : pool_(pool) {}
  ~Leases() {
    for (BlockPtr& b : blocks_) {
      if (broken_)
        pool_.discard(std::move(b));
      else
        pool_.release(std::move(b));
    }
  }
  // An engine call threw, possibly between queuing a copy and recording its event:
  // wait for the stream so every block is idle, or, if even that fails, discard them.
  void settle(TransferEngine& engine, StreamHandle stream) noexcept {
    try {
      engine.synchronize_stream(stream);
      for (BlockPtr& b : blocks_) b->event.mark_done();
    } catch (...) {
      broken_ = true;
    }
  }
  bool acquire(int count, size_t bytes) {
    return acquire_up_to(static_cast<size_t>(std::max(count, 0)), bytes) ==
           static_cast<size_t>(std::max(count, 0));
  }
  // Leases up to `count` blocks (stopping at the first the pool refuses); returns how many.
  size_t acquire_up_to(size_t count, size_t bytes) {
    while (blocks_.size() < count) {
      BlockPtr b = pool_.acquire(bytes);
      if (!b) break;
      blocks_.push_back(std::move(b));
    }
    return blocks_.size();
  }
  // Gives every block back now (none was used yet): for a transfer that goes pageable.
  void release_now() noexcept {
    for (BlockPtr& b : blocks_) pool_.release(std::move(b));
    blocks_.clear();
  }
  PinnedBlock& operator[](size_t i) { return *blocks_[i % blocks_.size()]; }
  PinnedBlock& at(size_t i) { return *blocks_.at(i); }

 private:
  PinnedPool& pool_;
  std::vector<BlockPtr> blocks_;
  bool broken_ = false;
};

size_t largest_chunk(const std::vector<Chunk>& chunks) {
  size_t m = 0;
  for (const Chunk& c : chunks) m = std::max(m, c.bytes);
  return m;
}

// True when the view is dense in C order (so one memcpy copies it).
bool is_dense(const HostView& v) {
  int64_t step = v.itemsize;
  for (size_t d = v.shape.size(); d-- > 0;) {
    if (v.shape[d] != 1 && v.strides[d] != step) return false;
    step *= v.shape[d];
  }
  return true;
}

// The pool had no block: let the engine stage pageable memory itself, through a
// dense temporary when the user's array is not dense or needs a byte swap.
struct Pageable {
  std::unique_ptr<char, decltype(&std::free)> tmp{nullptr, &std::free};
  char* dense = nullptr;
  Pageable(const HostView& v, size_t total, int swap_unit) {
    if (is_dense(v) && swap_unit == 0) {
      dense = v.data;
    } else {
      tmp.reset(static_cast<char*>(std::malloc(std::max<size_t>(total, 1))));
      if (!tmp) throw std::bad_alloc();
      dense = tmp.get();
    }
  }
};

// Queues one copy (by `queue`) on `stream` and waits for it: the pageable fallback.
template <class Queue>
void copy_and_wait(TransferEngine& engine, StreamHandle stream, Queue&& queue) {
  Event done(engine);
  try {
    queue();
    done.record(stream);
    done.wait();
  } catch (...) {
    // The copy may have been queued: let it finish before the caller frees its memory.
    try {
      engine.synchronize_stream(stream);
    } catch (...) {
    }
    throw;
  }
}

Dims dense_strides(const HostView& v) { return c_strides(v.shape, v.itemsize); }

}  // namespace

std::vector<Chunk> plan_chunks(const Dims& shape, int64_t itemsize, size_t chunk_bytes) {
  if (itemsize <= 0) throw std::invalid_argument("transfer: elements of zero bytes");
  // (as an int64 below: a larger chunk would turn negative)
  chunk_bytes = std::min<size_t>(chunk_bytes, static_cast<size_t>(INT64_MAX));
  std::vector<Chunk> out;
  for (int64_t n : shape)
    if (n == 0) return out;
  if (shape.empty()) {  // a 0-d array: one element
    Chunk c;
    c.bytes = static_cast<size_t>(itemsize);
    c.end = 1;
    out.push_back(c);
    return out;
  }
  std::vector<int64_t> prefix;
  size_t offset = 0;
  plan(shape, itemsize, std::max<size_t>(chunk_bytes, 1), 0, prefix, offset, out);
  return out;
}

namespace {
// A 0-d view as a 1-element 1-d view, so chunk_views() has a dimension to restrict.
HostView at_least_1d(const HostView& v) {
  if (!v.shape.empty()) return v;
  HostView w = v;
  w.shape = {1};
  w.strides = {v.itemsize};
  return w;
}
}  // namespace

namespace {
// One transfer's chunks and the staging blocks it rotates through.
struct TransferPlan {
  HostView view;  // at least 1-d
  std::vector<Chunk> chunks;
  size_t block_bytes = 0;
  size_t total = 0;
};

TransferPlan plan_transfer(const HostView& v, const PipelineOptions& options) {
  TransferPlan p;
  p.view = at_least_1d(v);
  p.chunks = plan_chunks(p.view.shape, p.view.itemsize, options.chunk_bytes);
  if (p.chunks.empty()) return p;
  p.block_bytes = largest_chunk(p.chunks);
  p.total = p.chunks.back().offset + p.chunks.back().bytes;
  return p;
}
}  // namespace

namespace {
// Which copy thread moves which chunk through which staging block. Chunk i belongs to
// worker i % workers, as that worker's (i / workers)-th chunk; a worker cycles through
// its own blocks, so a block is only ever waited on, filled and queued by one thread.
class WorkerPlan {
 public:
  WorkerPlan(size_t chunks, int buffers, int threads) : chunks_(chunks) {
    const size_t by_buffers = static_cast<size_t>(std::max(1, buffers / 2));
    workers_ = std::max<size_t>(1, std::min({static_cast<size_t>(threads), by_buffers, chunks}));
    per_worker_ = std::max<size_t>(2, static_cast<size_t>(std::max(2, buffers)) / workers_);
    first_block_.resize(workers_ + 1, 0);
    for (size_t w = 0; w < workers_; ++w)
      first_block_[w + 1] = first_block_[w] + std::min(per_worker_, count(w));
  }
  size_t workers() const { return workers_; }
  size_t chunks() const { return chunks_; }
  size_t blocks() const { return first_block_.back(); }
  /// Chunks of worker w, and the index of its j-th one.
  size_t count(size_t w) const { return (chunks_ - w + workers_ - 1) / workers_; }
  size_t chunk(size_t w, size_t j) const { return w + j * workers_; }
  /// The staging block of worker w's j-th chunk, and how many chunks ahead it comes back.
  size_t block(size_t w, size_t j) const {
    return first_block_[w] + j % (first_block_[w + 1] - first_block_[w]);
  }
  size_t cycle(size_t w) const { return first_block_[w + 1] - first_block_[w]; }

 private:
  size_t chunks_;
  size_t workers_ = 1, per_worker_ = 2;
  std::vector<size_t> first_block_;
};

int copy_threads(const PipelineOptions& options) {
  return options.threads > 0 ? options.threads : get_num_threads();
}

// Leases the plan's blocks. When the pool (its budget) has fewer, the plan shrinks to the
// blocks it got (fewer copy threads); with fewer than it needs at the least, the blocks go
// back at once and the caller takes the pageable path (false).
bool lease(Leases& blocks, WorkerPlan& work, size_t block_bytes, int threads) {
  const size_t got = blocks.acquire_up_to(work.blocks(), block_bytes);
  if (got == work.blocks()) return true;
  if (got >= 2) {
    work = WorkerPlan(work.chunks(), static_cast<int>(got), threads);
    return true;
  }
  blocks.release_now();
  return false;
}

// Runs worker(w) for every worker on the thread pool (the caller is one of them), each
// on a thread the engine has entered (the CUDA engine makes its device current there).
// The first exception is kept and raised here once every worker has stopped; the others
// see failed() and stop at their next chunk.
class Workers {
 public:
  explicit Workers(TransferEngine& engine) : engine_(engine) {}
  template <class Fn>
  void run(size_t n, Fn&& worker) {
    if (n == 1) {
      worker(size_t{0});  // (the calling thread: the engine's caller entered it)
      return;
    }
    parallel_for(static_cast<int64_t>(n), [&](int64_t w) {
      try {
        engine_.enter_thread();
        worker(static_cast<size_t>(w));
      } catch (...) {
        std::lock_guard<std::mutex> lock(m_);
        if (!error_) error_ = std::current_exception();
        failed_.store(true, std::memory_order_relaxed);
      }
    });
    if (error_) std::rethrow_exception(error_);
  }
  bool failed() const { return failed_.load(std::memory_order_relaxed); }

 private:
  TransferEngine& engine_;
  std::mutex m_;
  std::exception_ptr error_;
  std::atomic<bool> failed_{false};
};
}  // namespace

PipelineReport copy_to_host(TransferEngine& engine, PinnedPool& pool, StreamHandle stream,
                            const void* device_src, const HostView& view,
                            const PipelineOptions& options) {
  const TransferPlan plan = plan_transfer(view, options);
  const HostView& dst = plan.view;
  const auto& chunks = plan.chunks;
  PipelineReport report;
  report.chunks = chunks.size();
  if (chunks.empty()) return report;
  const char* src = static_cast<const char*>(device_src);

  WorkerPlan work(chunks.size(), options.buffers, copy_threads(options));
  Leases blocks(pool);
  if (!lease(blocks, work, plan.block_bytes, copy_threads(options))) {
    report.staged = false;
    const size_t total = plan.total;
    Pageable pg(dst, total, options.swap_unit);
    copy_and_wait(engine, stream, [&] { engine.copy_to_host_async(pg.dense, src, total, stream); });
    if (pg.dense != dst.data)
      host_copy(dst.data, dst.strides, pg.dense, dense_strides(dst), dst.shape, dst.itemsize,
                options.swap_unit);
    return report;
  }
  report.threads = work.workers();

  // Each copy thread queues the DMAs of its first chunks into its blocks, then empties
  // each block into `dst` as soon as its DMA is done and refills it with the DMA of its
  // next chunk: no thread waits for another's chunk.
  const bool alone = work.workers() == 1;
  Workers workers(engine);
  auto queue = [&](size_t w, size_t j) {
    const Chunk& c = chunks[work.chunk(w, j)];
    PinnedBlock& b = blocks.at(work.block(w, j));
    engine.copy_to_host_async(b.data(), src + c.offset, c.bytes, stream);
    b.event.record(stream);  // (a failure here is settled below)
  };
  try {
    workers.run(work.workers(), [&](size_t w) {
      const size_t n = work.count(w), ahead = work.cycle(w);
      for (size_t j = 0; j < ahead; ++j) queue(w, j);
      for (size_t j = 0; j < n && !workers.failed(); ++j) {
        PinnedBlock& b = blocks.at(work.block(w, j));
        b.event.wait();
        const ChunkViews cv = chunk_views(dst, chunks[work.chunk(w, j)]);
        host_copy(cv.host, cv.host_strides, b.data(), cv.dense_strides, cv.shape, dst.itemsize,
                  options.swap_unit, alone);
        if (j + ahead < n) queue(w, j + ahead);
      }
    });
  } catch (...) {
    blocks.settle(engine, stream);
    throw;
  }
  return report;
}

PipelineReport copy_to_device(TransferEngine& engine, PinnedPool& pool, StreamHandle stream,
                              const HostView& view, void* device_dst,
                              const PipelineOptions& options) {
  const TransferPlan plan = plan_transfer(view, options);
  const HostView& src = plan.view;
  const auto& chunks = plan.chunks;
  PipelineReport report;
  report.chunks = chunks.size();
  if (chunks.empty()) return report;
  char* dst = static_cast<char*>(device_dst);

  WorkerPlan work(chunks.size(), options.buffers, copy_threads(options));
  Leases blocks(pool);
  if (!lease(blocks, work, plan.block_bytes, copy_threads(options))) {
    report.staged = false;
    const size_t total = plan.total;
    Pageable pg(src, total, options.swap_unit);
    if (pg.dense != src.data)
      host_copy(pg.dense, dense_strides(src), src.data, src.strides, src.shape, src.itemsize,
                options.swap_unit);
    // (the temporary, or the user's array, is read until the copy completes)
    copy_and_wait(engine, stream,
                  [&] { engine.copy_to_device_async(dst, pg.dense, total, stream); });
    return report;
  }
  report.threads = work.workers();

  // Each copy thread fills its blocks in turn, each as soon as the DMA that last read it
  // is done, and queues the block's DMA itself.
  const bool alone = work.workers() == 1;
  Workers workers(engine);
  try {
    workers.run(work.workers(), [&](size_t w) {
      for (size_t j = 0, n = work.count(w); j < n && !workers.failed(); ++j) {
        const Chunk& c = chunks[work.chunk(w, j)];
        stage_to_device(engine, blocks.at(work.block(w, j)), src, c, dst + c.offset, stream,
                        options.swap_unit, alone);
      }
    });
    if (options.wait)
      for (size_t i = 0; i < work.blocks(); ++i) blocks.at(i).event.wait();
  } catch (...) {
    blocks.settle(engine, stream);
    throw;
  }
  return report;
}

namespace {
// A staging block's worth of a many-array copy: arrays [first, end) whole, or (split) one
// chunk of array `first`, which is larger than a block. It fills the dense byte range
// [start, start + bytes) of the destination.
struct Piece {
  size_t first = 0, end = 0;
  size_t start = 0, bytes = 0;
  bool split = false;
  Chunk chunk;
};

// The element bytes of each array, checking that the offsets leave room for them.
std::vector<size_t> packed_sizes(const std::vector<HostView>& srcs,
                                 const std::vector<size_t>& offsets) {
  if (srcs.size() != offsets.size())
    throw std::invalid_argument("transfer: one offset per array is needed");
  std::vector<size_t> sizes(srcs.size());
  for (size_t i = 0; i < srcs.size(); ++i) {
    const size_t n = sizes[i] = view_bytes(srcs[i]);
    if (offsets[i] > SIZE_MAX - n)
      throw std::invalid_argument("transfer: an offset is out of range");
    if (i && offsets[i] < offsets[i - 1] + sizes[i - 1])
      throw std::invalid_argument("transfer: offsets must not decrease or overlap");
  }
  return sizes;
}

// Consecutive arrays gathered into pieces of at most block_bytes (gaps between their
// offsets included); an array larger than that is split into chunks of its own.
std::vector<Piece> plan_pieces(const std::vector<HostView>& srcs,
                               const std::vector<size_t>& offsets, const std::vector<size_t>& sizes,
                               size_t block_bytes) {
  std::vector<Piece> out;
  Piece cur;
  bool open = false;
  auto close = [&] {
    if (open) out.push_back(cur);
    open = false;
  };
  for (size_t i = 0; i < srcs.size(); ++i) {
    if (sizes[i] == 0) continue;
    if (sizes[i] > block_bytes) {
      close();
      const HostView v = at_least_1d(srcs[i]);
      for (const Chunk& c : plan_chunks(v.shape, v.itemsize, block_bytes)) {
        Piece p;
        p.first = i;
        p.end = i + 1;
        p.split = true;
        p.chunk = c;
        p.start = offsets[i] + c.offset;
        p.bytes = c.bytes;
        out.push_back(std::move(p));
      }
      continue;
    }
    if (open && offsets[i] + sizes[i] - cur.start > block_bytes) close();
    if (!open) {
      cur = Piece();
      cur.first = i;
      cur.start = offsets[i];
      open = true;
    }
    cur.end = i + 1;
    cur.bytes = offsets[i] + sizes[i] - cur.start;
  }
  close();
  return out;
}

// Writes a piece's arrays densely at `dst` (the piece's first byte).
void fill_piece(char* dst, const Piece& p, const std::vector<HostView>& srcs,
                const std::vector<size_t>& offsets, const std::vector<size_t>& sizes,
                bool parallel) {
  if (p.split) {
    const HostView v = at_least_1d(srcs[p.first]);
    const ChunkViews cv = chunk_views(v, p.chunk);
    host_copy(dst, cv.dense_strides, cv.host, cv.host_strides, cv.shape, v.itemsize, v.swap_unit,
              parallel);
    return;
  }
  for (size_t i = p.first; i < p.end; ++i) {
    const HostView& v = srcs[i];
    char* to = dst + (offsets[i] - p.start);
    if (sizes[i] == 0) continue;
    if (v.swap_unit == 0 && is_dense(v)) {
      copy_bytes(to, v.data, sizes[i]);
    } else {
      const HostView w = at_least_1d(v);
      host_copy(to, dense_strides(w), w.data, w.strides, w.shape, w.itemsize, w.swap_unit,
                parallel);
    }
  }
}

// Below this many bytes a host-to-host pack runs on the calling thread alone: waking the
// pool's threads costs more than they save.
constexpr size_t kParallelPackBytes = size_t{1} << 20;
// Without staging, a batch whose arrays average fewer bytes than this, and that takes at
// most kPackPageableMax, is packed on the host and sent in one pageable copy rather than
// one copy per array (beyond that, the temporary copy would cost more memory than it saves).
constexpr size_t kPackPageableBelow = size_t{1} << 20;
constexpr size_t kPackPageableMax = size_t{64} << 20;
}  // namespace

PipelineReport copy_many_to_device(TransferEngine& engine, PinnedPool& pool, StreamHandle stream,
                                   const std::vector<HostView>& srcs,
                                   const std::vector<size_t>& offsets, void* device_base,
                                   const PipelineOptions& options) {
  const std::vector<size_t> sizes = packed_sizes(srcs, offsets);
  char* base = static_cast<char*>(device_base);
  // (a block holds at least one element of every array: chunks never split an element)
  size_t block_bytes = std::max<size_t>(options.chunk_bytes, 4096);
  for (const HostView& v : srcs)
    block_bytes = std::max(block_bytes, static_cast<size_t>(v.itemsize));
  const std::vector<Piece> pieces = plan_pieces(srcs, offsets, sizes, block_bytes);
  PipelineReport report;
  report.chunks = pieces.size();
  if (pieces.empty()) return report;
  size_t largest = 0;  // (a batch smaller than a block leases only what it fills)
  for (const Piece& p : pieces) largest = std::max(largest, p.bytes);

  WorkerPlan work(pieces.size(), options.buffers, copy_threads(options));
  Leases blocks(pool);
  if (!lease(blocks, work, largest, copy_threads(options))) {
    report.staged = false;
    // No staging (a budget of 0, or every block in use): pageable copies, each one
    // waited for. Small arrays are packed on the host first and cross in one copy, not
    // one each; large ones go as they are (packing would add a pass over their bytes).
    size_t start = SIZE_MAX, end = 0, count = 0;
    for (size_t i = 0; i < srcs.size(); ++i) {
      if (!sizes[i]) continue;
      start = std::min(start, offsets[i]);
      end = std::max(end, offsets[i] + sizes[i]);
      ++count;
    }
    if (count > 1 && (end - start) / count < kPackPageableBelow && end <= kPackPageableMax) {
      // (zeroed: the padding between the arrays crosses too, and must carry nothing)
      std::unique_ptr<char, decltype(&std::free)> packed(static_cast<char*>(std::calloc(end, 1)),
                                                         &std::free);
      if (!packed) throw std::bad_alloc();
      pack_to_host(srcs, offsets, packed.get());
      copy_and_wait(engine, stream, [&] {
        engine.copy_to_device_async(base + start, packed.get() + start, end - start, stream);
      });
      report.chunks = 1;
      return report;
    }
    report.chunks = 0;
    for (size_t i = 0; i < srcs.size(); ++i) {
      if (!sizes[i]) continue;
      PipelineOptions one = options;
      one.swap_unit = srcs[i].swap_unit;
      report.chunks += copy_to_device(engine, pool, stream, srcs[i], base + offsets[i], one).chunks;
    }
    if (options.wait) engine.synchronize_stream(stream);
    return report;
  }
  report.threads = work.workers();

  // As in copy_to_device: each copy thread fills its own blocks, each as soon as the DMA
  // that last read it is done, and queues the block's DMA itself.
  const bool alone = work.workers() == 1;
  Workers workers(engine);
  try {
    workers.run(work.workers(), [&](size_t w) {
      for (size_t j = 0, n = work.count(w); j < n && !workers.failed(); ++j) {
        const Piece& p = pieces[work.chunk(w, j)];
        PinnedBlock& b = blocks.at(work.block(w, j));
        b.event.wait();  // its previous DMA has read it
        fill_piece(b.data(), p, srcs, offsets, sizes, alone);
        engine.copy_to_device_async(base + p.start, b.data(), p.bytes, stream);
        b.event.record(stream);  // (a failure here is settled below)
      }
    });
    if (options.wait)
      for (size_t i = 0; i < work.blocks(); ++i) blocks.at(i).event.wait();
  } catch (...) {
    blocks.settle(engine, stream);
    throw;
  }
  return report;
}

void pack_to_host(const std::vector<HostView>& srcs, const std::vector<size_t>& offsets,
                  char* dst) {
  const std::vector<size_t> sizes = packed_sizes(srcs, offsets);
  size_t total = 0;
  for (size_t i = 0; i < srcs.size(); ++i)
    if (sizes[i]) total = offsets[i] + sizes[i];
  const size_t n_threads = static_cast<size_t>(get_num_threads());
  if (total < kParallelPackBytes || n_threads == 1) {
    for (const Piece& p : plan_pieces(srcs, offsets, sizes, SIZE_MAX))
      fill_piece(dst + p.start, p, srcs, offsets, sizes, true);
    return;
  }
  // A few pieces per thread, so uneven arrays still spread over every thread.
  const size_t piece = std::max(kParallelPackBytes / 4, total / (n_threads * 4));
  const std::vector<Piece> pieces = plan_pieces(srcs, offsets, sizes, piece);
  std::mutex m;
  std::exception_ptr error;
  parallel_for(static_cast<int64_t>(pieces.size()), [&](int64_t k) {
    const Piece& p = pieces[static_cast<size_t>(k)];
    try {
      fill_piece(dst + p.start, p, srcs, offsets, sizes, false);
    } catch (...) {
      std::lock_guard<std::mutex> lock(m);
      if (!error) error = std::current_exception();
    }
  });
  if (error) std::rethrow_exception(error);
}

}  // namespace tb
