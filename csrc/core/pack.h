// Many small host arrays in one buffer: the layout of a packed batch. The copies that fill
// it are pipeline.h's pack_to_host (a host buffer) and copy_many_to_device (device memory).
//
// Arrays of one element kind and shape sit next to each other, each padded to `align`
// bytes, so the Python layer builds a whole group's views with one strided view and one
// unbind (not one slice and two views per array): with thousands of small arrays,
// per-array work and not the copy is what a batch costs. Small arrays (under
// kRaggedBytes) are grouped by their shape after the first dimension instead, so that
// arrays of every length (token ids, boxes) share a group too: back to back, each on 16
// bytes rather than 256, their views come from one view and one split.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "core/pipeline.h"

namespace tb {

/// Arrays of one kind laid out from `first`. Uniform groups: arrays of one shape at
/// `first`, `first + stride`, ... Ragged groups: arrays whose shapes differ only in the
/// first dimension, back to back, each starting on kMemberAlign bytes: rows of `stride`
/// bytes, split into `pieces` (each member's rows, after a gap of a few rows where one is
/// needed to align it).
struct PackGroup {
  uint64_t kind = 0;  // opaque: equal kinds share a group (the bindings use the dtype)
  bool ragged = false;
  std::vector<int64_t> shape;   // uniform: the arrays' shape; ragged: the dims after the first
  size_t first = 0;             // byte offset of the group's first array (a multiple of align)
  size_t stride = 0;            // uniform: bytes per array, padded; ragged: bytes per row
  std::vector<size_t> members;  // indices into the caller's array list, in packed order
  std::vector<int64_t> pieces;  // ragged: the rows of each piece, gaps included
  std::vector<size_t> take;     // ragged: which pieces are the members; empty: all of them
};

/// Arrays of at least one dimension and 1 to kRaggedBytes - 1 bytes go to the ragged
/// group of their kind and shape after the first dimension, when at least kRagged such
/// arrays share it (fewer take a uniform group: a view each is cheaper than a split) and
/// the array with the gap that realigns what follows it takes no more bytes than it would
/// padded to `align` (so a ragged group is never larger than uniform ones). Larger
/// arrays, whose per-array cost the copy hides, keep uniform groups: each starts on
/// `align`.
constexpr size_t kRagged = 3;
constexpr size_t kRaggedBytes = size_t{64} << 10;
/// Where a ragged group's members start: enough for a view as any dtype (complex128 is
/// 16 bytes) and for 16-byte vector loads.
constexpr size_t kMemberAlign = 16;

struct PackLayout {
  std::vector<PackGroup> groups;
  std::vector<size_t> order;    // caller's indices in packed order (groups concatenated)
  std::vector<size_t> offsets;  // byte offset of order[i], non-decreasing
  size_t nbytes = 0;            // the buffer's size: a multiple of `align`, at least `align`
};

/// Groups `views` (uniform or ragged, as PackGroup says) in order of first appearance and
/// lays them out.
/// `align` must be a power of two, at least kMemberAlign. Throws std::invalid_argument
/// on a size overflow.
PackLayout plan_pack(const std::vector<HostView>& views, const std::vector<uint64_t>& kinds,
                     size_t align);

/// Bytes of a view's elements (itemsize times the shape's product); throws
/// std::invalid_argument for elements of zero bytes or a size beyond size_t.
size_t view_bytes(const HostView& v);

}  // namespace tb
