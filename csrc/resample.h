// Antialiased resize of exactly the pixels a crop keeps, in one pass over the source rows.
#pragma once

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
  ScratchBuffer rows;         // horizontally resampled source rows
  std::vector<int32_t> accumulator;
};

// Calls sink(row_index, rgb_row) for each of the out_height rows of out_width RGB pixels.
template <class RowSink>
void resize_crop(const RgbView& src, const ResizeCrop& rc, ResampleScratch& scratch, RowSink&& sink);

// Exposed for the template below.
void resample_rows_horizontally(const RgbView& src, const AxisPlan& plan, int row_begin, int row_end,
                                uint8_t* out);
void resample_row_vertically(const uint8_t* rows, int row_length, const AxisPlan& plan, int index,
                             int32_t* accumulator, uint8_t* out);

template <class RowSink>
void resize_crop(const RgbView& src, const ResizeCrop& rc, ResampleScratch& s, RowSink&& sink) {
  plan_axis(s.horizontal, rc.filter, rc.box[0], rc.box[2], src.width, rc.resized_width, rc.crop_x, rc.out_width);
  plan_axis(s.vertical, rc.filter, rc.box[1], rc.box[3], src.height, rc.resized_height, rc.crop_y, rc.out_height);
  const int row_length = rc.out_width * 3;
  const int row_begin = s.vertical.input_begin, row_end = s.vertical.input_end;
  const std::size_t source_rows = std::size_t(row_end - row_begin);
  // One more row past the resampled source rows stages each output row.
  uint8_t* rows = s.rows.reserve((source_rows + 1) * row_length);
  uint8_t* staging = rows + source_rows * row_length;
  resample_rows_horizontally(src, s.horizontal, row_begin, row_end, rows);
  if (s.accumulator.size() < std::size_t(row_length)) s.accumulator.resize(row_length);
  for (int i = 0; i < rc.out_height; ++i) {
    resample_row_vertically(rows, row_length, s.vertical, i, s.accumulator.data(), staging);
    sink(i, staging);
  }
}

}  // namespace speciesclf
