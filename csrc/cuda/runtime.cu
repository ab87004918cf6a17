#include <cuda_runtime.h>

#include "cuda/error.h"
#include "cuda/runtime.h"

namespace tb::cuda {

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
  }
  return info;
}

void* host_alloc(size_t nbytes) {
  void* ptr = nullptr;
  TB_CUDA_CHECK(cudaHostAlloc(&ptr, nbytes == 0 ? 1 : nbytes, cudaHostAllocPortable));
  return ptr;
}

void host_free(void* ptr) noexcept {
  if (ptr != nullptr && cudaFreeHost(ptr) != cudaSuccess) (void)cudaGetLastError();
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
