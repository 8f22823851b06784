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

// Plans both axes for `rc` on a src_width x src_height source and returns the source region the crop
// reads, so that a decoder can skip the rest.
Region plan_resize_crop(int src_width, int src_height, const ResizeCrop& rc, ResampleScratch& scratch);

// Runs the planned resize. The vertical pass goes first: it runs over contiguous bytes and vectorises,
// and the horizontal pass then touches only the rows the crop keeps. Each output row is finished before
// the next starts, so the working set is two rows. Calls sink(row_index, rgb_row) for each output row.
template <class RowSink>
void run_resize_crop(const RgbView& src, const ResizeCrop& rc, ResampleScratch& scratch, RowSink&& sink);

void resample_column_strip(const RgbView& src, const AxisPlan& vertical, int index, int column_begin,
                           int column_end, int32_t* accumulator, uint8_t* out);
void resample_row_horizontally(const uint8_t* strip, const AxisPlan& horizontal, uint8_t* out);

template <class RowSink>
void run_resize_crop(const RgbView& src, const ResizeCrop& rc, ResampleScratch& s, RowSink&& sink) {
  const int column_begin = s.horizontal.input_begin, column_end = s.horizontal.input_end;
  const std::size_t strip_bytes = std::size_t(column_end - column_begin) * 3;
  const std::size_t padding = std::size_t(s.horizontal.taps) * 3;  // fixed-tap reads past the end see zeros
  uint8_t* strip = s.column_strip.reserve(strip_bytes + padding + std::size_t(rc.out_width) * 3 + 4);
  std::fill(strip + strip_bytes, strip + strip_bytes + padding, uint8_t(0));
  uint8_t* row = strip + strip_bytes + padding;  // +4 above: the kernels store 4 bytes per pixel
  if (s.accumulator.size() < strip_bytes) s.accumulator.resize(strip_bytes);
  for (int i = 0; i < rc.out_height; ++i) {
    resample_column_strip(src, s.vertical, i, column_begin, column_end, s.accumulator.data(), strip);
    resample_row_horizontally(strip, s.horizontal, row);
    sink(i, static_cast<const uint8_t*>(row));
  }
}

}  // namespace speciesclf
