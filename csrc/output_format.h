// How one resized pixel lands in its slot of the output batch: normalised through the per-channel table,
// converted to the output dtype and placed by the layout. Shared by the CUDA kernel and its CPU twin.
#pragma once

#include <cstdint>
#include <cstring>

#include "resample_math.h"  // SPECIESCLF_HD

namespace speciesclf {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kUInt8 = 2, kBFloat16 = 3 };
enum class Layout : int { kNCHW = 0, kNHWC = 1 };

SPECIESCLF_HD inline int dtype_size(DType dtype) {
  return dtype == DType::kFloat32 ? 4 : dtype == DType::kUInt8 ? 1 : 2;
}

SPECIESCLF_HD inline uint32_t float_bits(float value) {
  uint32_t x;
  memcpy(&x, &value, sizeof x);
  return x;
}

// IEEE binary16, round to nearest even: the bits numpy's and torch's float16 conversions produce.
SPECIESCLF_HD inline uint16_t float_to_half(float value) {
  const uint32_t x = float_bits(value);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t exponent = (x >> 23) & 0xFFu;
  uint32_t mantissa = x & 0x7FFFFFu;
  if (exponent == 0xFF) return uint16_t(sign | 0x7C00u | (mantissa ? 0x200u : 0u));
  const int e = int(exponent) - 127 + 15;
  if (e >= 0x1F) return uint16_t(sign | 0x7C00u);
  if (e <= 0) {
    if (e < -10) return uint16_t(sign);
    mantissa |= 0x800000u;
    const int shift = 14 - e;
    uint32_t half = mantissa >> shift;
    const uint32_t rest = mantissa & ((1u << shift) - 1), halfway = 1u << (shift - 1);
    if (rest > halfway || (rest == halfway && (half & 1u))) ++half;
    return uint16_t(sign | half);
  }
  uint32_t half = sign | (uint32_t(e) << 10) | (mantissa >> 13);
  const uint32_t rest = mantissa & 0x1FFFu;
  if (rest > 0x1000u || (rest == 0x1000u && (half & 1u))) ++half;  // a carry correctly bumps the exponent
  return uint16_t(half);
}

// bfloat16, round to nearest even: the bits torch's float32 -> bfloat16 conversion produces.
SPECIESCLF_HD inline uint16_t float_to_bfloat16(float value) {
  const uint32_t x = float_bits(value);
  if ((x & 0x7F800000u) == 0x7F800000u && (x & 0x7FFFFFu)) return uint16_t((x >> 16) | 0x40u);  // quiet NaN
  return uint16_t((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}

struct OutputFormat {
  int size = 224;           // the slot is size x size pixels
  DType dtype = DType::kFloat32;
  Layout layout = Layout::kNCHW;
  const float* table = nullptr;  // [3][256]: pixel value -> normalised value (float dtypes)
};

SPECIESCLF_HD inline std::size_t slot_bytes(const OutputFormat& f) {
  return std::size_t(f.size) * f.size * 3 * dtype_size(f.dtype);
}

// Writes pixel (row, col) of one slot.
SPECIESCLF_HD inline void write_output_pixel(uint8_t* slot, const OutputFormat& f, int row, int col,
                                             const uint8_t rgb[3]) {
  const std::size_t plane = std::size_t(f.size) * f.size;
  const std::size_t pixel = std::size_t(row) * f.size + col;
  for (int c = 0; c < 3; ++c) {
    const std::size_t index = f.layout == Layout::kNCHW ? c * plane + pixel : pixel * 3 + c;
    switch (f.dtype) {
      case DType::kUInt8: slot[index] = rgb[c]; break;
      case DType::kFloat32: reinterpret_cast<float*>(slot)[index] = f.table[c * 256 + rgb[c]]; break;
      case DType::kFloat16:
        reinterpret_cast<uint16_t*>(slot)[index] = float_to_half(f.table[c * 256 + rgb[c]]);
        break;
      case DType::kBFloat16:
        reinterpret_cast<uint16_t*>(slot)[index] = float_to_bfloat16(f.table[c * 256 + rgb[c]]);
        break;
    }
  }
}

}  // namespace speciesclf
