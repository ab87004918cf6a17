// Argument conversions shared by the two pybind11 modules (_C and _C_testing).
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "core/byte_span.h"
#include "core/event.h"
#include "core/pack.h"
#include "core/pinned_pool.h"
#include "core/pipeline.h"

namespace tb::py_util {

namespace py = pybind11;

/// Releases the GIL for its scope, as py::gil_scoped_release does, with a destructor
/// that lets a thread's end pass: at interpreter exit, retaking the GIL ends a daemon
/// thread (pthread_exit unwinds the stack), and a noexcept destructor in that unwind,
/// as py::gil_scoped_release's is, calls std::terminate and aborts the process.
class ReleaseGil {
 public:
  ReleaseGil() : state_(PyEval_SaveThread()) {}
  ~ReleaseGil() noexcept(false) { PyEval_RestoreThread(state_); }
  ReleaseGil(const ReleaseGil&) = delete;
  ReleaseGil& operator=(const ReleaseGil&) = delete;

 private:
  PyThreadState* state_;
};

inline std::vector<int64_t> shape_of(const py::array& a) {
  return std::vector<int64_t>(a.shape(), a.shape() + a.ndim());
}
inline std::vector<int64_t> strides_of(const py::array& a) {
  return std::vector<int64_t>(a.strides(), a.strides() + a.ndim());
}

static_assert(sizeof(py::ssize_t) == sizeof(int64_t), "shapes are read as int64_t");

/// The bytes an array's elements span.
inline ByteSpan byte_span(const py::array& a) {
  return tb::byte_span(
      reinterpret_cast<uintptr_t>(a.data()), reinterpret_cast<const int64_t*>(a.shape()),
      reinterpret_cast<const int64_t*>(a.strides()), static_cast<int>(a.ndim()), a.itemsize());
}

/// Refuses what no transfer can move as raw bytes: elements holding Python references
/// (moving them as bytes would free objects still in use, or forge pointers) and elements
/// of zero bytes. The Python layer refuses these first; this guards the core itself.
inline void check_movable(const py::array& a) {
  if (a.dtype().attr("hasobject").cast<bool>())
    throw py::type_error(
        "transfer: arrays holding Python references cannot be moved as bytes; convert them "
        "to a numeric dtype first");
  if (a.itemsize() <= 0)
    throw py::value_error("transfer: elements of zero bytes (dtype=[]) cannot be moved");
}

/// The arrays of a Python list, refusing anything else (a list of numbers would become a
/// temporary array whose memory is gone before the copy reads it).
inline std::vector<py::array> array_list(const py::list& items) {
  std::vector<py::array> out;
  for (auto item : items) {
    if (!py::isinstance<py::array>(item))
      throw py::type_error("transfer: every source must be a numpy.ndarray");
    out.push_back(py::reinterpret_borrow<py::array>(item));
  }
  return out;
}

// An array's memory, shape, byte strides and item size, unchecked (swap_unit left 0).
inline HostView view_of(const py::array& a) {
  HostView v;
  v.data = static_cast<char*>(const_cast<void*>(a.data()));
  v.shape.assign(a.shape(), a.shape() + a.ndim());
  v.strides.assign(a.strides(), a.strides() + a.ndim());
  v.itemsize = a.itemsize();
  return v;
}

inline HostView host_view(const py::array& a, bool writeable) {
  if (writeable && !a.writeable()) throw py::value_error("transfer: the host array is read-only");
  check_movable(a);
  return view_of(a);
}

inline PipelineOptions pipeline_options(size_t chunk_bytes, int buffers, int swap_unit) {
  PipelineOptions o;
  if (chunk_bytes) o.chunk_bytes = chunk_bytes;
  if (buffers) o.buffers = buffers;
  o.swap_unit = swap_unit;
  return o;
}

inline py::dict report_dict(const PipelineReport& r) {
  py::dict d;
  d["chunks"] = r.chunks;
  d["staged"] = r.staged;
  d["threads"] = r.threads;
  return d;
}

inline py::dict stats_dict(const PoolStats& s) {
  py::dict d;
  d["bytes_held"] = s.bytes_held;
  d["bytes_in_use"] = s.bytes_in_use;
  d["budget"] = s.budget;
  d["hits"] = s.hits;
  d["misses"] = s.misses;
  d["waits"] = s.waits;
  d["fallbacks"] = s.fallbacks;
  d["pin_failures"] = s.pin_failures;
  d["frees"] = s.frees;
  return d;
}

/// A batch's host arrays laid out for one packed copy (tensorbridge._C.PackedArrays):
/// each array checked once, grouped and given its offset in one buffer by core/pack.h.
/// Holds the arrays (so the views stay valid) until it dies. `groups` is what the Python
/// layer builds the packed tensors from: per group, the dtype, shape, first byte, bytes
/// per array, the members (indices into `arrays`) and None; for a ragged group, the shape
/// after the first dimension, bytes per row, and (pieces, take) in place of None: the
/// rows of a split of the group, and which pieces are the members (None: all of them).
class PackedArrays {
 public:
  PackedArrays(const py::list& arrays, size_t align) {
    std::vector<uint64_t> kinds;
    std::vector<HostView> views;
    std::unordered_map<PyObject*, int> swap_of;  // per dtype object: checked once
    const size_t n = static_cast<size_t>(py::len(arrays));
    arrays_.reserve(n);
    views.reserve(n);
    kinds.reserve(n);
    for (size_t i = 0; i < n; ++i) {
      py::handle item = PyList_GET_ITEM(arrays.ptr(), static_cast<Py_ssize_t>(i));
      if (!py::isinstance<py::array>(item))
        throw py::type_error("pack: item " + std::to_string(i) + " is not a numpy.ndarray");
      auto a = py::reinterpret_borrow<py::array>(item);
      py::dtype dt = a.dtype();
      auto it = swap_of.find(dt.ptr());
      if (it == swap_of.end()) it = swap_of.emplace(dt.ptr(), swap_unit(a)).first;
      HostView v = view_of(a);  // (the dtype was checked once per dtype, above)
      v.swap_unit = it->second;
      kinds.push_back(kind_of(dt, it->second != 0));
      views.push_back(std::move(v));
      arrays_.push_back(std::move(a));
    }
    PackLayout layout = plan_pack(views, kinds, align);
    nbytes_ = layout.nbytes;
    for (const PackGroup& g : layout.groups) {
      const py::array& first = arrays_[g.members.front()];
      py::tuple shape(g.shape.size());
      for (size_t d = 0; d < g.shape.size(); ++d) shape[d] = py::int_(g.shape[d]);
      py::list members = int_list(g.members);
      py::object split = py::none();
      if (g.ragged) {
        py::object take = py::none();
        if (!g.take.empty()) take = int_list(g.take);
        split = py::make_tuple(int_list(g.pieces), take);
      }
      groups_.append(py::make_tuple(first.dtype(), shape, g.first, g.stride, members, split));
    }
    offsets_ = std::move(layout.offsets);
    views_.reserve(n);
    for (size_t i : layout.order) views_.push_back(std::move(views[i]));
  }
  size_t nbytes() const { return nbytes_; }
  py::list groups() const { return groups_; }
  const std::vector<HostView>& views() const { return views_; }  // in packed order
  const std::vector<size_t>& offsets() const { return offsets_; }
  /// Zeroes the bytes of dst[0, nbytes) that no array fills (the padding after each, and
  /// the tail), so that a packed buffer, pickled or saved whole, carries nothing else.
  void zero_padding(char* dst) const {
    size_t end = 0;
    for (size_t i = 0; i < views_.size(); ++i) {
      const size_t bytes = view_bytes(views_[i]);
      if (bytes == 0) continue;
      if (offsets_[i] > end) std::memset(dst + end, 0, offsets_[i] - end);
      end = std::max(end, offsets_[i] + bytes);
    }
    if (nbytes_ > end) std::memset(dst + end, 0, nbytes_ - end);
  }
  /// Refuses a destination that overlaps any source (it would be read while written).
  void check_apart_from(const ByteSpan& dst) const {
    for (const py::array& a : arrays_) {
      const ByteSpan src = byte_span(a);
      if (!src.empty() && src.intersects(dst))
        throw py::value_error("pack: the destination overlaps one of the packed arrays");
    }
  }

