// The byte range a strided view touches: the one place that computes it.
#pragma once

#include <cstddef>
#include <cstdint>

namespace tb {

/// [begin, end) in bytes; empty for a view with no elements.
struct ByteSpan {
  uintptr_t begin = 0, end = 0;
  size_t size() const noexcept { return end - begin; }
  bool empty() const noexcept { return begin == end; }
  bool intersects(const ByteSpan& o) const noexcept { return begin < o.end && o.begin < end; }
};

/// The bytes touched by the view at `base` with `shape` and byte strides (negative and
/// zero strides included).
inline ByteSpan byte_span(uintptr_t base, const int64_t* shape, const int64_t* byte_strides,
                          int ndim, int64_t itemsize) noexcept {
  intptr_t lo = 0, hi = 0;
  for (int i = 0; i < ndim; ++i) {
    if (shape[i] == 0) return {base, base};
    const intptr_t step = static_cast<intptr_t>((shape[i] - 1) * byte_strides[i]);
    (step < 0 ? lo : hi) += step;
  }
  return {base + lo, base + hi + static_cast<uintptr_t>(itemsize)};
}

}  // namespace tb
