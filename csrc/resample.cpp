#include "resample.h"

#include <algorithm>
#include <cmath>

namespace speciesclf {

void plan_axis(AxisPlan& plan, Filter filter, double in0, double in1, int in_size, int out_size, int out_first,
               int out_count) {
  const double scale = (in1 - in0) / out_size;
  const double support = filter_support(filter) * (scale < 1.0 ? 1.0 : scale);
  plan.taps = int(std::ceil(support)) * 2 + 1;
  plan.weights.assign(std::size_t(out_count) * plan.taps, 0);
  plan.first.resize(out_count);
  plan.count.resize(out_count);
  plan.input_begin = in_size;
  plan.input_end = 0;
  plan.real_weights.resize(plan.taps);
  double* weights = plan.real_weights.data();
  for (int j = 0; j < out_count; ++j) {
    double center;
    int first, count;
    const double filter_scale =
        sample_window(filter, in0, in1, in_size, out_size, out_first + j, &center, &first, &count);
    const double inverse_scale = 1.0 / filter_scale;  // multiplied, as Pillow does, for identical weights
    count = std::min(count, plan.taps);
    double total = 0.0;
    for (int t = 0; t < count; ++t) {
      weights[t] = filter_weight(filter, (t + first - center + 0.5) * inverse_scale);
      total += weights[t];
    }
    int32_t* fixed = &plan.weights[std::size_t(j) * plan.taps];
    for (int t = 0; t < count; ++t) fixed[t] = to_fixed(total != 0.0 ? weights[t] / total : weights[t]);
    plan.first[j] = first;
    plan.count[j] = count;
    plan.input_begin = std::min(plan.input_begin, first);
    plan.input_end = std::max(plan.input_end, first + count);
  }
  if (plan.input_end < plan.input_begin) plan.input_end = plan.input_begin;
}

void resample_rows_horizontally(const RgbView& src, const AxisPlan& plan, int row_begin, int row_end,
                                uint8_t* out) {
  const int out_width = int(plan.first.size());
  for (int y = row_begin; y < row_end; ++y) {
    const uint8_t* in = src.data + std::ptrdiff_t(y) * src.row_stride;
    for (int j = 0; j < out_width; ++j) {
      const int32_t* k = &plan.weights[std::size_t(j) * plan.taps];
      const uint8_t* p = in + std::ptrdiff_t(plan.first[j]) * 3;
      const int n = plan.count[j];
      int32_t r = fixed_rounding_bias(), g = r, b = r;
      for (int t = 0; t < n; ++t) {
        r += p[3 * t] * k[t];
        g += p[3 * t + 1] * k[t];
        b += p[3 * t + 2] * k[t];
      }
      out[3 * j] = fixed_to_u8(r);
      out[3 * j + 1] = fixed_to_u8(g);
      out[3 * j + 2] = fixed_to_u8(b);
    }
    out += std::ptrdiff_t(out_width) * 3;
  }
}

void resample_row_vertically(const uint8_t* rows, int row_length, const AxisPlan& plan, int index,
                             int32_t* accumulator, uint8_t* out) {
  const int32_t* k = &plan.weights[std::size_t(index) * plan.taps];
  const uint8_t* first = rows + std::ptrdiff_t(plan.first[index] - plan.input_begin) * row_length;
  const int n = plan.count[index];
  std::fill(accumulator, accumulator + row_length, fixed_rounding_bias());
  for (int t = 0; t < n; ++t) {
    const uint8_t* in = first + std::ptrdiff_t(t) * row_length;
    const int32_t w = k[t];
    for (int x = 0; x < row_length; ++x) accumulator[x] += in[x] * w;
  }
  for (int x = 0; x < row_length; ++x) out[x] = fixed_to_u8(accumulator[x]);
}

}  // namespace speciesclf
