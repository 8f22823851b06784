#include "resample.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#if defined(__AVX2__)
#include <immintrin.h>
#elif defined(__SSE4_1__)
#include <smmintrin.h>
#endif

namespace speciesclf {

void plan_axis(AxisPlan& plan, Filter filter, double in0, double in1, int in_size, int out_size, int out_first,
               int out_count) {
  plan.taps = axis_taps(filter, in0, in1, out_size);
  plan.weights.resize(std::size_t(out_count) * plan.taps);
  plan.first.resize(out_count);
  plan.count.resize(out_count);
  plan.input_begin = in_size;
  plan.input_end = 0;
  plan.real_weights.resize(plan.taps);
  for (int j = 0; j < out_count; ++j) {
    int count;
    const int first = axis_sample_weights(filter, in0, in1, in_size, out_size, out_first + j, plan.taps,
                                          plan.real_weights.data(), &plan.weights[std::size_t(j) * plan.taps], &count);
    plan.first[j] = first;
    plan.count[j] = count;
    plan.input_begin = std::min(plan.input_begin, first);
    plan.input_end = std::max(plan.input_end, first + count);
  }
  if (plan.input_end < plan.input_begin) plan.input_end = plan.input_begin;
}

Region plan_resize_crop(int src_width, int src_height, const ResizeCrop& rc, ResampleScratch& s) {
  plan_axis(s.horizontal, rc.filter, rc.box[0], rc.box[2], src_width, rc.resized_width, rc.crop_x, rc.out_width);
  plan_axis(s.vertical, rc.filter, rc.box[1], rc.box[3], src_height, rc.resized_height, rc.crop_y, rc.out_height);
  Region r;
  r.x0 = s.horizontal.input_begin;
  r.x1 = s.horizontal.input_end;
  r.y0 = s.vertical.input_begin;
  r.y1 = s.vertical.input_end;
  return r;
}

void vertical_taps(const uint8_t* top, std::ptrdiff_t stride, int length, const int32_t* k, int n,
                   int32_t* accumulator, uint8_t* out) {
  std::fill(accumulator, accumulator + length, fixed_rounding_bias());
  for (int t = 0; t < n; ++t) {
    const uint8_t* in = top + std::ptrdiff_t(t) * stride;
    const int32_t w = k[t];
    for (int x = 0; x < length; ++x) accumulator[x] += in[x] * w;
  }
  for (int x = 0; x < length; ++x) out[x] = fixed_to_u8(accumulator[x]);
}

namespace {

// Exact window: count[j] taps.
inline void horizontal_pixel(const uint8_t* p, const int32_t* k, int n, uint8_t* out) {
  int32_t r = fixed_rounding_bias(), g = r, b = r;
  for (int t = 0; t < n; ++t) {
    r += p[3 * t] * k[t];
    g += p[3 * t + 1] * k[t];
    b += p[3 * t + 2] * k[t];
  }
  out[0] = fixed_to_u8(r);
  out[1] = fixed_to_u8(g);
  out[2] = fixed_to_u8(b);
}

// Every output pixel reads exactly Taps inputs (the weights past its window are zero), so the loop
// has a fixed trip count the compiler unrolls. Pixels whose fixed window would run past the readable
// bytes take the exact-window path.
template <int Taps>
void horizontal_fixed(const uint8_t* row, int available, const AxisPlan& plan, uint8_t* out) {
  const int out_width = int(plan.first.size());
  const int begin = plan.input_begin;
#if defined(__SSE4_1__)
  const __m128i bias = _mm_set1_epi32(fixed_rounding_bias());
#endif
  int j = 0;
#if defined(__AVX2__)
  // Two output pixels per vector, one in each 128-bit half, with the arithmetic of the one-pixel loop
  // below (this pass is about an eighth of a JPEG's preprocessing time). Windows only move right along
  // the row, so once the second pixel's would read past the row, the rest go one by one.
  const __m256i bias2 = _mm256_set1_epi32(fixed_rounding_bias());
  for (; j + 1 < out_width; j += 2) {
    const int start0 = plan.first[j] - begin, start1 = plan.first[j + 1] - begin;
    if (std::ptrdiff_t(start1 + Taps) * 3 + 1 > std::ptrdiff_t(available) * 3) break;
    const int32_t* k0 = &plan.weights[std::size_t(j) * Taps];
    const int32_t* k1 = k0 + Taps;
    const uint8_t* p0 = row + std::ptrdiff_t(start0) * 3;
    const uint8_t* p1 = row + std::ptrdiff_t(start1) * 3;
    __m256i acc = bias2;
    for (int t = 0; t < Taps; ++t) {
      int32_t a, b;
      std::memcpy(&a, p0 + 3 * t, 4);
      std::memcpy(&b, p1 + 3 * t, 4);
      const __m256i v = _mm256_cvtepu8_epi32(_mm_insert_epi32(_mm_cvtsi32_si128(a), b, 1));
      const __m256i w = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_set1_epi32(k0[t])),
                                                _mm_set1_epi32(k1[t]), 1);
      acc = _mm256_add_epi32(acc, _mm256_mullo_epi32(v, w));
    }
    acc = _mm256_srai_epi32(acc, kPrecisionBits);
    // The packs work within each half: byte 0..3 of each half is its pixel's RGBx.
    const __m256i packed = _mm256_packus_epi16(_mm256_packs_epi32(acc, acc), _mm256_setzero_si256());
    const int32_t rgbx0 = _mm_cvtsi128_si32(_mm256_castsi256_si128(packed));
    const int32_t rgbx1 = _mm_cvtsi128_si32(_mm256_extracti128_si256(packed, 1));
    std::memcpy(out + 3 * j, &rgbx0, 4);
    std::memcpy(out + 3 * (j + 1), &rgbx1, 4);  // after pixel j: overwrites its spare 4th byte
  }
#endif
  for (; j < out_width; ++j) {
    const int32_t* k = &plan.weights[std::size_t(j) * Taps];
    const int start = plan.first[j] - begin;
    const uint8_t* p = row + std::ptrdiff_t(start) * 3;
    // The SIMD loads read 4 bytes per pixel: one past the last pixel of the window.
    if (std::ptrdiff_t(start + Taps) * 3 + 1 > std::ptrdiff_t(available) * 3) {
      horizontal_pixel(p, k, plan.count[j], out + 3 * j);
      continue;
    }
#if defined(__SSE4_1__)
    // One pixel's three channels share a vector: a 4-byte load widened to int32 lanes (the 4th lane is
    // the next pixel's and is discarded), times the tap's weight. The same integer sums as the scalar path.
    __m128i acc = bias;
    for (int t = 0; t < Taps; ++t) {
      int32_t pixel;
      std::memcpy(&pixel, p + 3 * t, 4);
      const __m128i v = _mm_cvtepu8_epi32(_mm_cvtsi32_si128(pixel));
      acc = _mm_add_epi32(acc, _mm_mullo_epi32(v, _mm_set1_epi32(k[t])));
    }
    acc = _mm_srai_epi32(acc, kPrecisionBits);
    const __m128i packed = _mm_packus_epi16(_mm_packs_epi32(acc, acc), _mm_setzero_si128());
    const int32_t rgbx = _mm_cvtsi128_si32(packed);
    std::memcpy(out + 3 * j, &rgbx, 4);  // the 4th byte is overwritten by the next pixel (or slack)
#else
    horizontal_pixel(p, k, Taps, out + 3 * j);
#endif
  }
}

void horizontal_exact(const uint8_t* row, const AxisPlan& plan, uint8_t* out) {
  const int out_width = int(plan.first.size());
  for (int j = 0; j < out_width; ++j)
    horizontal_pixel(row + std::ptrdiff_t(plan.first[j] - plan.input_begin) * 3,
                     &plan.weights[std::size_t(j) * plan.taps], plan.count[j], out + 3 * j);
}

}  // namespace

void horizontal_taps(const uint8_t* row, int available, const AxisPlan& plan, uint8_t* out) {
  switch (plan.taps) {
    case 3: return horizontal_fixed<3>(row, available, plan, out);
    case 5: return horizontal_fixed<5>(row, available, plan, out);
    case 7: return horizontal_fixed<7>(row, available, plan, out);
    case 9: return horizontal_fixed<9>(row, available, plan, out);
    case 11: return horizontal_fixed<11>(row, available, plan, out);
    default: return horizontal_exact(row, plan, out);
  }
}

}  // namespace speciesclf
