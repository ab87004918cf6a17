// The pybind11 layer of tensorbridge._C: argument conversion, GIL release, error
// translation, the checks that must run before raw memory is touched, and two pieces of
// its own (LinkSimulator, call_through_interrupts). The transfer logic lives in core/
// (plain C++) and cuda/ (CUDA runtime).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "bindings_util.h"
#include "core/host_ceiling.h"
#include "core/pinned_pool.h"
#include "core/pipeline.h"
#include "core/sim_link.h"
#include "core/strided_copy.h"
#include "core/thread_pool.h"
#ifdef TB_WITH_CUDA
#include "cuda/cuda_engine.h"
#include "cuda/runtime.h"
#endif

namespace py = pybind11;
using namespace tb::py_util;

namespace {

// Releasing and retaking the GIL costs about as much as copying a few KiB, so small
// copies keep it; anything that takes longer than a few microseconds lets other
// Python threads (data-loader workers) run.
constexpr size_t kReleaseGilBytes = 64 * 1024;
bool worth_releasing_gil(size_t nbytes) { return nbytes >= kReleaseGilBytes; }

template <class F>
auto release_gil_and(F&& f) {
  ReleaseGil release;
  return f();
}

bool holds_references(const py::array& a) { return a.dtype().attr("hasobject").cast<bool>(); }

// Copies src into dst (same shape, same itemsize), byte-swapping when asked.
// The Python layer validates dtypes, writability and overlap first.
void copy(py::array dst, py::array src, int swap_unit, int64_t min_parallel_bytes) {
  if (dst.ndim() != src.ndim() || shape_of(dst) != shape_of(src))
    throw py::value_error("copy: dst and src must have the same shape");
  if (dst.itemsize() != src.itemsize())
    throw py::value_error("copy: dst and src must have the same itemsize");
  if (!dst.writeable()) throw py::value_error("copy: dst is read-only");
  // Raw bytes of an object (or StringDType) array are pointers: copying them without
  // taking references would free objects still in use.
  if (holds_references(dst) || holds_references(src))
    throw py::type_error(
        "copy: arrays holding Python references cannot be copied as raw bytes: use "
        "numpy.copyto(dst, src)");
  const auto shape = shape_of(dst);
  const auto ds = strides_of(dst), ss = strides_of(src);
  tb::CopyOptions opt;
  opt.swap_unit = swap_unit;
  if (min_parallel_bytes > 0) opt.min_parallel_bytes = min_parallel_bytes;
  void* d = dst.mutable_data();
  const void* s = src.data();
  const auto run = [&] {
    return tb::strided_copy({d, ds.data()}, {const_cast<void*>(s), ss.data()}, shape.data(),
                            static_cast<int>(shape.size()), dst.itemsize(), opt);
  };
  if (!(worth_releasing_gil(static_cast<size_t>(dst.nbytes())) ? release_gil_and(run) : run()))
    throw py::value_error("copy: unsupported itemsize " + std::to_string(dst.itemsize()) +
                          " or byte-swap unit " + std::to_string(swap_unit) +
                          ": use numpy.copyto(dst, src) for this dtype");
}

// Reads a tuple of Python ints (torch.Size and x.stride() are tuples) into `dst`;
// returns the count, or -1 when obj is not a tuple of at most kMaxDims ints.
int read_int_tuple(py::handle obj, int64_t* dst) {
  if (!PyTuple_Check(obj.ptr())) return -1;
  const Py_ssize_t n = PyTuple_GET_SIZE(obj.ptr());
  if (n > tb::kMaxDims) return -1;
  for (Py_ssize_t i = 0; i < n; ++i) {
    const long long v = PyLong_AsLongLong(PyTuple_GET_ITEM(obj.ptr(), i));
    if (v == -1 && PyErr_Occurred()) throw py::error_already_set();
    dst[i] = v;
  }
  return static_cast<int>(n);
}

// True when no two elements of a strided view can share a byte: sorted by stride, each
// stride steps over everything the smaller ones span. False means "maybe" (interleaved
// layouts the quick test cannot clear, zero strides, real overlap).
bool clearly_disjoint_elements(const int64_t* shape, const int64_t* byte_strides, int ndim,
                               int64_t itemsize) {
  std::array<std::pair<int64_t, int64_t>, tb::kMaxDims> dims;  // (|stride|, extent)
  int n = 0;
  for (int i = 0; i < ndim; ++i)
    if (shape[i] > 1)
      dims[n++] = {byte_strides[i] < 0 ? -byte_strides[i] : byte_strides[i], shape[i]};
  std::sort(dims.begin(), dims.begin() + n);
  int64_t span = itemsize;
  for (int i = 0; i < n; ++i) {
    if (dims[i].first < span) return false;
    span += dims[i].first * (dims[i].second - 1);
  }
  return true;
}

// The hot path of to_numpy(x, out=...): copies a host tensor given as (address, shape,
// element strides) into `out`. Checks first and writes nothing unless all pass:
// returns 0 when copied, 1 when `out` is not a writeable ndarray of `dtype` and `shape`
// or the source is at address 0 (the Python layer then raises the right error), 2 when
// the byte ranges of `out` and the source intersect (the Python layer decides exactly).
// `serial` keeps the copy on the calling thread, with no pool thread to wait for.
int copy_from_address(py::handle out, py::handle dtype, uintptr_t src, py::handle shape,
                      py::handle strides, int swap_unit, bool serial) {
  if (!py::isinstance<py::array>(out)) return 1;
  auto dst = py::reinterpret_borrow<py::array>(out);
  if (!dst.dtype().equal(py::reinterpret_borrow<py::dtype>(dtype)) || !dst.writeable()) return 1;
  // Fixed arrays on the stack: this runs once per small conversion, so no heap traffic.
  std::array<int64_t, tb::kMaxDims> shp, ss, ds;
  const int nd = read_int_tuple(shape, shp.data());
  if (nd < 0 || read_int_tuple(strides, ss.data()) != nd || dst.ndim() != nd) return 1;
  const int64_t itemsize = dst.itemsize();
  for (int i = 0; i < nd; ++i) {
    if (dst.shape(i) != shp[i]) return 1;
    ss[i] *= itemsize;
    ds[i] = dst.strides(i);
  }
  const auto d =
      tb::byte_span(reinterpret_cast<uintptr_t>(dst.data()), shp.data(), ds.data(), nd, itemsize);
  const auto r = tb::byte_span(src, shp.data(), ss.data(), nd, itemsize);
  if (src == 0 && !r.empty()) return 1;  // a freed storage: the Python layer refuses it
  if (d.intersects(r)) return 2;
  if (!d.empty() && !clearly_disjoint_elements(shp.data(), ds.data(), nd, itemsize))
    return 1;  // elements may share memory: the Python layer decides exactly
  tb::CopyOptions opt;
  opt.swap_unit = swap_unit;
  if (serial) opt.min_parallel_bytes = std::numeric_limits<int64_t>::max();
  void* dp = dst.mutable_data();
  const auto run = [&] {
    return tb::strided_copy({dp, ds.data()}, {reinterpret_cast<void*>(src), ss.data()}, shp.data(),
                            nd, itemsize, opt);
  };
  return (worth_releasing_gil(r.size()) ? release_gil_and(run) : run()) ? 0 : 1;
}

// ---------------------------------------------------------------- transfers

py::dict cuda_probe() {
  py::dict d;
#ifdef TB_WITH_CUDA
  tb::cuda::RuntimeInfo info;
  {
    ReleaseGil release;
    info = tb::cuda::probe();
  }
  d["compiled"] = true;
  d["device_count"] = info.device_count;
  d["runtime_version"] = info.runtime_version;
  d["driver_version"] = info.driver_version;
  d["error"] = info.error.empty() ? py::object(py::none()) : py::object(py::str(info.error));
  d["device_names"] = info.device_names;
  d["pci_bus_ids"] = info.pci_bus_ids;
#else
  d["compiled"] = false;
  d["device_count"] = 0;
  d["runtime_version"] = 0;
  d["driver_version"] = 0;
  d["error"] = py::str("tensorbridge._C was built without the CUDA toolkit");
  d["device_names"] = py::list();
  d["pci_bus_ids"] = py::list();
#endif
  return d;
}

// The real pipeline and pinned pool over a simulated link (core/sim_link.h), for the
// `bench --sections link` benchmark: how close the scheduler comes to min(link, H) on a
// machine without a GPU. "Device memory" is a dense uint8 array; every call returns
// once its data has arrived.
class LinkSimulator {
 public:
  LinkSimulator(double bandwidth_gbs, double latency_us, size_t budget)
      : link_(std::make_unique<tb::SimulatedLink>(tb::LinkModel{bandwidth_gbs, latency_us})),
        pool_(std::make_unique<tb::PinnedPool>(*link_, budget)) {}
  ~LinkSimulator() {
    if (link_->forked()) {  // a forked child's copy: its threads and locks are the parent's
      (void)pool_.release();
      (void)link_.release();
      return;
    }
    link_->drain();
    pool_->release_all();
  }
  py::dict to_host(const py::array& device, const py::array& dst, size_t chunk, int buffers,
                   int threads, uintptr_t stream) {
    check_process();
    const auto view = host_view(dst, true);
    check_device(device, view, false);
    check_chunk(chunk);
    auto options = pipeline_options(chunk, buffers, 0);
    options.threads = threads;
    tb::PipelineReport r;
    {
      ReleaseGil release;
      r = tb::copy_to_host(*link_, *pool_, stream, device.data(), view, options);
    }
    return report_dict(r);
  }
  py::dict to_device(const py::array& src, py::array device, size_t chunk, int buffers, int threads,
                     uintptr_t stream) {
    check_process();
    const auto view = host_view(src, false);
    check_device(device, view, true);
    check_chunk(chunk);
    auto options = pipeline_options(chunk, buffers, 0);
    options.threads = threads;
    options.wait = true;
    tb::PipelineReport r;
    {
      ReleaseGil release;
      r = tb::copy_to_device(*link_, *pool_, stream, view, device.mutable_data(), options);
    }
    return report_dict(r);
  }
  // A PackedArrays layout -> the device buffer (bytes), as the CUDA batch path sends it.
  py::dict to_device_packed(const PackedArrays& layout, py::array device, size_t chunk, int buffers,
                            int threads, uintptr_t stream) {
    check_process();
    check_chunk(chunk);
    if (!(device.flags() & py::array::c_style) || device.itemsize() != 1 ||
        static_cast<size_t>(device.nbytes()) < layout.nbytes())
      throw py::value_error("the device buffer must be C-contiguous bytes, nbytes long");
    if (!device.writeable()) throw py::value_error("the device buffer is read-only");
    layout.check_apart_from(byte_span(device));
    auto options = pipeline_options(chunk, buffers, 0);
    options.threads = threads;
    options.wait = true;
    tb::PipelineReport r;
    {
      ReleaseGil release;
      r = tb::copy_many_to_device(*link_, *pool_, stream, layout.views(), layout.offsets(),
                                  device.mutable_data(), options);
    }
    return report_dict(r);
  }
  // One DMA between the device and page-locked memory (from empty_pinned()), waited for.
  void copy(py::array device, py::array host, bool to_host, uintptr_t stream) {
    check_process();
    if (!(device.flags() & py::array::c_style) || !(host.flags() & py::array::c_style))
      throw py::value_error("copy: both arrays must be C-contiguous");
    if (device.nbytes() != host.nbytes())
      throw py::value_error("copy: the arrays must have the same size in bytes");
    const py::array& written = to_host ? host : device;
    if (!written.writeable()) throw py::value_error("copy: the destination is read-only");
    const size_t n = static_cast<size_t>(host.nbytes());
    // (only the destination must be writeable)
    void* h = const_cast<void*>(host.data());
    void* d = const_cast<void*>(device.data());
    check_movable(host);
    check_movable(device);
    if (byte_span(host).intersects(byte_span(device)))
      throw py::value_error("copy: the device and host arrays share memory");
    ReleaseGil release;
    tb::Event done(*link_);
    if (to_host)
      link_->copy_to_host_async(h, d, n, stream);
    else
      link_->copy_to_device_async(d, h, n, stream);
    done.record(stream);
    done.wait();
  }
  std::vector<double> host_ceiling(size_t nbytes, bool to_pinned, int repeats) {
    check_process();
    if (nbytes > (size_t{1} << 32) || repeats > 10000)
      throw py::value_error("host_ceiling: nbytes at most 4 GiB and repeats at most 10000");
    ReleaseGil release;
    return tb::host_copy_seconds(*link_, nbytes, to_pinned, repeats);
  }
  py::dict stats() {
    check_process();
    return stats_dict(pool_->stats());
  }
  double bandwidth_gbs() const { return link_->model().bandwidth_gbs; }
  double latency_us() const { return link_->model().latency_us; }

