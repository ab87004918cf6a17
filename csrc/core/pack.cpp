#include "core/pack.h"

#include <algorithm>
#include <cstdint>
#include <map>
#include <stdexcept>
#include <utility>

namespace tb {
namespace {
// (kind, dims): a whole shape, or the dimensions after the first
struct Key {
  uint64_t kind;
  const int64_t* dims;
  size_t ndim;
};
struct KeyLess {
  bool operator()(const Key& a, const Key& b) const {
    if (a.kind != b.kind) return a.kind < b.kind;
    return std::lexicographical_compare(a.dims, a.dims + a.ndim, b.dims, b.dims + b.ndim);
  }
};
// Arrays sharing a key: how many (of those that may be ragged), and their group once made
struct Seen {
  size_t count = 0;
  size_t group = SIZE_MAX;
};

size_t add(size_t a, size_t b) {
  if (a > SIZE_MAX - b) throw std::invalid_argument("pack: the batch's size overflows");
  return a + b;
}
size_t round_up(size_t n, size_t align) { return add(n, align - 1) & ~(align - 1); }

// The rows of `row` bytes that realign what follows a member of `bytes` (a multiple of
// `row`) that starts on kMemberAlign bytes: fewer than kMemberAlign.
int64_t gap_after(size_t bytes, size_t row) {
  int64_t gap = 0;
  while ((bytes + static_cast<size_t>(gap) * row) % kMemberAlign) ++gap;
  return gap;
}

size_t elements_bytes(int64_t itemsize, const int64_t* dims, size_t ndim) {
  if (itemsize <= 0) throw std::invalid_argument("transfer: elements of zero bytes");
  size_t n = static_cast<size_t>(itemsize);
  for (size_t k = 0; k < ndim; ++k) {
    const int64_t d = dims[k];
    if (d < 0 || (d && n > SIZE_MAX / static_cast<size_t>(d)))
      throw std::invalid_argument("transfer: an array's size is out of range");
    n *= static_cast<size_t>(d);
  }
  return n;
}
}  // namespace

size_t view_bytes(const HostView& v) {
  return elements_bytes(v.itemsize, v.shape.data(), v.shape.size());
}

PackLayout plan_pack(const std::vector<HostView>& views, const std::vector<uint64_t>& kinds,
                     size_t align) {
  if (views.size() != kinds.size())
    throw std::invalid_argument("pack: one kind per array is needed");
  if (align < kMemberAlign || (align & (align - 1)))
    throw std::invalid_argument("pack: the alignment must be a power of two, 16 or more");
  const size_t n = views.size();
  // Arrays that may share a ragged group (core/pack.h), counted per (kind, shape after the
  // first dimension); each array's entry.
  std::vector<size_t> bytes(n);
  std::map<Key, Seen, KeyLess> by_rest, by_shape;
  std::vector<Seen*> rest_of(n, nullptr);
  for (size_t i = 0; i < n; ++i) {
    const auto& s = views[i].shape;
    bytes[i] = view_bytes(views[i]);
    if (s.empty() || bytes[i] == 0 || bytes[i] >= kRaggedBytes) continue;
    const size_t row = bytes[i] / static_cast<size_t>(s[0]);
    if (bytes[i] + static_cast<size_t>(gap_after(bytes[i], row)) * row <=
        round_up(bytes[i], align)) {
      rest_of[i] = &by_rest[Key{kinds[i], s.data() + 1, s.size() - 1}];
      ++rest_of[i]->count;
    }
  }
  PackLayout out;
  for (size_t i = 0; i < n; ++i) {
    const HostView& v = views[i];
    const bool ragged = rest_of[i] != nullptr && rest_of[i]->count >= kRagged;
    Seen& seen = ragged ? *rest_of[i] : by_shape[Key{kinds[i], v.shape.data(), v.shape.size()}];
    if (seen.group == SIZE_MAX) {  // groups come in order of first appearance
      seen.group = out.groups.size();
      PackGroup g;
      g.kind = kinds[i];
      g.ragged = ragged;
      g.shape.assign(v.shape.begin() + (ragged ? 1 : 0), v.shape.end());
      g.stride = ragged ? elements_bytes(v.itemsize, g.shape.data(), g.shape.size())
                        : round_up(bytes[i], align);
      out.groups.push_back(std::move(g));
    }
    out.groups[seen.group].members.push_back(i);
  }
  out.order.reserve(n);
  out.offsets.reserve(n);
  size_t end = 0;
  for (PackGroup& g : out.groups) {
    g.first = end;
    bool gaps = false;
    for (size_t k = 0; k < g.members.size(); ++k) {
      const size_t i = g.members[k];
      if (g.ragged) {
        // (the group starts aligned: this is the gap after the member before)
        const int64_t gap = gap_after(end - g.first, g.stride);
        if (gap) {
          g.pieces.push_back(gap);
          end += static_cast<size_t>(gap) * g.stride;
          gaps = true;
        }
        g.take.push_back(g.pieces.size());
        g.pieces.push_back(views[i].shape[0]);
      }
      out.order.push_back(i);
      out.offsets.push_back(end);
      end = add(end, g.ragged ? bytes[i] : g.stride);
    }
    if (!gaps) g.take.clear();
    end = round_up(end, align);
  }
  out.nbytes = end > align ? end : align;
  return out;
}

}  // namespace tb
