// Grow-only device and pinned host buffers: a pipeline allocates while it warms up, then reuses.
// Growing frees the old block, so it is only done between batches, when the stream is idle.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "cuda_check.h"

namespace speciesclf {

template <bool kPinnedHost>
class GrowOnlyBuffer {
 public:
  GrowOnlyBuffer() = default;
  GrowOnlyBuffer(const GrowOnlyBuffer&) = delete;
  GrowOnlyBuffer& operator=(const GrowOnlyBuffer&) = delete;
  ~GrowOnlyBuffer() { release(); }

  uint8_t* reserve(std::size_t bytes) {
    if (bytes <= capacity_) return data_;
    release();
    const std::size_t grown = bytes + bytes / 4;  // room for the next, slightly larger batch
    void* p = nullptr;
    if (kPinnedHost)
      cuda_check(cudaHostAlloc(&p, grown, cudaHostAllocDefault), "cudaHostAlloc");
    else
      cuda_check(cudaMalloc(&p, grown), "cudaMalloc");
    data_ = static_cast<uint8_t*>(p);
    capacity_ = grown;
    return data_;
  }
  uint8_t* data() const { return data_; }
  std::size_t capacity() const { return capacity_; }
  void release() {
    if (data_ == nullptr) return;
    if (kPinnedHost)
      cudaFreeHost(data_);
    else
      cudaFree(data_);
    data_ = nullptr;
    capacity_ = 0;
  }

 private:
  uint8_t* data_ = nullptr;
  std::size_t capacity_ = 0;
};

using DeviceBuffer = GrowOnlyBuffer<false>;
using PinnedBuffer = GrowOnlyBuffer<true>;

}  // namespace speciesclf
