// Chunked transfers between a strided host array and dense device memory, staged
// through the pinned pool by several copy threads at once.
//
// The chunks are dealt round-robin to copy threads (the caller and the thread pool's
// workers), each with its own staging blocks (at least two). Device to host: a thread
// queues the DMAs of its first chunks, then empties each block into the user's array
// (any layout, byte-swapped if asked) as soon as its DMA is done and refills it with
// the DMA of its next chunk. Host to device: a thread fills each of its blocks as soon
// as the DMA that last read it is done, and queues the block's DMA itself. No thread
// waits for another's chunk, so the host copies run in parallel with each other and
// with the DMAs. A block is rewritten only after the event recorded after its last copy
// completed. Chunks follow the leading dimensions, so each one is a sub-array (a range
// of the first dimension that is split, the rest whole) and contiguous on the device.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "core/dims.h"
#include "core/pinned_pool.h"
#include "core/transfer_engine.h"

namespace tb {

/// A host array: data, shape and byte strides (any layout, negative strides too).
struct HostView {
  char* data = nullptr;
  Dims shape;
  Dims strides;
  int64_t itemsize = 1;
  // Byte-swap unit of this array's elements (0: none). Read by the many-array copies
  // (pack_to_host, copy_many_to_device), where each array has its own dtype; the
  // single-array transfers take PipelineOptions::swap_unit.
  int swap_unit = 0;
};

struct PipelineOptions {
  size_t chunk_bytes = size_t{4} << 20;
  // Staging blocks in flight, at least two per copy thread: buffers / 2 bounds the
  // number of copy threads (so does the chunk count), and each thread gets an equal share.
  int buffers = 2;
  int threads = 0;    // copy threads at most (0: get_num_threads())
  int swap_unit = 0;  // byte-swap units while copying on the host (0: none)
  bool wait = false;  // copy_to_device: return only once the data is on the device
};

struct PipelineReport {
  size_t chunks = 0;
  size_t threads = 1;  // copy jobs the transfer was dealt to (they share the pool's threads)
  bool staged = true;  // false: the pool had no block, the pageable path was taken
};

/// One chunk: the sub-array with dimension `depth` restricted to [begin, end) and the
/// dimensions before it fixed at `prefix`; `offset` and `bytes` locate it in the dense
/// (C-order) device buffer.
struct Chunk {
  int depth = 0;
  std::vector<int64_t> prefix;
  int64_t begin = 0, end = 0;
  size_t offset = 0, bytes = 0;
};

/// Splits a dense array of `shape` into chunks of at most chunk_bytes (at least one
/// element each), in device order.
std::vector<Chunk> plan_chunks(const Dims& shape, int64_t itemsize, size_t chunk_bytes);

/// Device (dense, C order) -> host view. Returns once every byte is in `dst`.
PipelineReport copy_to_host(TransferEngine& engine, PinnedPool& pool, StreamHandle stream,
                            const void* device_src, const HostView& dst,
                            const PipelineOptions& options);

/// Host view -> device (dense, C order). Returns once the last chunk is queued on
/// `stream` (or, with options.wait, once it has arrived): from then on `src` is no longer
/// read (the staging blocks are the pool's).
PipelineReport copy_to_device(TransferEngine& engine, PinnedPool& pool, StreamHandle stream,
                              const HostView& src, void* device_dst,
                              const PipelineOptions& options);

/// Many host arrays -> one device buffer: array i lands (dense, C order, byte-swapped by
/// its own swap_unit) at device_base + offsets[i]. Consecutive arrays are packed into
/// staging blocks of options.chunk_bytes, each sent in one copy (gaps between offsets go
/// along); an array larger than a block is split into chunks of its own. The blocks are
/// filled by several copy threads at once, as in copy_to_device. Offsets must not
/// decrease nor arrays overlap. Returns once everything is queued (with options.wait:
/// once it has arrived); from then on no source is read.
PipelineReport copy_many_to_device(TransferEngine& engine, PinnedPool& pool, StreamHandle stream,
                                   const std::vector<HostView>& srcs,
                                   const std::vector<size_t>& offsets, void* device_base,
                                   const PipelineOptions& options);

/// Many host arrays -> one host buffer: array i is copied (dense, C order, byte-swapped by
/// its own swap_unit) to dst + offsets[i], on the thread pool's threads from 1 MiB in all.
/// Offsets must not decrease nor arrays overlap; bytes between the arrays are left as
/// they were.
void pack_to_host(const std::vector<HostView>& srcs, const std::vector<size_t>& offsets, char* dst);

}  // namespace tb
