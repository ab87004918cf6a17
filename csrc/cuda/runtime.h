// What the CUDA runtime reports about this machine, and page-locked host memory.
//
// Plain C++ interface (no CUDA headers) so the bindings compile with the host compiler.
// Everything here is asked at run time: a build machine with the toolkit but without
// a GPU produces a module that finds the GPU on the machine that has one.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace tb::cuda {

struct RuntimeInfo {
  int device_count = 0;
  int runtime_version = 0;  // e.g. 13000
  int driver_version = 0;   // 0 when no driver is installed
  std::string error;        // empty, or "cudaErrorNoDevice: no CUDA-capable device is detected"
  std::vector<std::string> device_names;
  std::vector<std::string> pci_bus_ids;  // per device, as CUDA spells them
                                         // ("00000000:3B:00.0"); "" where unknown
};

/// Asks the runtime for devices and versions; never throws, never aborts.
RuntimeInfo probe();

/// Page-locked host allocation, portable. numa_node < 0: cudaHostAlloc. Otherwise the
/// pages are mapped preferring that node (core/numa.h), then registered
/// (cudaHostRegister); where the kernel refuses the policy, cudaHostAlloc after all.
/// Throws std::runtime_error with the CUDA error name on failure.
void* host_alloc(size_t nbytes, int numa_node = -1);

/// Frees memory from host_alloc(); errors (e.g. a driver already shut down at exit) are ignored.
void host_free(void* ptr) noexcept;

/// What host_alloc() did with the NUMA nodes it was given, since the process started.
struct NumaStats {
  uint64_t placed = 0;   // allocations mapped preferring their node
  uint64_t refused = 0;  // allocations the kernel refused the policy for (made without it)
  int error = 0;         // errno of the last refusal (EPERM: a container without
                         // CAP_SYS_NICE), 0 when none
};
NumaStats numa_stats();

/// True when ptr lies in page-locked memory known to the CUDA driver.
bool is_host_pinned(const void* ptr) noexcept;
/// True when the whole byte range [ptr, ptr + n) is page-locked (its first and last byte
/// are, in the same kind of memory).
bool is_host_range_pinned(const void* ptr, size_t n) noexcept;

}  // namespace tb::cuda
