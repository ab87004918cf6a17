// tensorbridge._C_testing: what the test suite drives and production never carries.
//
// The transfer pipeline and pinned pool on the host-only engine (copies run on a worker
// thread, so a GPU-less machine tests the real scheduling), the chunk planner and pool
// size classes, and the CUDA engine's fault switch (which lives in _C: reached through
// the capsule _C exports in testing builds). Built only with -DTB_TESTING=ON.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "bindings_util.h"
#include "core/numa.h"
#include "core/pinned_pool.h"
#include "core/pipeline.h"
#include "testing/host_engine.h"

namespace py = pybind11;
using namespace tb::py_util;

namespace {

// The pipeline and pool on the host-only engine: what the CPU test suite drives.
// "Device memory" is a dense uint8 array.
class HostTransferTester {
 public:
  HostTransferTester(int delay_us, int64_t fail_pinning_after, size_t budget,
                     int64_t fail_copy_after)
      : engine_(std::make_unique<tb::HostEngine>(delay_us, fail_pinning_after, fail_copy_after)),
        pool_(std::make_unique<tb::PinnedPool>(*engine_, budget)) {}
  ~HostTransferTester() {
    if (engine_->forked()) {  // a forked child's copy: its threads and locks are the parent's
      (void)pool_.release();
      (void)engine_.release();
      return;
    }
    engine_->drain();  // before pending_ (destroyed after this body) lets the buffers go
    try {
      pool_->release_all();
    } catch (...) {  // (an armed fail_next_wait: the pool's destructor frees the blocks,
    }  //  whose copies have all run)
  }
  py::dict to_host(py::array device, py::array dst, size_t chunk, int buffers, int swap,
                   int threads) {
    const auto view = host_view(dst, true);
    check_device(device, view);
    const void* src = device.data();
    auto options = pipeline_options(chunk, buffers, swap);
    options.threads = threads;
    engine_->enter_thread();  // (as the CUDA entry points make the device current)
    tb::PipelineReport r;
    {
      ReleaseGil release;
      r = tb::copy_to_host(*engine_, *pool_, 0, src, view, options);
    }
    return report_dict(r);
  }
  py::dict to_device(py::array src, py::array device, size_t chunk, int buffers, int swap,
                     int threads) {
    const auto view = host_view(src, false);
    check_device(device, view);
    void* dst = device.mutable_data();
    // The queued copies write into `device` later: hold it until drain().
    pending_.push_back(device);
    auto options = pipeline_options(chunk, buffers, swap);
    options.threads = threads;
    engine_->enter_thread();
    tb::PipelineReport r;
    {
      ReleaseGil release;
      r = tb::copy_to_device(*engine_, *pool_, 0, view, dst, options);
    }
    return report_dict(r);
  }
  py::dict to_device_many(const py::list& srcs, std::vector<size_t> offsets, py::array device,
                          size_t chunk, int buffers) {
    std::vector<tb::HostView> views;
    size_t end = 0;
    const std::vector<py::array> arrays = array_list(srcs);
    for (size_t i = 0; i < arrays.size(); ++i) {
      const size_t n = static_cast<size_t>(arrays[i].nbytes());
      views.push_back(host_view(arrays[i], false));
      if (i >= offsets.size()) continue;
      if (offsets[i] > SIZE_MAX - n) throw py::value_error("transfer: an offset is out of range");
      end = std::max(end, offsets[i] + n);
    }
    if (!(device.flags() & py::array::c_style))
      throw py::value_error("transfer: the device buffer must be C-contiguous");
    if (static_cast<size_t>(device.nbytes()) < end)
      throw py::value_error("transfer: the device buffer is too small");
    void* dst = device.mutable_data();
    pending_.push_back(device);
    engine_->enter_thread();
    tb::PipelineReport r;
    {
      ReleaseGil release;
      r = tb::copy_many_to_device(*engine_, *pool_, 0, views, offsets, dst,
                                  pipeline_options(chunk, buffers, 0));
    }
    return report_dict(r);
  }
  py::dict to_device_packed(const PackedArrays& layout, py::array device, size_t chunk, int buffers,
                            int threads, bool wait) {
    if (!(device.flags() & py::array::c_style) || device.itemsize() != 1)
      throw py::value_error("transfer: the device buffer must be C-contiguous bytes");
    if (static_cast<size_t>(device.nbytes()) < layout.nbytes())
      throw py::value_error("transfer: the device buffer is too small");
    if (!device.writeable()) throw py::value_error("transfer: the device buffer is read-only");
    layout.check_apart_from(byte_span(device));
    void* dst = device.mutable_data();
    pending_.push_back(device);
    auto options = pipeline_options(chunk, buffers, 0);
    options.threads = threads;
    options.wait = wait;
    engine_->enter_thread();
    tb::PipelineReport r;
    {
      ReleaseGil release;
      r = tb::copy_many_to_device(*engine_, *pool_, 0, layout.views(), layout.offsets(), dst,
                                  options);
    }
    return report_dict(r);
  }
  void drain() {
    // Only the buffers of copies queued before this call may go: another thread may queue
    // more (and push their buffers) while this one waits.
    std::vector<py::object> done = std::move(pending_);
    pending_.clear();
    {
      ReleaseGil release;
      engine_->drain();
    }
  }
  // One copy queued without waiting, as the CUDA path's page-locked copies are: the
  // handle owns the event and holds both arrays (and this tester) until it completes.
  std::unique_ptr<PendingCopy> copy_async(py::array device, py::array host, bool to_host,
                                          py::object self) {
    const py::array& written = to_host ? host : device;
    if (!(device.flags() & py::array::c_style) || !(host.flags() & py::array::c_style))
      throw py::value_error("copy_async: both arrays must be C-contiguous");
    if (device.nbytes() != host.nbytes())
      throw py::value_error("copy_async: the arrays must have the same size in bytes");
    if (!written.writeable()) throw py::value_error("copy_async: the destination is read-only");
    check_movable(device);
    check_movable(host);
    const size_t n = static_cast<size_t>(host.nbytes());
    engine_->enter_thread();
    tb::Event done(*engine_);
    if (to_host)
      engine_->copy_to_host_async(host.mutable_data(), device.data(), n, 0);
    else
      engine_->copy_to_device_async(device.mutable_data(), host.data(), n, 0);
    done.record(0);
    return std::make_unique<PendingCopy>(std::move(done), py::make_tuple(device, host),
                                         std::move(self));
  }
  void fail_next_wait() { engine_->fail_next_synchronize(); }
  py::dict stats() { return stats_dict(pool_->stats()); }
  void set_budget(size_t b) { pool_->set_budget(b); }
  void trim() { pool_->trim(); }
  bool reserve(size_t b) { return pool_->reserve(b); }
  void unreserve(size_t b) { pool_->unreserve(b); }
  size_t reserved() { return pool_->reserved(); }
  int64_t live_pinned() const { return engine_->live_pinned(); }
  int64_t pinned_allocations() const { return engine_->pinned_allocations(); }

