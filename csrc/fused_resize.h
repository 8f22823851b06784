// The resize + crop of one output pixel computed straight from the source image, for the CUDA kernel
// (one thread per output pixel) and for its CPU twin, which the tests hold bit for bit to the row-by-row
// CPU path (resample.h). Same fixed-point arithmetic, same pass order, same 8-bit rounding between the
// passes; the source may still be in its stored (EXIF) orientation, which is applied on the fly.
#pragma once

#include <cstddef>
#include <cstdint>

#include "output_format.h"
#include "resample_math.h"

namespace speciesclf {

// Decoded pixels as they are in memory: stored orientation, 1 (gray), 3 (RGB) or 4 (RGBA: alpha is
// ignored) interleaved channels.
struct SourceImage {
  const uint8_t* pixels = nullptr;
  int width = 0, height = 0;  // stored
  std::ptrdiff_t pitch = 0;   // bytes per row
  int channels = 3;           // bytes per pixel
  int orientation = 1;        // EXIF 1..8, applied as PIL.ImageOps.exif_transpose does
};

// One axis of the resize: per output sample its first input sample, its tap count and `taps` weights.
struct AxisTable {
  const int32_t* weights = nullptr;
  const int32_t* first = nullptr;
  const int32_t* count = nullptr;
  int taps = 0;
};

SPECIESCLF_HD inline int upright_width(const SourceImage& s) { return s.orientation >= 5 ? s.height : s.width; }
SPECIESCLF_HD inline int upright_height(const SourceImage& s) { return s.orientation >= 5 ? s.width : s.height; }

// The stored pixel that lands at upright (x, y); the same table as orient() in decoder.cpp.
SPECIESCLF_HD inline const uint8_t* stored_pixel(const SourceImage& s, int x, int y) {
  const int w = s.width, h = s.height;
  int sx, sy;
  switch (s.orientation) {
    case 2: sx = w - 1 - x; sy = y; break;
    case 3: sx = w - 1 - x; sy = h - 1 - y; break;
    case 4: sx = x; sy = h - 1 - y; break;
    case 5: sx = y; sy = x; break;
    case 6: sx = y; sy = h - 1 - x; break;
    case 7: sx = w - 1 - y; sy = h - 1 - x; break;
    case 8: sx = w - 1 - y; sy = x; break;
    default: sx = x; sy = y; break;
  }
  return s.pixels + std::ptrdiff_t(sy) * s.pitch + std::ptrdiff_t(sx) * s.channels;
}

// Adds weight * pixel to acc, gray replicated to R, G and B as Pillow's convert("RGB") does.
SPECIESCLF_HD inline void accumulate(const SourceImage& s, int x, int y, int32_t weight, int32_t acc[3]) {
  const uint8_t* p = stored_pixel(s, x, y);
  if (s.channels == 1) {
    const int32_t v = p[0] * weight;
    acc[0] += v;
    acc[1] += v;
    acc[2] += v;
  } else {
    acc[0] += p[0] * weight;
    acc[1] += p[1] * weight;
    acc[2] += p[2] * weight;
  }
}

// Output pixel (row i, column j) of the crop. The first pass's 8-bit results are recomputed per output
// pixel instead of being shared through memory: O(taps_x * taps_y) reads, each cached, for no
// intermediate buffer and no synchronisation.
SPECIESCLF_HD inline void resample_pixel(const SourceImage& src, const AxisTable& h, const AxisTable& v,
                                         bool vertical_first, int i, int j, uint8_t rgb[3]) {
  const int32_t* kx = h.weights + std::ptrdiff_t(j) * h.taps;
  const int32_t* ky = v.weights + std::ptrdiff_t(i) * v.taps;
  const int x0 = h.first[j], nx = h.count[j];
  const int y0 = v.first[i], ny = v.count[i];
  const int32_t bias = fixed_rounding_bias();
  int32_t acc[3] = {bias, bias, bias};
  if (!vertical_first) {
    for (int ty = 0; ty < ny; ++ty) {
      int32_t across[3] = {bias, bias, bias};
      for (int tx = 0; tx < nx; ++tx) accumulate(src, x0 + tx, y0 + ty, kx[tx], across);
      for (int c = 0; c < 3; ++c) acc[c] += int32_t(fixed_to_u8(across[c])) * ky[ty];
    }
  } else {
    for (int tx = 0; tx < nx; ++tx) {
      int32_t down[3] = {bias, bias, bias};
      for (int ty = 0; ty < ny; ++ty) accumulate(src, x0 + tx, y0 + ty, ky[ty], down);
      for (int c = 0; c < 3; ++c) acc[c] += int32_t(fixed_to_u8(down[c])) * kx[tx];
    }
  }
  for (int c = 0; c < 3; ++c) rgb[c] = fixed_to_u8(acc[c]);
}

// Where a job's filter tables live: `taps` weights (and as many doubles of scratch) per output sample.
struct AxisStorage {
  int32_t* weights = nullptr;
  int32_t* first = nullptr;
  int32_t* count = nullptr;
  double* scratch = nullptr;
  int taps = 0;
};

SPECIESCLF_HD inline AxisTable table_of(const AxisStorage& a) {
  AxisTable t;
  t.weights = a.weights;
  t.first = a.first;
  t.count = a.count;
  t.taps = a.taps;
  return t;
}

// One image of a batch: its source, the part of it the crop reads and where the result goes.
struct FusedJob {
  SourceImage source;
  Filter filter = Filter::kBilinear;
  double box[4] = {0, 0, 0, 0};  // source region in upright coordinates (fractional after a reduced decode)
  int resized_width = 0, resized_height = 0;
  int crop_x = 0, crop_y = 0;
  int size = 0;                  // the crop is size x size
  int vertical_first = 0;        // Pillow's pass order, see vertical_pass_first() in resample.h
  AxisStorage h, v;
  uint8_t* slot = nullptr;       // null: this item failed, leave its slot alone
};

// Fills the filter of output sample k along `axis` (0: horizontal, 1: vertical) of the crop.
SPECIESCLF_HD inline void plan_job_sample(const FusedJob& job, int axis, int k) {
  const AxisStorage& a = axis == 0 ? job.h : job.v;
  const double in0 = axis == 0 ? job.box[0] : job.box[1];
  const double in1 = axis == 0 ? job.box[2] : job.box[3];
  const int in_size = axis == 0 ? upright_width(job.source) : upright_height(job.source);
  const int out_size = axis == 0 ? job.resized_width : job.resized_height;
  const int offset = axis == 0 ? job.crop_x : job.crop_y;
  int count;
  a.first[k] = axis_sample_weights(job.filter, in0, in1, in_size, out_size, offset + k, a.taps,
                                   a.scratch + std::ptrdiff_t(k) * a.taps, a.weights + std::ptrdiff_t(k) * a.taps,
                                   &count);
  a.count[k] = count;
}

// Computes output pixel (i, j) of a planned job and writes it to the job's slot.
SPECIESCLF_HD inline void run_job_pixel(const FusedJob& job, const OutputFormat& format, int i, int j) {
  uint8_t rgb[3];
  resample_pixel(job.source, table_of(job.h), table_of(job.v), job.vertical_first != 0, i, j, rgb);
  write_output_pixel(job.slot, format, i, j, rgb);
}

}  // namespace speciesclf
