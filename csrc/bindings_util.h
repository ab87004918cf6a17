// Argument conversions shared by the two pybind11 modules (_C and _C_testing).
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <vector>

#include "core/pinned_pool.h"
#include "core/pipeline.h"

namespace tb::py_util {

namespace py = pybind11;

inline std::vector<int64_t> shape_of(const py::array& a) {
  return std::vector<int64_t>(a.shape(), a.shape() + a.ndim());
}
inline std::vector<int64_t> strides_of(const py::array& a) {
  return std::vector<int64_t>(a.strides(), a.strides() + a.ndim());
}

inline HostView host_view(const py::array& a, bool writeable) {
  if (writeable && !a.writeable()) throw py::value_error("transfer: the host array is read-only");
  HostView v;
  v.data = static_cast<char*>(const_cast<void*>(a.data()));
  v.shape = shape_of(a);
  v.strides = strides_of(a);
  v.itemsize = a.itemsize();
  return v;
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

}  // namespace tb::py_util
