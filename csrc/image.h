// Plain image views and the per-thread scratch memory every stage draws from.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace speciesclf {

// Interleaved 8-bit RGB rows; the memory belongs to someone else. A decoder may hold only part of the
// image: `data` is then pixel (x_offset, y_offset), and width/height stay those of the whole image.
struct RgbView {
  const uint8_t* data = nullptr;
  int width = 0;
  int height = 0;
  std::ptrdiff_t row_stride = 0;  // bytes
  int x_offset = 0;
  int y_offset = 0;

  const uint8_t* pixel(int x, int y) const {
    return data + std::ptrdiff_t(y - y_offset) * row_stride + std::ptrdiff_t(x - x_offset) * 3;
  }
};

// A rectangle of pixels [x0, x1) x [y0, y1).
struct Region {
  int x0 = 0, y0 = 0, x1 = 0, y1 = 0;
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
  // A rare huge image should not pin its memory for the life of the thread.
  void trim() {
    if (capacity() > kKeepBytes) release();
  }
  static constexpr std::size_t kKeepBytes = 64u << 20;

 private:
  std::vector<uint8_t> storage_;
};

}  // namespace speciesclf
