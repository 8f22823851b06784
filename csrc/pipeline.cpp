#include "pipeline.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <new>

namespace speciesclf {

namespace {

struct WorkerScratch {
  ScratchBuffer decoded, oriented, converted;
  ResampleScratch resample;

  void trim() {
    for (ScratchBuffer* b : {&decoded, &oriented, &converted, &resample.intermediate}) b->trim();
  }
};

WorkerScratch& worker_scratch() {
  thread_local WorkerScratch scratch;
  return scratch;
}

RgbView pixels_as_rgb(const Item& item, ScratchBuffer& converted) {
  if (item.height <= 0 || item.width <= 0) fail(Status::kInvalidImage, "pixel array has no pixels");
  if (item.channels == 3) return RgbView{item.data, item.width, item.height, item.row_stride};
  if (item.channels != 1 && item.channels != 4)
    fail(Status::kInvalidImage, "pixel array must have 1, 3 or 4 channels, got " + std::to_string(item.channels));
  uint8_t* dst = converted.reserve(std::size_t(item.width) * item.height * 3);
  for (int y = 0; y < item.height; ++y) {
    const uint8_t* in = item.data + std::ptrdiff_t(y) * item.row_stride;
    uint8_t* out = dst + std::size_t(y) * item.width * 3;
    for (int x = 0; x < item.width; ++x) {
      // Gray is replicated and alpha dropped, as Pillow's convert("RGB") does.
      const uint8_t* p = in + std::ptrdiff_t(x) * item.channels;
      out[3 * x] = p[0];
      out[3 * x + 1] = item.channels == 1 ? p[0] : p[1];
      out[3 * x + 2] = item.channels == 1 ? p[0] : p[2];
    }
  }
  return RgbView{dst, item.width, item.height, std::ptrdiff_t(item.width) * 3};
}

}  // namespace

Geometry plan_geometry(int width, int height, int size, int resize, uint64_t max_pixels) {
  if (resize == 0) return Geometry{size, size, 0, 0};
  // A long thin image (a 1 x 30 PNG is one header byte away from 1 x 16 million) resizes to a huge image:
  // refused, as in the Python twin (which would allocate all of it), before anything is sized from it.
  const std::string refused = "resizing " + std::to_string(width) + "x" + std::to_string(height) +
                              " to a shorter side of " + std::to_string(resize);
  const double longer = double(int64_t(resize) * std::max(width, height)) / std::min(width, height);
  if (!(longer <= double(kMaxResizedSide)))
    fail(Status::kImageTooLarge, refused + " gives a longer side over " + std::to_string(kMaxResizedSide) +
                                     " pixels (an aspect ratio too extreme for this spec)");
  Geometry g;
  if (width <= height) {
    g.resized_width = resize;
    g.resized_height = int(double(int64_t(resize) * height) / width);
  } else {
    g.resized_height = resize;
    g.resized_width = int(double(int64_t(resize) * width) / height);
  }
  const uint64_t resized_pixels = uint64_t(g.resized_width) * uint64_t(g.resized_height);
  const uint64_t limit = std::max(max_pixels, kDefaultMaxPixels);
  if (resized_pixels > limit)
    fail(Status::kImageTooLarge, refused + " gives " + std::to_string(g.resized_width) + "x" +
                                     std::to_string(g.resized_height) + " = " + std::to_string(resized_pixels) +
                                     " pixels, more than " + std::to_string(limit) +
                                     " (an aspect ratio too extreme for this spec)");
  // Python's round() goes half to even; so does nearbyint in the default rounding mode.
  g.crop_x = int(std::nearbyint((g.resized_width - size) / 2.0));
  g.crop_y = int(std::nearbyint((g.resized_height - size) / 2.0));
  return g;
}

void upright_box(const Probe& probe, int reduction, int decoded_width, int decoded_height, double box[4]) {
  const double bw = double(probe.stored_width) / reduction, bh = double(probe.stored_height) / reduction;
  const double dw = decoded_width, dh = decoded_height;  // stored orientation, rounded up
  double x0 = 0, y0 = 0, x1 = bw, y1 = bh;
  switch (probe.orientation) {
    case 2: x0 = dw - bw; x1 = dw; break;
    case 3: x0 = dw - bw; x1 = dw; y0 = dh - bh; y1 = dh; break;
    case 4: y0 = dh - bh; y1 = dh; break;
    case 5: x1 = bh; y1 = bw; break;
    case 6: x0 = dh - bh; x1 = dh; y1 = bw; break;
    case 7: x0 = dh - bh; x1 = dh; y0 = dw - bw; y1 = dw; break;
    case 8: x1 = bh; y0 = dw - bw; y1 = dw; break;
    default: break;
  }
  box[0] = x0;
  box[1] = y0;
  box[2] = x1;
  box[3] = y1;
}

void normalization_table(const OutputSpec& spec, float table[3][256]) {
  for (int c = 0; c < 3; ++c) {
    for (int v = 0; v < 256; ++v) {
      // float32 throughout, in torchvision's order: to [0, 1], subtract the mean, divide by the std.
      const float unit = float(v) / 255.0f;
      table[c][v] = (unit - spec.mean[c]) / spec.std[c];
    }
  }
}

Preprocessor::Preprocessor(const OutputSpec& spec) : spec_(spec) {
  slot_bytes_ = std::size_t(spec.size) * spec.size * 3 * dtype_size(spec.dtype);
  normalization_table(spec, lut_);
  for (int c = 0; c < 3; ++c)
    for (int v = 0; v < 256; ++v)
      bits16_lut_[c][v] = spec.dtype == DType::kBFloat16 ? float_to_bfloat16(lut_[c][v]) : float_to_half(lut_[c][v]);
}

void Preprocessor::write_row(uint8_t* slot, int row, const uint8_t* rgb) const {
  const int n = spec_.size;
  const std::size_t plane = std::size_t(n) * n;
  const std::size_t offset = std::size_t(row) * n;
  if (spec_.layout == Layout::kNHWC) {
    if (spec_.dtype == DType::kUInt8) {
      std::memcpy(slot + offset * 3, rgb, std::size_t(n) * 3);
    } else if (spec_.dtype == DType::kFloat32) {
      float* out = reinterpret_cast<float*>(slot) + offset * 3;
      for (int i = 0; i < 3 * n; i += 3) {
        out[i] = lut_[0][rgb[i]];
        out[i + 1] = lut_[1][rgb[i + 1]];
        out[i + 2] = lut_[2][rgb[i + 2]];
      }
    } else {
      uint16_t* out = reinterpret_cast<uint16_t*>(slot) + offset * 3;
      for (int i = 0; i < 3 * n; i += 3) {
        out[i] = bits16_lut_[0][rgb[i]];
        out[i + 1] = bits16_lut_[1][rgb[i + 1]];
        out[i + 2] = bits16_lut_[2][rgb[i + 2]];
      }
    }
    return;
  }
  for (int c = 0; c < 3; ++c) {
    if (spec_.dtype == DType::kUInt8) {
      uint8_t* out = slot + c * plane + offset;
      for (int x = 0; x < n; ++x) out[x] = rgb[3 * x + c];
    } else if (spec_.dtype == DType::kFloat32) {
      float* out = reinterpret_cast<float*>(slot) + c * plane + offset;
      const float* lut = lut_[c];
      for (int x = 0; x < n; ++x) out[x] = lut[rgb[3 * x + c]];
    } else {
      uint16_t* out = reinterpret_cast<uint16_t*>(slot) + c * plane + offset;
      const uint16_t* lut = bits16_lut_[c];
      for (int x = 0; x < n; ++x) out[x] = lut[rgb[3 * x + c]];
    }
  }
}

Status Preprocessor::run(const Item& item, uint8_t* slot, std::string* message, double* seconds) const {
  using Clock = std::chrono::steady_clock;
  const Clock::time_point start = Clock::now();
  Clock::time_point decoded = start;
  WorkerScratch& s = worker_scratch();
  Status status = Status::kOk;
  try {
    ResizeCrop rc;
    rc.out_width = rc.out_height = spec_.size;
    rc.filter = spec_.filter;
    const auto set_geometry = [&](const Geometry& g) {
      rc.resized_width = g.resized_width;
      rc.resized_height = g.resized_height;
      rc.crop_x = g.crop_x;
      rc.crop_y = g.crop_y;
    };
    RgbView src;
    if (item.pixels) {
      src = pixels_as_rgb(item, s.converted);
      set_geometry(plan_geometry(src.width, src.height, spec_.size, spec_.resize, spec_.limits.max_pixels));
      rc.box[0] = rc.box[1] = 0.0;
      rc.box[2] = src.width;
      rc.box[3] = src.height;
      plan_resize_crop(src.width, src.height, rc, s.resample);
    } else {
      const Probe probe = probe_image(item.data, item.size, spec_.limits);
      const Geometry g = plan_geometry(probe.upright_width(), probe.upright_height(), spec_.size, spec_.resize,
                                       spec_.limits.max_pixels);
      set_geometry(g);
      const int reduction = reduction_for(probe, g.resized_width, g.resized_height, spec_.reduce_margin);
      int width, height;  // upright, after the DCT reduction
      upright_decoded_size(probe, reduction, &width, &height);
      const bool swap = probe.orientation >= 5;
      upright_box(probe, reduction, swap ? height : width, swap ? width : height, rc.box);
      const Region needed = plan_resize_crop(width, height, rc, s.resample);
      src = decode_upright(probe, item.data, item.size, reduction, &needed, s.decoded, s.oriented);
      if (src.width != width || src.height != height)
        fail(Status::kDecodeError, "decoded size differs from the header's");
    }
    decoded = Clock::now();
    run_resize_crop(src, rc, s.resample, [&](int row, const uint8_t* rgb) { write_row(slot, row, rgb); });
  } catch (const ImageFailure& failure) {
    status = failure.status();
    *message = failure.what();
  } catch (const std::bad_alloc&) {
    status = Status::kOutOfMemory;
    *message = "out of memory";
  } catch (const std::exception& e) {
    status = Status::kInternal;
    *message = e.what();
  }
  s.trim();
  if (seconds) {
    const Clock::time_point end = Clock::now();
    seconds[0] = std::chrono::duration<double>(decoded - start).count();
    seconds[1] = status == Status::kOk ? std::chrono::duration<double>(end - decoded).count() : 0.0;
  }
  return status;
}

}  // namespace speciesclf
