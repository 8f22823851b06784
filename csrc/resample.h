// Antialiased resize of exactly the pixels a crop keeps, with Pillow's arithmetic and pass order.
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
  ScratchBuffer intermediate;  // the first pass's rows (one row when the vertical pass goes first)
  std::vector<int32_t> accumulator;
};

// Plans both axes for `rc` on a src_width x src_height source and returns the source region the crop
// reads, so that a decoder can skip the rest.
Region plan_resize_crop(int src_width, int src_height, const ResizeCrop& rc, ResampleScratch& scratch);

// Pillow (13 and later) resizes vertically first when the height shrinks, and by more than twice as
// many pixels as the width does; otherwise horizontally first. The order changes the 8-bit rounding
// between the passes, so we follow it to stay bit-exact (older Pillow always went horizontally first).
// Sizes are the whole source and the whole resized image, not the crop.
inline bool vertical_pass_first(int src_width, int src_height, int resized_width, int resized_height) {
  const int shrink_y = src_height - resized_height, shrink_x = src_width - resized_width;
  return shrink_y > 0 && shrink_y > 2 * shrink_x;
}

// One output sample per column: sum over n rows starting at `top`, `stride` bytes apart.
void vertical_taps(const uint8_t* top, std::ptrdiff_t stride, int length, const int32_t* weights, int n,
                   int32_t* accumulator, uint8_t* out);
// One resampled row; `row` is the source pixel plan.input_begin and `available` the pixels readable
// from there. Stores 4 bytes per pixel: `out` needs one byte of slack.
void horizontal_taps(const uint8_t* row, int available, const AxisPlan& plan, uint8_t* out);

// Runs the planned resize, calling sink(row_index, rgb_row) for each output row in order.
template <class RowSink>
void run_resize_crop(const RgbView& src, const ResizeCrop& rc, ResampleScratch& s, RowSink&& sink) {
  const AxisPlan& h = s.horizontal;
  const AxisPlan& v = s.vertical;
  const int row_bytes = rc.out_width * 3;
  if (vertical_pass_first(src.width, src.height, rc.resized_width, rc.resized_height)) {
    // Each output row: the needed columns of its source rows, then across. Two rows of working set.
    const int columns = h.input_end - h.input_begin;
    uint8_t* strip = s.intermediate.reserve(std::size_t(columns) * 3 + std::size_t(row_bytes) + 4);
    uint8_t* row = strip + std::size_t(columns) * 3;
    if (s.accumulator.size() < std::size_t(columns) * 3) s.accumulator.resize(std::size_t(columns) * 3);
    for (int i = 0; i < rc.out_height; ++i) {
      vertical_taps(src.pixel(h.input_begin, v.first[i]), src.row_stride, columns * 3,
                    &v.weights[std::size_t(i) * v.taps], v.count[i], s.accumulator.data(), strip);
      horizontal_taps(strip, columns, h, row);
      sink(i, static_cast<const uint8_t*>(row));
    }
    return;
  }
  // Every source row the crop needs, across; then each output row down those.
  const int rows = v.input_end - v.input_begin;
  uint8_t* across = s.intermediate.reserve(std::size_t(rows + 1) * row_bytes + 4);
  uint8_t* row = across + std::size_t(rows) * row_bytes;
  const int available = std::min(src.width, src.x_offset + int(src.row_stride / 3)) - h.input_begin;
  for (int y = 0; y < rows; ++y)
    horizontal_taps(src.pixel(h.input_begin, v.input_begin + y), available, h, across + std::size_t(y) * row_bytes);
  if (s.accumulator.size() < std::size_t(row_bytes)) s.accumulator.resize(row_bytes);
  for (int i = 0; i < rc.out_height; ++i) {
    vertical_taps(across + std::size_t(v.first[i] - v.input_begin) * row_bytes, row_bytes, row_bytes,
                  &v.weights[std::size_t(i) * v.taps], v.count[i], s.accumulator.data(), row);
    sink(i, static_cast<const uint8_t*>(row));
  }
}

}  // namespace speciesclf
