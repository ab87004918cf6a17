#include "core/pack.h"

#include <cstdint>
#include <map>
#include <stdexcept>
#include <utility>

namespace tb {
namespace {
using Key = std::pair<uint64_t, const std::vector<int64_t>*>;  // (kind, the shape of a view)
struct KeyLess {
  bool operator()(const Key& a, const Key& b) const {
    return a.first != b.first ? a.first < b.first : *a.second < *b.second;
  }
};
}  // namespace

size_t view_bytes(const HostView& v) {
  if (v.itemsize <= 0) throw std::invalid_argument("transfer: elements of zero bytes");
  size_t n = static_cast<size_t>(v.itemsize);
  for (int64_t d : v.shape) {
    if (d < 0 || (d && n > SIZE_MAX / static_cast<size_t>(d)))
      throw std::invalid_argument("transfer: an array's size is out of range");
    n *= static_cast<size_t>(d);
  }
  return n;
}

PackLayout plan_pack(const std::vector<HostView>& views, const std::vector<uint64_t>& kinds,
                     size_t align) {
  if (views.size() != kinds.size())
    throw std::invalid_argument("pack: one kind per array is needed");
  if (align == 0 || (align & (align - 1)))
    throw std::invalid_argument("pack: the alignment must be a power of two");
  PackLayout out;
  // (kind, shape) -> group index; groups come in order of first appearance
  std::map<Key, size_t, KeyLess> index;
  for (size_t i = 0; i < views.size(); ++i) {
    auto [it, added] = index.emplace(std::make_pair(kinds[i], &views[i].shape), out.groups.size());
    if (added) {
      PackGroup g;
      g.kind = kinds[i];
      g.shape = views[i].shape;
      const size_t n = view_bytes(views[i]);
      if (n > SIZE_MAX - align) throw std::invalid_argument("pack: an array's size overflows");
      g.stride = (n + align - 1) & ~(align - 1);
      out.groups.push_back(std::move(g));
    }
    out.groups[it->second].members.push_back(i);
  }
  out.order.reserve(views.size());
  out.offsets.reserve(views.size());
  size_t end = 0;
  for (PackGroup& g : out.groups) {
    g.first = end;
    for (size_t i : g.members) {
      out.order.push_back(i);
      out.offsets.push_back(end);
      if (end > SIZE_MAX - g.stride)
        throw std::invalid_argument("pack: the batch's size overflows");
      end += g.stride;
    }
  }
  out.nbytes = end > align ? end : align;
  return out;
}

}  // namespace tb