 private:
  // A list of Python ints, made with the C API (a batch has thousands of members), equal
  // neighbours sharing one int object (the pieces of a ragged group of arrays of one
  // length whose bytes are a multiple of 16, say).
  template <class T>
  static py::list int_list(const std::vector<T>& values) {
    py::list out(values.size());
    py::object last;
    for (size_t k = 0; k < values.size(); ++k) {
      if (k == 0 || values[k] != values[k - 1]) last = py::int_(values[k]);
      PyList_SET_ITEM(out.ptr(), static_cast<Py_ssize_t>(k), last.inc_ref().ptr());
    }
    return out;
  }

  // Equal for arrays of the same element type and byte order, whichever dtype object
  // they carry (NumPy makes a new one for each non-native dtype), as NumPy's dtype
  // equality has it: the builtin types by kind and size (so int64 and longlong, two
  // type numbers, are one kind), registered (ml_dtypes) types by number, structured
  // ones by object.
  static uint64_t kind_of(const py::dtype& dt, bool swapped) {
    constexpr int kUserTypes = 256;  // NPY_USERDEF: ml_dtypes and other registered types
    const bool user = dt.num() >= kUserTypes;
    const bool numeric = user ? !dt.has_fields() : std::strchr("biufc", dt.kind()) != nullptr;
    if (!numeric || dt.itemsize() <= 0 || dt.itemsize() >= (int64_t{1} << 20))
      return reinterpret_cast<uintptr_t>(dt.ptr());  // (an address: bit 63 clear)
    const uint64_t type = user ? (uint64_t{1} << 20) | static_cast<uint64_t>(dt.num())
                               : static_cast<unsigned char>(dt.kind());
    return (uint64_t{1} << 63) | (type << 21) | (static_cast<uint64_t>(dt.itemsize()) << 1) |
           (swapped ? 1 : 0);
  }
  // The dtype's byte-swap unit for the core (0: native order), after refusing what no
  // copy can move as bytes.
  static int swap_unit(const py::array& a) {
    check_movable(a);
    const py::dtype dt = a.dtype();
    const char order = dt.byteorder();
    constexpr bool little = __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__;
    const bool swapped = (order == '>' && little) || (order == '<' && !little);
    if (!swapped || a.itemsize() == 1) return 0;
    if (dt.has_fields())
      throw py::type_error("pack: structured arrays in non-native byte order cannot be packed");
    return static_cast<int>(dt.kind() == 'c' ? a.itemsize() / 2 : a.itemsize());
  }

