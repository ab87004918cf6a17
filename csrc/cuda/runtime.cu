#include <cuda_runtime.h>

#include <atomic>
#include <map>
#include <mutex>

#include "core/numa.h"
#include "cuda/error.h"
#include "cuda/runtime.h"

namespace tb::cuda {
namespace {

// Blocks host_alloc() mapped on a node (registered, not cudaHostAlloc'ed): address ->
// mapped size, for host_free(). Leaked at exit, like everything the engine holds.
std::mutex g_mapped_mutex;
auto* g_mapped = new std::map<void*, size_t>();
NumaStats g_numa;  // under g_mapped_mutex
// Set at the first refusal: the kernel will refuse every later mbind too (a seccomp
// filter, a missing capability), so later blocks skip the mapping they would undo.
std::atomic<bool> g_policy_refused{false};

}  // namespace

RuntimeInfo probe() {
  RuntimeInfo info;
  cudaRuntimeGetVersion(&info.runtime_version);
  if (cudaDriverGetVersion(&info.driver_version) != cudaSuccess) info.driver_version = 0;
  const cudaError_t err = cudaGetDeviceCount(&info.device_count);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    info.device_count = 0;
    info.error = std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
    return info;
  }
  for (int d = 0; d < info.device_count; ++d) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, d) == cudaSuccess)
      info.device_names.emplace_back(prop.name);
    else
      info.device_names.emplace_back("unknown");
    char bus_id[32] = {};  // "00000000:3B:00.0" and its terminator fit in 17
    if (cudaDeviceGetPCIBusId(bus_id, sizeof(bus_id), d) == cudaSuccess) {
      info.pci_bus_ids.emplace_back(bus_id);
    } else {
      (void)cudaGetLastError();
      info.pci_bus_ids.emplace_back();
    }
  }
  return info;
}

void* host_alloc(size_t nbytes, int numa_node) {
  if (numa_node >= 0 && g_policy_refused.load(std::memory_order_relaxed)) {
    std::lock_guard<std::mutex> lock(g_mapped_mutex);
    ++g_numa.refused;
  } else if (numa_node >= 0) {
    const numa::Mapping m = numa::map_preferring(nbytes, numa_node);
    if (m.error == 0) {
      const cudaError_t err = cudaHostRegister(m.ptr, m.size, cudaHostRegisterPortable);
      if (err != cudaSuccess) {
        numa::unmap(m.ptr, m.size);
        TB_CUDA_CHECK(err);
      }
      std::lock_guard<std::mutex> lock(g_mapped_mutex);
      try {
        g_mapped->emplace(m.ptr, m.size);
      } catch (...) {
        (void)cudaHostUnregister(m.ptr);
        numa::unmap(m.ptr, m.size);
        throw;
      }
      ++g_numa.placed;
      return m.ptr;
    }
    // The kernel refused the policy (seccomp, no CAP_SYS_NICE): the pages would land
    // wherever this thread runs, which is what cudaHostAlloc does too.
    numa::unmap(m.ptr, m.size);
    g_policy_refused.store(true, std::memory_order_relaxed);
    std::lock_guard<std::mutex> lock(g_mapped_mutex);
    ++g_numa.refused;
    g_numa.error = m.error;
  }
  void* ptr = nullptr;
  TB_CUDA_CHECK(cudaHostAlloc(&ptr, nbytes == 0 ? 1 : nbytes, cudaHostAllocPortable));
  return ptr;
}

void host_free(void* ptr) noexcept {
  if (ptr == nullptr) return;
  size_t mapped = 0;
  {
    std::lock_guard<std::mutex> lock(g_mapped_mutex);
    auto it = g_mapped->find(ptr);
    if (it != g_mapped->end()) {
      mapped = it->second;
      g_mapped->erase(it);
    }
  }
  if (mapped != 0) {
    if (cudaHostUnregister(ptr) != cudaSuccess) {
      (void)cudaGetLastError();
      return;  // still registered as far as we know: leak it rather than unmap pinned pages
    }
    numa::unmap(ptr, mapped);
    return;
  }
  if (cudaFreeHost(ptr) != cudaSuccess) (void)cudaGetLastError();
}

NumaStats numa_stats() {
  std::lock_guard<std::mutex> lock(g_mapped_mutex);
  return g_numa;
}

bool is_host_pinned(const void* ptr) noexcept {
  cudaPointerAttributes attr{};
  if (cudaPointerGetAttributes(&attr, ptr) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return attr.type == cudaMemoryTypeHost;
}

}  // namespace tb::cuda

namespace tb::cuda {

bool is_host_range_pinned(const void* ptr, size_t n) noexcept {
  if (n == 0) return false;
  return is_host_pinned(ptr) && is_host_pinned(static_cast<const char*>(ptr) + n - 1);
}

}  // namespace tb::cuda
