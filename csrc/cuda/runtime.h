// What the CUDA runtime reports about this machine, and page-locked host memory.
//
// Plain C++ interface (no CUDA headers) so the bindings compile with the host compiler.
// Everything here is asked at run time: a build machine with the toolkit but without
// a GPU produces a module that finds the GPU on the machine that has one.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

namespace tb::cuda {

struct RuntimeInfo {
  int device_count = 0;
  int runtime_version = 0;  // e.g. 13000
  int driver_version = 0;   // 0 when no driver is installed
  std::string error;        // empty, or "cudaErrorNoDevice: no CUDA-capable device is detected"
  std::vector<std::string> device_names;
};

/// Asks the runtime for devices and versions; never throws, never aborts.
RuntimeInfo probe();

/// Page-locked host allocation (cudaHostAlloc, portable). Throws std::runtime_error
/// with the CUDA error name on failure.
void* host_alloc(size_t nbytes);

/// Frees memory from host_alloc(); errors (e.g. a driver already shut down at exit) are ignored.
void host_free(void* ptr) noexcept;

/// True when ptr lies in page-locked memory known to the CUDA driver.
bool is_host_pinned(const void* ptr) noexcept;
/// True when the whole byte range [ptr, ptr + n) is page-locked (its first and last byte
/// are, in the same kind of memory).
bool is_host_range_pinned(const void* ptr, size_t n) noexcept;

}  // namespace tb::cuda