 private:
  static void check_device(const py::array& device, const tb::HostView& v) {
    check_movable(device);
    int64_t n = v.itemsize;
    for (int64_t d : v.shape) n *= d;
    if (!(device.flags() & py::array::c_style))
      throw py::value_error("transfer: the device buffer must be C-contiguous");
    if (device.nbytes() < n) throw py::value_error("transfer: the device buffer is too small");
  }
  std::unique_ptr<tb::HostEngine> engine_;
  std::unique_ptr<tb::PinnedPool> pool_;
  std::vector<py::object> pending_;  // device buffers with copies still queued
};

py::list plan_chunks(std::vector<int64_t> shape, int64_t itemsize, size_t chunk_bytes) {
  // (the planner's callers check these; a test driving it directly gets an error, not a
  // division by zero or an endless plan)
  if (itemsize <= 0 || chunk_bytes == 0)
    throw py::value_error("plan_chunks: itemsize and chunk_bytes must be positive");
  int64_t total = itemsize;
  for (int64_t n : shape) {
    if (n < 0) throw py::value_error("plan_chunks: negative dimension");
    if (n != 0 && total > (int64_t{1} << 48) / n)
      throw py::value_error("plan_chunks: the array would exceed 2**48 bytes");
    total *= n;
  }
  py::list out;
  for (const auto& c : tb::plan_chunks(tb::Dims(shape.begin(), shape.end()), itemsize, chunk_bytes))
    out.append(py::make_tuple(c.offset, c.bytes, c.depth, c.prefix, c.begin, c.end));
  return out;
}

// Sets the CUDA engine's copy fault switch in tensorbridge._C (-1: off).
void cuda_inject_copy_fault(int64_t after) {
  py::module_ C = py::module_::import("tensorbridge._C");
  if (!py::hasattr(C, "_testing_copy_fault"))
    throw py::value_error(
        "tensorbridge._C has no fault switch: it was built without CUDA or with "
        "-DTB_TESTING=OFF; rebuild with the testing option on to run this test");
  auto capsule = C.attr("_testing_copy_fault").cast<py::capsule>();
  if (std::string(capsule.name()) != "tensorbridge._C.copy_fault")
    throw py::value_error("tensorbridge._C's fault switch has an unexpected name");
  auto* fn = static_cast<void (*const*)(int64_t)>(capsule.get_pointer());
  (*fn)(after);
}

// Maps ordinary memory the way the CUDA engine maps a staging block on a NUMA node
// (core/numa.h), asks the kernel what it did, and unmaps it: the placement step without
// the GPU. preferred_*: the policy's node (-1: another policy, < -1: -errno of the query);
// page_*: the node holding the first and last page.
py::dict numa_map_probe(size_t nbytes, int node) {
  if (nbytes > (size_t{1} << 32)) throw py::value_error("numa_map_probe: at most 4 GiB");
  const tb::numa::Mapping m = tb::numa::map_preferring(nbytes, node);
  const char* last = static_cast<const char*>(m.ptr) + m.size - 1;
  py::dict d;
  d["size"] = m.size;
  d["mbind_errno"] = m.error;
  d["preferred_first"] = tb::numa::preferred_node(m.ptr);
  d["preferred_last"] = tb::numa::preferred_node(last);
  d["page_first"] = tb::numa::page_node(m.ptr);
  d["page_last"] = tb::numa::page_node(last);
  tb::numa::unmap(m.ptr, m.size);
  return d;
}

// The policy of ordinary (heap) memory: what an unplaced block would have.
int numa_preferred_node_of(py::array a) { return tb::numa::preferred_node(a.data()); }

}  // namespace

