// Per-sample resampling math, shared by the CPU kernels and (with nvcc) the CUDA kernels.
// It reproduces Pillow's convolution resize: filter weights computed in double, normalised, then
// rounded to 22-bit fixed point, with 8-bit rounding after each of the two separable passes.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SPECIESCLF_HD __host__ __device__
#else
#define SPECIESCLF_HD
#endif

namespace speciesclf {

enum class Filter : int { kBilinear = 0, kBicubic = 1 };

// 32 bits less 8 for the sample and 2 of headroom for negative lobes and rounding.
constexpr int kPrecisionBits = 32 - 8 - 2;

SPECIESCLF_HD inline double filter_support(Filter filter) { return filter == Filter::kBicubic ? 2.0 : 1.0; }

SPECIESCLF_HD inline double filter_weight(Filter filter, double x) {
  if (x < 0.0) x = -x;
  if (filter == Filter::kBilinear) return x < 1.0 ? 1.0 - x : 0.0;
  const double a = -0.5;  // Keys' cubic as Pillow uses it
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
  if (x < 2.0) return (((x - 5.0) * x + 8.0) * x - 4.0) * a;
  return 0.0;
}

SPECIESCLF_HD inline int32_t to_fixed(double weight) {
  const double scaled = weight * double(1 << kPrecisionBits);
  return int32_t(weight < 0.0 ? scaled - 0.5 : scaled + 0.5);
}

// The accumulator starts at half a unit so that the shift rounds to nearest.
SPECIESCLF_HD inline int32_t fixed_rounding_bias() { return 1 << (kPrecisionBits - 1); }

SPECIESCLF_HD inline uint8_t fixed_to_u8(int32_t acc) {
  const int32_t v = acc >> kPrecisionBits;
  return uint8_t(v < 0 ? 0 : (v > 255 ? 255 : v));
}

// Where output sample `index` of a resize of [in0, in1) to out_size samples reads its input:
// inputs [*first, *first + *count) of in_size. Returns the filter scale (>= 1 when shrinking).
SPECIESCLF_HD inline double sample_window(Filter filter, double in0, double in1, int in_size, int out_size,
                                          int index, double* center_out, int* first, int* count) {
  const double scale = (in1 - in0) / out_size;
  const double filter_scale = scale < 1.0 ? 1.0 : scale;
  const double support = filter_support(filter) * filter_scale;
  const double center = in0 + (index + 0.5) * scale;
  int lo = int(center - support + 0.5);
  if (lo < 0) lo = 0;
  int hi = int(center + support + 0.5);
  if (hi > in_size) hi = in_size;
  if (hi < lo) hi = lo;  // a window outside the image is empty, never negative (callers size buffers from it)
  *center_out = center;
  *first = lo;
  *count = hi - lo;
  return filter_scale;
}

// Weights stored per output sample along an axis: enough for the widest window of this resize.
SPECIESCLF_HD inline int axis_taps(Filter filter, double in0, double in1, int out_size) {
  const double scale = (in1 - in0) / out_size;
  const double support = filter_support(filter) * (scale < 1.0 ? 1.0 : scale);
  int whole = int(support);
  if (whole < support) ++whole;  // ceil, without <cmath> on the device
  return whole * 2 + 1;
}

// The fixed-point filter of output sample `index`: fills fixed[0, taps) (zeros past the window),
// sets *count and returns the first input sample. `real` is scratch for `taps` doubles.
SPECIESCLF_HD inline int axis_sample_weights(Filter filter, double in0, double in1, int in_size, int out_size,
                                             int index, int taps, double* real, int32_t* fixed, int* count) {
  double center;
  int first, n;
  const double filter_scale = sample_window(filter, in0, in1, in_size, out_size, index, &center, &first, &n);
  const double inverse_scale = 1.0 / filter_scale;  // multiplied, as Pillow does, for identical weights
  if (n > taps) n = taps;
  double total = 0.0;
  for (int t = 0; t < n; ++t) {
    real[t] = filter_weight(filter, (t + first - center + 0.5) * inverse_scale);
    total += real[t];
  }
  for (int t = 0; t < n; ++t) fixed[t] = to_fixed(total != 0.0 ? real[t] / total : real[t]);
  for (int t = n; t < taps; ++t) fixed[t] = 0;
  *count = n;
  return first;
}

}  // namespace speciesclf
