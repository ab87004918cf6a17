// A shape or a list of strides: up to kInline dimensions held in place, more on the heap.
//
// A packed batch describes thousands of small arrays, each by a shape and its strides;
// held in std::vectors, those were two heap allocations per array, about as much as the
// rest of the layout together. Nearly every array has few dimensions, so they fit here.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <utility>
#include <vector>

namespace tb {

class Dims {
 public:
  static constexpr size_t kInline = 6;

  Dims() = default;
  Dims(std::initializer_list<int64_t> values) { assign(values.begin(), values.end()); }
  template <class It>
  Dims(It first, It last) {
    assign(first, last);
  }
  explicit Dims(size_t n) { set_size(n); }
  Dims(const Dims&) = default;
  Dims& operator=(const Dims& o) {
    if (this == &o) return *this;
    heap_ = o.heap_;  // (first: if it throws, this is left as it was)
    inline_ = o.inline_;
    n_ = o.n_;
    return *this;
  }
  Dims(Dims&& o) noexcept : n_(o.n_), inline_(o.inline_), heap_(std::move(o.heap_)) { o.n_ = 0; }
  Dims& operator=(Dims&& o) noexcept {
    if (this == &o) return *this;
    n_ = o.n_;
    inline_ = o.inline_;
    heap_ = std::move(o.heap_);
    o.n_ = 0;
    return *this;
  }
  ~Dims() = default;

  template <class It>
  void assign(It first, It last) {
    set_size(static_cast<size_t>(last - first));
    int64_t* out = data();
    for (; first != last; ++first) *out++ = static_cast<int64_t>(*first);
  }
  /// n dimensions, whose values are unspecified until written (unlike std::vector's
  /// resize, none is kept).
  void set_size(size_t n) {
    if (n > kInline)
      heap_.resize(n);
    else
      heap_.clear();  // (so that a copy allocates nothing)
    n_ = n;
  }

  size_t size() const { return n_; }
  bool empty() const { return n_ == 0; }
  int64_t* data() { return n_ > kInline ? heap_.data() : inline_.data(); }
  const int64_t* data() const { return n_ > kInline ? heap_.data() : inline_.data(); }
  int64_t& operator[](size_t i) { return data()[i]; }
  int64_t operator[](size_t i) const { return data()[i]; }
  int64_t* begin() { return data(); }
  int64_t* end() { return data() + n_; }
  const int64_t* begin() const { return data(); }
  const int64_t* end() const { return data() + n_; }

  friend bool operator==(const Dims& a, const Dims& b) {
    if (a.n_ != b.n_) return false;
    for (size_t i = 0; i < a.n_; ++i)
      if (a[i] != b[i]) return false;
    return true;
  }
  friend bool operator!=(const Dims& a, const Dims& b) { return !(a == b); }

 private:
  size_t n_ = 0;
  std::array<int64_t, kInline> inline_{};
  std::vector<int64_t> heap_;  // (used from kInline + 1 dimensions on)
};

}  // namespace tb
