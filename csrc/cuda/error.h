// One checking macro for every CUDA runtime call: the message (with the CUDA error
// name, file and line) is built only on failure, never on the hot path.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace tb::cuda {

class CudaError : public std::runtime_error {
 public:
  CudaError(cudaError_t code, const char* expr, const char* file, int line)
      : std::runtime_error(format(code, expr, file, line)), code_(code) {}
  cudaError_t code() const noexcept { return code_; }

  static std::string format(cudaError_t code, const char* expr, const char* file, int line) {
    return std::string(cudaGetErrorName(code)) + ": " + cudaGetErrorString(code) + " (" + expr +
           " at " + file + ":" + std::to_string(line) + ")";
  }

 private:
  cudaError_t code_;
};

}  // namespace tb::cuda

#define TB_CUDA_CHECK(expr)                                            \
  do {                                                                 \
    const cudaError_t tb_err_ = (expr);                                \
    if (tb_err_ != cudaSuccess) {                                      \
      (void)cudaGetLastError(); /* clear a sticky-free error state */  \
      throw ::tb::cuda::CudaError(tb_err_, #expr, __FILE__, __LINE__); \
    }                                                                  \
  } while (0)
