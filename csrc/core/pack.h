// Many small host arrays in one buffer: the layout of a packed batch. The copies that fill
// it are pipeline.h's pack_to_host (a host buffer) and copy_many_to_device (device memory).
//
// Arrays of one element kind and shape sit next to each other, each padded to `align`
// bytes, so the Python layer builds a whole group's views with one strided view (not one
// slice and two views per array): with thousands of small arrays, per-array work and not
// the copy is what a batch costs.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "core/pipeline.h"

namespace tb {

/// Arrays of one kind and shape, laid out at `first`, `first + stride`, ...
struct PackGroup {
  uint64_t kind = 0;  // opaque: equal kinds share a group (the bindings use the dtype)
  std::vector<int64_t> shape;
  size_t first = 0;             // byte offset of the group's first array
  size_t stride = 0;            // bytes from one array to the next (its size, padded)
  std::vector<size_t> members;  // indices into the caller's array list, in packed order
};

struct PackLayout {
  std::vector<PackGroup> groups;
  std::vector<size_t> order;    // caller's indices in packed order (groups concatenated)
  std::vector<size_t> offsets;  // byte offset of order[i], non-decreasing
  size_t nbytes = 0;            // the buffer's size: a multiple of `align`, at least `align`
};

/// Groups `views` by (kinds[i], shape) in order of first appearance and lays them out.
/// `align` must be a power of two. Throws std::invalid_argument on a size overflow.
PackLayout plan_pack(const std::vector<HostView>& views, const std::vector<uint64_t>& kinds,
                     size_t align);

/// Bytes of a view's elements (itemsize times the shape's product); throws
/// std::invalid_argument for elements of zero bytes or a size beyond size_t.
size_t view_bytes(const HostView& v);

}  // namespace tb