PYBIND11_MODULE(_C_testing, m) {
  m.doc() = "tensorbridge's test-only compiled helpers (never in release builds)";
  // PendingCopy is registered by tensorbridge._C; the copies made here return it too.
  py::module_::import("tensorbridge._C");
  py::class_<HostTransferTester>(m, "HostTransferTester",
                                 "The transfer pipeline and pinned pool on a host-only engine "
                                 "(copies run on a worker thread), for tests without a GPU.")
      .def(py::init<int, int64_t, size_t, int64_t>(), py::arg("delay_us") = 0,
           py::arg("fail_pinning_after") = -1, py::arg("budget") = size_t{1} << 30,
           py::arg("fail_copy_after") = -1)
      .def("to_host", &HostTransferTester::to_host, py::arg("device"), py::arg("dst"),
           py::arg("chunk_bytes") = 0, py::arg("buffers") = 0, py::arg("swap_unit") = 0,
           py::arg("threads") = 0)
      .def("to_device", &HostTransferTester::to_device, py::arg("src"), py::arg("device"),
           py::arg("chunk_bytes") = 0, py::arg("buffers") = 0, py::arg("swap_unit") = 0,
           py::arg("threads") = 0)
      .def("to_device_many", &HostTransferTester::to_device_many, py::arg("srcs"),
           py::arg("offsets"), py::arg("device"), py::arg("chunk_bytes") = 0,
           py::arg("buffers") = 0)
      .def("to_device_packed", &HostTransferTester::to_device_packed, py::arg("layout"),
           py::arg("device"), py::arg("chunk_bytes") = 0, py::arg("buffers") = 0,
           py::arg("threads") = 0, py::arg("wait") = false,
           "A PackedArrays layout -> device (uint8), as the CUDA batch path sends it.")
      .def(
          "copy_async",
          [](py::object self, py::array device, py::array host, bool to_host) {
            auto& tester = self.cast<HostTransferTester&>();
            return tester.copy_async(std::move(device), std::move(host), to_host, std::move(self));
          },
          py::arg("device"), py::arg("host"), py::arg("to_host"),
          "One copy queued without waiting; returns a tensorbridge._C.PendingCopy.")
      .def("fail_next_wait", &HostTransferTester::fail_next_wait,
           "The engine's next event wait fails, as a device error would.")
      .def("drain", &HostTransferTester::drain)
      .def("stats", &HostTransferTester::stats)
      .def("set_budget", &HostTransferTester::set_budget, py::arg("bytes"))
      .def("trim", &HostTransferTester::trim)
      .def("reserve", &HostTransferTester::reserve, py::arg("bytes"),
           "Take bytes of the budget for memory pinned outside the pool; False if no room.")
      .def("unreserve", &HostTransferTester::unreserve, py::arg("bytes"))
      .def_property_readonly("reserved", &HostTransferTester::reserved)
      .def_property_readonly("live_pinned", &HostTransferTester::live_pinned)
      .def_property_readonly("pinned_allocations", &HostTransferTester::pinned_allocations);
  m.def("plan_chunks", &plan_chunks, py::arg("shape"), py::arg("itemsize"), py::arg("chunk_bytes"),
        "The pipeline's chunks: (offset, bytes, depth, prefix, begin, end).");
  m.def(
      "pool_size_class",
      [](size_t nbytes) {
        if (nbytes > (size_t{1} << 48)) throw py::value_error("pool_size_class: over 2**48 bytes");
        return tb::PinnedPool::size_class(nbytes);
      },
      py::arg("nbytes"));
  m.def("numa_map_probe", &numa_map_probe, py::arg("nbytes"), py::arg("node"),
        "Map nbytes preferring a NUMA node as the CUDA engine does; what the kernel did.");
  m.def("numa_preferred_node_of", &numa_preferred_node_of, py::arg("array"),
        "The node the memory policy at an array's first byte prefers (-1: no preference).");
  m.def("cuda_inject_copy_fault", &cuda_inject_copy_fault, py::arg("after"),
        "The copy after `after` more succeed fails with a CUDA error (-1: off).");
}
