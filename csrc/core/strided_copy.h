// Strided copies between any two layouts of the same shape, on the host.
//
// This is the work the Python idioms do badly: copies into a preallocated `out`
// of any layout, negative strides, byte swaps. Dimensions are reordered to follow
// the destination, contiguous runs collapsed into one, and the innermost loop is
// a tight typed loop (or memcpy); a transposed pair of dimensions is copied in
// tiles so neither side streams through the cache with a large stride.
#pragma once

#include <cstddef>
#include <cstdint>

namespace tb {

/// Largest number of dimensions accepted (NumPy's limit).
constexpr int kMaxDims = 64;

/// One side of a copy: a base pointer and byte strides (may be negative or zero).
struct StridedPtr {
  void* data;
  const int64_t* strides;
};

/// How to reverse byte order while copying; elements are swapped in units of
/// `swap_unit` bytes (0 = no swap; complex64 swaps two 4-byte halves: unit 4).
struct CopyOptions {
  int swap_unit = 0;
  // Copies smaller than this run on the calling thread alone (measured: below about
  // 256 KiB, handing work to another thread costs more than it saves).
  int64_t min_parallel_bytes = int64_t{1} << 18;
};

/// Copies n bytes between regions that do not overlap: memcpy, except where memcpy is
/// measured slow (see strided_copy.cpp).
void copy_bytes(void* dst, const void* src, size_t n);

/// Copies `shape` elements of `itemsize` bytes from src to dst. The two regions must
/// not overlap. Runs on the calling thread, plus the pool's threads for large copies.
/// Returns false (and copies nothing) if the arguments are invalid.
bool strided_copy(StridedPtr dst, StridedPtr src, const int64_t* shape, int ndim, int64_t itemsize,
                  const CopyOptions& options = {});

}  // namespace tb
