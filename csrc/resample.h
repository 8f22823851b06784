// Antialiased resize of exactly the pixels a crop keeps, in one pass over the source rows.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "image.h"
#include "resample_math.h"

namespace speciesclf {

// Fixed-point filter taps for a run of output samples along one axis.
struct AxisPlan {
  int taps = 0;                  // stride of `weights` per output sample
  std::vector<int32_t> weights;  // count * taps
  std::vector<int32_t> first;    // first input sample per output sample
  std::vector<int32_t> count;    // inputs used per output sample
  int input_begin = 0;           // union of all windows: [input_begin, input_end)
  int input_end = 0;
  std::vector<double> real_weights;  // one sample's weights before rounding (scratch)
};

// Plans output samples [out_first, out_first + out_count) of a resize of the input interval
// [in0, in1) (of in_size samples) to out_size samples. Vectors are reused, not reallocated.
void plan_axis(AxisPlan& plan, Filter filter, double in0, double in1, int in_size, int out_size, int out_first,
               int out_count);

struct ResizeCrop {
  double box[4];        // source region x0, y0, x1, y1 (fractional after a reduced-size decode)
  int resized_width;    // size of the full resized image
  int resized_height;
  int crop_x, crop_y;   // window of the resized image that is kept
  int out_width, out_height;
  Filter filter;
};

struct ResampleScratch {
  AxisPlan horizontal, vertical;
  ScratchBuffer column_strip;       // one output row after the vertical pass, over the needed columns
  std::vector<int32_t> accumulator;
};

// The vertical pass first: it runs over contiguous bytes and vectorises, and the horizontal pass then
// touches only the rows the crop keeps. Each output row is finished before the next one starts, so the
// working set is two rows. Calls sink(row_index, rgb_row) for each of the out_height rows.
template <class RowSink>
void resize_crop(const RgbView& src, const ResizeCrop& rc, ResampleScratch& scratch, RowSink&& sink);

void resample_column_strip(const RgbView& src, const AxisPlan& vertical, int index, int column_begin,
                           int column_end, int32_t* accumulator, uint8_t* out);
void resample_row_horizontally(const uint8_t* strip, const AxisPlan& horizontal, uint8_t* out);

template <class RowSink>
void resize_crop(const RgbView& src, const ResizeCrop& rc, ResampleScratch& s, RowSink&& sink) {
  plan_axis(s.horizontal, rc.filter, rc.box[0], rc.box[2], src.width, rc.resized_width, rc.crop_x, rc.out_width);
  plan_axis(s.vertical, rc.filter, rc.box[1], rc.box[3], src.height, rc.resized_height, rc.crop_y, rc.out_height);
  const int column_begin = s.horizontal.input_begin, column_end = s.horizontal.input_end;
  const std::size_t strip_bytes = std::size_t(column_end - column_begin) * 3;
  // The horizontal kernel reads a fixed number of taps; the zero padding covers reads past the end.
  uint8_t* strip = s.column_strip.reserve(strip_bytes + std::size_t(s.horizontal.taps) * 3 + std::size_t(rc.out_width) * 3 + 4);  // +4: 4-byte stores
  std::fill(strip + strip_bytes, strip + strip_bytes + std::size_t(s.horizontal.taps) * 3, uint8_t(0));
  uint8_t* row = strip + strip_bytes + std::size_t(s.horizontal.taps) * 3;
  if (s.accumulator.size() < strip_bytes) s.accumulator.resize(strip_bytes);
  for (int i = 0; i < rc.out_height; ++i) {
    resample_column_strip(src, s.vertical, i, column_begin, column_end, s.accumulator.data(), strip);
    resample_row_horizontally(strip, s.horizontal, row);
    sink(i, static_cast<const uint8_t*>(row));
  }
}

}  // namespace speciesclf
