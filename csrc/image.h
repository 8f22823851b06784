// Plain image views and the per-thread scratch memory every stage draws from.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace speciesclf {

// Interleaved 8-bit RGB rows; the memory belongs to someone else.
struct RgbView {
  const uint8_t* data = nullptr;
  int width = 0;
  int height = 0;
  std::ptrdiff_t row_stride = 0;  // bytes
};

// A growable byte buffer that keeps its capacity across images, so steady state allocates nothing.
// Very large images would otherwise pin their memory for the thread's lifetime; release() drops it.
class ScratchBuffer {
 public:
  uint8_t* reserve(std::size_t bytes) {
    if (bytes > storage_.size()) storage_.resize(bytes);
    return storage_.data();
  }
  std::size_t capacity() const { return storage_.size(); }
  void release() { std::vector<uint8_t>().swap(storage_); }

 private:
  std::vector<uint8_t> storage_;
};

}  // namespace speciesclf