  std::vector<py::array> arrays_;
  std::vector<HostView> views_;
  std::vector<size_t> offsets_;
  py::list groups_;
  size_t nbytes_ = 0;
};

/// A copy queued without waiting, as Python sees it (tensorbridge._C.PendingCopy): the
/// event recorded after it, owned here, and the objects whose memory the copy reads or
/// writes, held until the copy is seen complete. Dropped before that, it waits for the
/// copy (GIL released); when a wait fails, those objects are kept alive for good, since
/// the copy may still touch their memory. In a process forked after it was made, it
/// touches nothing of the parent's: the event is abandoned and the memory kept.
class PendingCopy {
 public:
  /// `owner` keeps the event's engine alive (None for the CUDA engines, which never die).
  PendingCopy(Event event, py::object keepalive, py::object owner)
      : owner_(std::move(owner)),
        event_(std::move(event)),
        keepalive_(std::move(keepalive)),
        pid_(getpid()) {}
  PendingCopy(const PendingCopy&) = delete;
  PendingCopy& operator=(const PendingCopy&) = delete;
  ~PendingCopy() {
    if (forked()) return;  // (abandoned by forked())
    try {
      // With the GIL held: a destructor cannot let a daemon thread's end at interpreter
      // exit pass (retaking the GIL there unwinds the thread), and the copy needs no
      // Python to finish.
      finish(false);
    } catch (...) {  // (already kept alive by finish)
    }
  }

  /// True once the copy has completed or failed; never blocks (false while another
  /// thread waits).
  bool done() {
    if (forked()) throw_forked();  // "done" would invite reading memory never written here
    std::unique_lock<std::mutex> lock(m_, std::try_to_lock);
    if (!lock.owns_lock()) return false;
    if (error_) return true;  // (failed: wait() raises)
    try {
      if (!event_.done()) return false;
    } catch (...) {
      error_ = std::current_exception();
      lock.unlock();
      (void)keepalive_.release();  // never freed: the copy may still touch this memory
      return true;
    }
    lock.unlock();
    keepalive_ = py::none();
    return true;
  }

  /// Blocks until the copy has completed; raises the engine's error if it failed.
  void wait() { finish(true); }

 private:
  void finish(bool release_gil) {
    if (forked()) throw_forked();
    std::exception_ptr error;
    const auto wait_event = [&] {
      std::lock_guard<std::mutex> lock(m_);
      if (!error_) {
        try {
          event_.wait();
        } catch (...) {
          error_ = std::current_exception();
        }
      }
      error = error_;
    };
    if (release_gil) {
      ReleaseGil release;  // (a daemon thread still waiting at exit ends here cleanly)
      wait_event();
    } else {
      wait_event();
    }
    if (error) {
      (void)keepalive_.release();  // never freed: the copy may still touch this memory
      std::rethrow_exception(error);
    }
    keepalive_ = py::none();
  }

  [[noreturn]] static void throw_forked() {
    throw std::runtime_error(
        "this copy was queued by the parent process before it forked; a forked child "
        "cannot wait for it or see its result (wait in the parent, before forking)");
  }

  py::object owner_;  // declared first, destroyed last: the event needs its engine
  std::mutex m_;      // one thread waits at a time; done() does not block on it
  Event event_;
  py::object keepalive_;
  std::exception_ptr error_;  // the failed wait's error, raised by every later wait
  const pid_t pid_;           // the process that queued the copy

  // In a forked child: abandons the parent's event and memory on first sight (the GIL
  // is held, so no other thread of this process races here).
  bool forked() noexcept {
    if (getpid() == pid_) return false;
    if (!abandoned_) {
      abandoned_ = true;
      event_.abandon();
      (void)keepalive_.release();
      (void)owner_.release();
    }
    return true;
  }
  bool abandoned_ = false;
};

/// Registers PendingCopy in module m (tensorbridge._C; _C_testing imports it from there).
inline void bind_pending_copy(py::module_& m) {
  py::class_<PendingCopy>(m, "PendingCopy",
                          "A copy queued without waiting: done() polls, wait() blocks. Holds "
                          "the memory the copy touches until it completes.")
      .def("done", &PendingCopy::done, "True once the copy has completed; never blocks.")
      .def("wait", &PendingCopy::wait,
           "Blocks until the copy has completed (GIL released); raises its error, if any.");
}

}  // namespace tb::py_util
