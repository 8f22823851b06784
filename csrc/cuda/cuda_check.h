// CUDA runtime failures become CudaFailure, which the module maps to speciesclf.errors.CudaError.
#pragma once

#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>

namespace speciesclf {

class CudaFailure : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

inline void cuda_check(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    throw CudaFailure(std::string(what) + ": " + cudaGetErrorName(status) + " (" + cudaGetErrorString(status) + ")");
}

}  // namespace speciesclf