 private:
  void check_process() const {
    if (link_->forked())
      throw std::runtime_error(
          "this LinkSimulator was made by the parent process before it forked: make a new "
          "one in the child");
  }
  // (as transfer_options bounds it: a tiny chunk makes a plan of millions of chunks)
  static void check_chunk(size_t chunk) {
    if (chunk != 0 && (chunk < 4096 || chunk > (size_t{1} << 40)))
      throw py::value_error("chunk_bytes must be 0 (the default) or from 4096 to 2**40");
  }
  static void check_device(const py::array& device, const tb::HostView& v, bool written) {
    check_movable(device);
    const int64_t* shape = v.shape.data();
    if (tb::byte_span(reinterpret_cast<uintptr_t>(v.data), shape, v.strides.data(),
                      static_cast<int>(v.shape.size()), v.itemsize)
            .intersects(byte_span(device)))
      throw py::value_error("the device and host arrays share memory");
    int64_t n = v.itemsize;
    for (int64_t d : v.shape) n *= d;
    if (!(device.flags() & py::array::c_style) || device.nbytes() < n)
      throw py::value_error("the device buffer must be C-contiguous and large enough");
    if (written && !device.writeable()) throw py::value_error("the device buffer is read-only");
  }
  std::unique_ptr<tb::SimulatedLink> link_;
  std::unique_ptr<tb::PinnedPool> pool_;
};

// Packs the arrays into `out` (a writeable, C-contiguous byte array of at least
// layout.nbytes() bytes) at their offsets; the bytes between them, and after the last up
// to layout.nbytes(), are zeroed.
void pack_into(const PackedArrays& layout, py::array out) {
  if (out.dtype().kind() != 'u' || out.itemsize() != 1 || !(out.flags() & py::array::c_style))
    throw py::value_error("pack_into: out must be a C-contiguous array of bytes (uint8)");
  if (!out.writeable()) throw py::value_error("pack_into: out is read-only");
  if (static_cast<size_t>(out.nbytes()) < layout.nbytes())
    throw py::value_error("pack_into: out is smaller than the layout's nbytes");
  layout.check_apart_from(byte_span(out));
  char* dst = static_cast<char*>(out.mutable_data());
  const auto run = [&] {
    tb::pack_to_host(layout.views(), layout.offsets(), dst);
    layout.zero_padding(dst);
  };
  if (worth_releasing_gil(layout.nbytes()))
    release_gil_and(run);
  else
    run();
}

#ifdef TB_WITH_CUDA
py::dict cuda_copy_to_host(int device, uintptr_t stream, uintptr_t src, py::array dst, size_t chunk,
                           int buffers, int swap) {
  const auto view = host_view(dst, true);
  tb::PipelineReport r;
  {
    ReleaseGil release;
    r = tb::cuda::copy_to_host(device, stream, reinterpret_cast<const void*>(src), view,
                               pipeline_options(chunk, buffers, swap));
  }
  return report_dict(r);
}

py::dict cuda_copy_to_device(int device, uintptr_t stream, py::array src, uintptr_t dst,
                             size_t chunk, int buffers, int swap, bool wait) {
  const auto view = host_view(src, false);
  auto options = pipeline_options(chunk, buffers, swap);
  options.wait = wait;
  tb::PipelineReport r;
  {
    ReleaseGil release;
    r = tb::cuda::copy_to_device(device, stream, view, reinterpret_cast<void*>(dst), options);
  }
  return report_dict(r);
}

py::dict cuda_copy_packed(int device, uintptr_t stream, const PackedArrays& layout, uintptr_t dst,
                          size_t chunk, int buffers, bool wait) {
  auto options = pipeline_options(chunk, buffers, 0);
  options.wait = wait;
  tb::PipelineReport r;
  {
    ReleaseGil release;
    r = tb::cuda::copy_many_to_device(device, stream, layout.views(), layout.offsets(),
                                      reinterpret_cast<void*>(dst), options);
  }
  return report_dict(r);
}

// The two ends of a blocking copy between `host` (C-contiguous, nbytes bytes; writable
// when written) and device memory, checked with the GIL held.
struct HostAndDevice {
  void* dst;
  const void* src;
};

HostAndDevice blocking_copy_ends(const char* fn, py::array& host, uintptr_t device_ptr,
                                 size_t nbytes, bool to_host) {
  if (!(host.flags() & py::array::c_style) || static_cast<size_t>(host.nbytes()) != nbytes)
    throw py::value_error(std::string(fn) + ": host must be C-contiguous, of nbytes bytes");
  auto* dev = reinterpret_cast<void*>(device_ptr);
  if (!to_host) return {dev, host.data()};
  if (!host.writeable()) throw py::value_error(std::string(fn) + ": host is read-only");
  return {host.mutable_data(), dev};
}

// A 1-D uint8 array over freshly page-locked memory; freed when the array's base dies.
py::array empty_pinned_bytes(size_t nbytes) {
  const auto free = [](void* p) { tb::cuda::host_free(p); };
  std::unique_ptr<void, decltype(free)> memory(nullptr, free);
  {
    ReleaseGil release;
    memory.reset(tb::cuda::host_alloc(nbytes));  // a CudaError becomes RuntimeError
  }
  py::capsule owner(memory.get(), free);  // from here the capsule frees it
  void* ptr = memory.release();
  return py::array(py::dtype("uint8"), {static_cast<py::ssize_t>(nbytes)}, {1}, ptr, owner);
}
#endif

// The exception being raised, normalized, with its traceback; the error indicator is
// cleared. (A new reference.)
PyObject* take_exception() {
#if PY_VERSION_HEX >= 0x030C0000
  return PyErr_GetRaisedException();
#else
  PyObject *type = nullptr, *value = nullptr, *trace = nullptr;
  PyErr_Fetch(&type, &value, &trace);
  PyErr_NormalizeException(&type, &value, &trace);
  if (trace != nullptr) PyException_SetTraceback(value, trace);
  Py_XDECREF(type);
  Py_XDECREF(trace);
  return value;
#endif
}

// Raises `exc` (steals the reference).
void restore_exception(PyObject* exc) {
#if PY_VERSION_HEX >= 0x030C0000
  PyErr_SetRaisedException(exc);
#else
  PyObject* type = reinterpret_cast<PyObject*>(Py_TYPE(exc));
  Py_INCREF(type);
  PyErr_Restore(type, exc, PyException_GetTraceback(exc));
#endif
}

// Prints `exc` (stolen) as Python prints a finalizer's error, leaving any error being
// raised as it was.
void print_unraisable(PyObject* exc, PyObject* where) {
  PyObject* raising = PyErr_Occurred() != nullptr ? take_exception() : nullptr;
  restore_exception(exc);
  PyErr_WriteUnraisable(where);
  if (raising != nullptr) restore_exception(raising);
}

// The exception the calling code is handling (an `except` block), or nullptr; a new
// reference.
PyObject* handled_exception() {
#if PY_VERSION_HEX >= 0x030B0000
  PyObject* handled = PyErr_GetHandledException();
#else
  PyObject *type = nullptr, *handled = nullptr, *trace = nullptr;
  PyErr_GetExcInfo(&type, &handled, &trace);
  Py_XDECREF(type);
  Py_XDECREF(trace);
#endif
  if (handled == Py_None) {
    Py_DECREF(handled);
    return nullptr;
  }
  return handled;
}

// The main thread's id (threading.get_ident()), set by the package at import and in a
// forked child; 0 until then.
unsigned long g_main_thread = 0;

// A pending call (Py_AddPendingCall): raises the held exception `exc` (stolen) in the
// main thread, at the next instruction it runs.
int raise_held(void* exc) {
  restore_exception(static_cast<PyObject*>(exc));
  return -1;
}

// A finalizer's body run to its end through Ctrl-C: fn(arg) on the main thread is called
// again whenever it raises KeyboardInterrupt (at most kFinalizerTries times in all), and
// the first KeyboardInterrupt, the same object, is then raised in the main thread at its
// next instruction (a pending call: SIGINT's handler does not run again). A weakref
// callback written in Python can be ended by a Ctrl-C pending as it starts, on its very
// first instruction, before it has done anything (and Python prints what a finalizer
// raises rather than raising it): called through this, which runs no Python code of its
// own, it is not. An error the Ctrl-C interrupted inside fn (its context: a driver's
// error, say; not the exception the caller was handling as the array died) is printed
// as a finalizer's error. Elsewhere than on the main thread (set_main_thread), which
// alone receives signals, fn is called once, as it is. fn must be safe to call again
// once it has done its work.
constexpr int kFinalizerTries = 100;

py::object call_through_interrupts(const py::object& fn, const py::object& arg) {
  if (g_main_thread == 0 || PyThread_get_thread_ident() != g_main_thread) return fn(arg);
  const py::object outer = py::reinterpret_steal<py::object>(handled_exception());
  PyObject* held = nullptr;  // the first KeyboardInterrupt
  for (int tries = 1;; ++tries) {
    PyObject* result = PyObject_CallOneArg(fn.ptr(), arg.ptr());
    if (result == nullptr && PyErr_ExceptionMatches(PyExc_KeyboardInterrupt) &&
        tries < kFinalizerTries) {
      PyObject* interrupt = take_exception();
      if (PyObject* cause = PyException_GetContext(interrupt)) {  // (a new reference)
        PyException_SetContext(interrupt, nullptr);
        if (cause == outer.ptr() || PyErr_GivenExceptionMatches(cause, PyExc_KeyboardInterrupt))
          Py_DECREF(cause);
        else
          print_unraisable(cause, fn.ptr());
      }
      if (held == nullptr)
        held = interrupt;
      else
        Py_DECREF(interrupt);  // (one Ctrl-C delivered for the presses that came meanwhile)
      continue;
    }
    if (held != nullptr && Py_AddPendingCall(&raise_held, held) != 0)
      print_unraisable(held, fn.ptr());  // (the queue is full: printed rather than lost)
    if (result == nullptr) throw py::error_already_set();
    return py::reinterpret_steal<py::object>(result);
  }
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "tensorbridge's compiled core (private: use the tensorbridge package)";
#ifdef TB_VERSION
  m.attr("__version__") = TB_VERSION;
#endif
  m.attr("cuda_compiled") =
#ifdef TB_WITH_CUDA
      true;
#else
      false;
#endif
  m.def("copy", &copy, py::arg("dst").noconvert(), py::arg("src").noconvert(),
        py::arg("swap_unit") = 0, py::arg("min_parallel_bytes") = 0,
        "Strided copy of src into dst (same shape and itemsize), GIL released.");
  m.def("copy_from_address", &copy_from_address, py::arg("out"), py::arg("dtype"), py::arg("src"),
        py::arg("shape"), py::arg("strides"), py::arg("swap_unit") = 0, py::arg("serial") = false,
        "Copy a host tensor (address, shape, element strides) into out, on the calling "
        "thread alone if serial; 0 = copied, 1 = out does not match, 2 = the memory may "
        "overlap (nothing written unless 0).");
  m.def("get_num_threads", &tb::get_num_threads, "Threads used for large host copies.");
  m.def("set_num_threads", &tb::set_num_threads, py::arg("n"),
        "Set the threads used for large host copies.");
  m.def("default_pinned_budget", &tb::default_pinned_budget,
        "The pinned budget per device when none is set: an eighth of RAM, 256 MiB to 8 GiB.");
  m.def("cuda_probe", &cuda_probe, "The CUDA runtime's view of this machine.");
  m.def("call_through_interrupts", &call_through_interrupts, py::arg("fn"), py::arg("arg"),
        "fn(arg), on the main thread called again when it raises KeyboardInterrupt, which is "
        "then raised at the main thread's next instruction: a weakref callback that a Ctrl-C "
        "pending as it starts cannot end early.");
  m.def(
      "set_main_thread", [](unsigned long ident) { g_main_thread = ident; }, py::arg("ident"),
      "The main thread's threading.get_ident(), for call_through_interrupts (at import, "
      "and in a forked child).");
  bind_pending_copy(m);
  py::class_<PackedArrays>(m, "PackedArrays",
                           "Host arrays checked, grouped by dtype and shape and laid out in "
                           "one buffer, for one packed copy. Holds the arrays.")
      .def(py::init<const py::list&, size_t>(), py::arg("arrays"), py::arg("align") = 256)
      .def_property_readonly("nbytes", &PackedArrays::nbytes, "The buffer's size in bytes.")
      .def_property_readonly(
          "groups", &PackedArrays::groups,
          "[(dtype, shape, first byte, bytes per array, member indices, None)] in buffer "
          "order; a ragged group (shapes that differ in the first dimension only, back to "
          "back): (dtype, shape after the first dimension, first byte, bytes per row, member "
          "indices, (rows of each piece of its split, the member pieces or None for all)).")
      .def("pack_into", &pack_into, py::arg("out"),
           "Copy every array into out (uint8, C-contiguous) at its offset; GIL released.");
  py::class_<LinkSimulator>(m, "LinkSimulator",
                            "The transfer pipeline and a pinned pool over a simulated link "
                            "(one copy engine per direction, per-copy latency), for benchmarks "
                            "on machines without a GPU.")
      .def(py::init<double, double, size_t>(), py::arg("bandwidth_gbs"),
           py::arg("latency_us") = 0.0, py::arg("budget") = size_t{1} << 30)
      .def("to_host", &LinkSimulator::to_host, py::arg("device"), py::arg("dst"),
           py::arg("chunk_bytes") = 0, py::arg("buffers") = 0, py::arg("threads") = 0,
           py::arg("stream") = 0, "Simulated device memory -> any host array; waits.")
      .def("to_device", &LinkSimulator::to_device, py::arg("src"), py::arg("device"),
           py::arg("chunk_bytes") = 0, py::arg("buffers") = 0, py::arg("threads") = 0,
           py::arg("stream") = 0, "Any host array -> simulated device memory; waits.")
      .def("to_device_packed", &LinkSimulator::to_device_packed, py::arg("layout"),
           py::arg("device"), py::arg("chunk_bytes") = 0, py::arg("buffers") = 0,
           py::arg("threads") = 0, py::arg("stream") = 0,
           "A PackedArrays layout -> simulated device memory (bytes); waits.")
      .def("copy", &LinkSimulator::copy, py::arg("device"), py::arg("host"), py::arg("to_host"),
           py::arg("stream") = 0, "One DMA (the host side page-locked), waited for.")
      .def("host_ceiling", &LinkSimulator::host_ceiling, py::arg("nbytes"), py::arg("to_pinned"),
           py::arg("repeats") = 5,
           "Seconds per pageable<->page-locked copy of nbytes with the thread pool (H).")
      .def("stats", &LinkSimulator::stats)
      .def_property_readonly("bandwidth_gbs", &LinkSimulator::bandwidth_gbs)
      .def_property_readonly("latency_us", &LinkSimulator::latency_us);
#if defined(TB_TESTING) && defined(TB_WITH_CUDA)
  // The fault switch lives in this module's engine; tensorbridge._C_testing reaches it
  // through this capsule (testing builds only: release builds have neither).
  static void (*const inject_copy_fault)(int64_t) = &tb::cuda::inject_copy_fault;
  m.attr("_testing_copy_fault") =
      py::capsule(reinterpret_cast<const void*>(&inject_copy_fault), "tensorbridge._C.copy_fault");
#endif
#ifdef TB_WITH_CUDA
  m.def("empty_pinned_bytes", &empty_pinned_bytes, py::arg("nbytes"),
        "A uint8 array of nbytes in page-locked memory.");
  m.def("cuda_copy_to_host", &cuda_copy_to_host, py::arg("device"), py::arg("stream"),
        py::arg("src"), py::arg("dst"), py::arg("chunk_bytes") = 0, py::arg("buffers") = 0,
        py::arg("swap_unit") = 0, "Dense device memory -> any host array, through the pool.");
  m.def("cuda_copy_to_device", &cuda_copy_to_device, py::arg("device"), py::arg("stream"),
        py::arg("src"), py::arg("dst"), py::arg("chunk_bytes") = 0, py::arg("buffers") = 0,
        py::arg("swap_unit") = 0, py::arg("wait") = false,
        "Any host array -> dense device memory, through the pool.");
  m.def("cuda_copy_packed", &cuda_copy_packed, py::arg("device"), py::arg("stream"),
        py::arg("layout"), py::arg("dst"), py::arg("chunk_bytes") = 0, py::arg("buffers") = 0,
        py::arg("wait") = false,
        "A PackedArrays layout -> dst (device), staged by the copy threads, a few DMAs in all.");
  m.def(
      "cuda_copy_async",
      [](int device, uintptr_t stream, uintptr_t dst, uintptr_t src, size_t n, bool to_host,
         py::object keepalive) {
        tb::Event done;
        {
          ReleaseGil release;
          done = tb::cuda::copy_async(device, stream, reinterpret_cast<void*>(dst),
                                      reinterpret_cast<const void*>(src), n, to_host);
        }
        return std::make_unique<PendingCopy>(std::move(done), std::move(keepalive), py::none());
      },
      py::arg("device"), py::arg("stream"), py::arg("dst"), py::arg("src"), py::arg("nbytes"),
      py::arg("to_host"), py::arg("keepalive"),
      "One async copy (page-locked host memory); keepalive is held until it completes.");
  m.def(
      "cuda_copy_pinned",
      [](int device, uintptr_t stream, py::array host, uintptr_t device_ptr, size_t nbytes,
         bool to_host) {
        const HostAndDevice p =
            blocking_copy_ends("cuda_copy_pinned", host, device_ptr, nbytes, to_host);
        ReleaseGil release;
        return tb::cuda::copy_pinned(device, stream, p.dst, p.src, nbytes, to_host);
      },
      py::arg("device"), py::arg("stream"), py::arg("host"), py::arg("device_ptr"),
      py::arg("nbytes"), py::arg("to_host"),
      "One blocking copy between the device and host (C-contiguous) if host is page-locked\n"
      "and not registered here; False, with nothing queued, otherwise.");
  m.def(
      "cuda_copy_small",
      [](int device, uintptr_t stream, py::array host, uintptr_t device_ptr, size_t nbytes,
         bool to_host) {
        const HostAndDevice p =
            blocking_copy_ends("cuda_copy_small", host, device_ptr, nbytes, to_host);
        ReleaseGil release;
        tb::cuda::copy_small(device, stream, p.dst, p.src, nbytes, to_host);
      },
      py::arg("device"), py::arg("stream"), py::arg("host"), py::arg("device_ptr"),
      py::arg("nbytes"), py::arg("to_host"),
      "One blocking copy between the device and host (C-contiguous, any memory).");
  m.def(
      "cuda_host_ceiling",
      [](int device, size_t nbytes, bool to_pinned, int repeats) {
        ReleaseGil release;
        return tb::cuda::host_copy_seconds(device, nbytes, to_pinned, repeats);
      },
      py::arg("device"), py::arg("nbytes"), py::arg("to_pinned"), py::arg("repeats") = 5,
      "Seconds per pageable<->page-locked copy of nbytes with the thread pool (H).");
  m.def("cuda_pinned_stats", [] { return stats_dict(tb::cuda::pinned_stats()); });
  m.def(
      "cuda_set_pinned_budget",
      [](size_t bytes) {
        ReleaseGil release;  // (a smaller budget frees idle staging blocks: cudaFreeHost)
        tb::cuda::set_pinned_budget(bytes);
      },
      py::arg("bytes"), "The staging pools' byte budget; frees idle blocks above it.");
  m.def("cuda_set_numa_nodes", &tb::cuda::set_numa_nodes, py::arg("nodes"),
        "The NUMA node per device that staging blocks pinned from now on prefer (-1: none).");
  m.def(
      "cuda_numa_stats",
      [] {
        const tb::cuda::NumaStats s = tb::cuda::numa_stats();
        py::dict d;
        d["numa_placed"] = s.placed;
        d["numa_refused"] = s.refused;
        d["numa_error"] = s.error;
        return d;
      },
      "Staging blocks pinned on their device's NUMA node, and those the kernel refused.");
  m.def(
      "cuda_reserve_pinned",
      [](size_t bytes) {
        ReleaseGil release;  // (may free idle staging blocks to make room)
        return tb::cuda::reserve_pinned(bytes);
      },
      py::arg("bytes"),
      "Take bytes of the pinned budget for arrays registered in place; False if no room.");
  m.def("cuda_unreserve_pinned", &tb::cuda::unreserve_pinned, py::arg("bytes"),
        "Give bytes taken by cuda_reserve_pinned back.");
  m.def(
      "cuda_host_register",
      [](py::array a, int device) {
        const tb::ByteSpan s = byte_span(a);
        ReleaseGil release;
        return !s.empty() &&
               tb::cuda::host_register(reinterpret_cast<void*>(s.begin), s.size(), device);
      },
      py::arg("array"), py::arg("device") = -1,
      "Page-lock the array's memory with device current (-1: one the engine works on);\n"
      "False if it already was, elsewhere.");
  m.def(
      "cuda_host_unregister",
      [](uintptr_t ptr, size_t n) {
        ReleaseGil release;
        return tb::cuda::host_unregister(reinterpret_cast<void*>(ptr), n);
      },
      py::arg("address"), py::arg("nbytes"));
  m.def(
      "array_span",
      [](py::array a) {
        const tb::ByteSpan s = byte_span(a);
        return py::make_tuple(s.begin, s.size());
      },
      py::arg("array"), "(address, nbytes) of the memory an array's elements span.");
  m.def(
      "is_host_pinned",
      [](py::array a, int device) {
        const tb::ByteSpan s = byte_span(a);
        ReleaseGil release;
        return tb::cuda::is_host_pinned(reinterpret_cast<const void*>(s.begin), s.size(), device);
      },
      py::arg("array"), py::arg("device") = -1,
      "True when all the memory the array's elements span is page-locked (asked with\n"
      "device current; -1: one the engine works on).");
#endif
}
