#include "decoder.h"

#include <string>

#include "codecs.h"
#include "exif.h"
#include "status.h"

namespace speciesclf {

namespace {

StoredSize read_size(Format format, const uint8_t* data, std::size_t size) {
  switch (format) {
#if SPECIESCLF_HAVE_JPEG
    case Format::kJpeg: return jpeg_read_size(data, size);
#endif
#if SPECIESCLF_HAVE_PNG
    case Format::kPng: return png_read_size(data, size);
#endif
#if SPECIESCLF_HAVE_WEBP
    case Format::kWebp: {
      StoredSize s;
      if (!webp_read_size(data, size, &s)) fail(Status::kCodecUnavailable, "animated WebP");
      return s;
    }
#endif
    default: break;
  }
  (void)data;
  (void)size;
  fail(Status::kCodecUnavailable, std::string(format_name(format)) + " is not decoded natively by this build");
}

}  // namespace

Probe probe_image(const uint8_t* data, std::size_t size, const Limits& limits) {
  if (size == 0) fail(Status::kEmptyInput, "empty input: 0 bytes");
  if (size > limits.max_bytes)
    fail(Status::kImageTooLarge,
         std::to_string(size) + " bytes exceeds max_bytes=" + std::to_string(limits.max_bytes));
  Probe probe;
  probe.format = sniff_format(data, size);
  if (probe.format == Format::kUnknown) fail(Status::kUnsupportedFormat, "unrecognised image format");
  const StoredSize stored = read_size(probe.format, data, size);
  const uint64_t pixels = uint64_t(stored.width) * uint64_t(stored.height);
  if (pixels > limits.max_pixels)
    fail(Status::kImageTooLarge, std::to_string(stored.width) + "x" + std::to_string(stored.height) +
                                     " pixels exceeds max_pixels=" + std::to_string(limits.max_pixels));
  probe.stored_width = stored.width;
  probe.stored_height = stored.height;
  probe.orientation = exif_orientation(probe.format, data, size);
  return probe;
}

int reduction_for(const Probe& probe, int min_width, int min_height, double margin) {
  if (probe.format != Format::kJpeg || min_width <= 0 || min_height <= 0 || !(margin > 0.0)) return 1;
  const double w = probe.upright_width(), h = probe.upright_height();
  for (int r : {8, 4, 2}) {
    if (w >= double(r) * margin * min_width && h >= double(r) * margin * min_height) return r;
  }
  return 1;
}

void upright_decoded_size(const Probe& probe, int reduction, int* width, int* height) {
  const int w = (probe.stored_width + reduction - 1) / reduction;
  const int h = (probe.stored_height + reduction - 1) / reduction;
  *width = probe.orientation >= 5 ? h : w;
  *height = probe.orientation >= 5 ? w : h;
}

RgbView decode_upright(const Probe& probe, const uint8_t* data, std::size_t size, int reduction,
                       const Region* needed, ScratchBuffer& decoded, ScratchBuffer& oriented) {
  RgbView view;
  switch (probe.format) {
#if SPECIESCLF_HAVE_JPEG
    case Format::kJpeg:
      // Partial decoding only where stored and upright coordinates agree.
      view = jpeg_decode(data, size, reduction, probe.orientation <= 1 ? needed : nullptr, decoded);
      break;
#endif
#if SPECIESCLF_HAVE_PNG
    case Format::kPng: view = png_decode(data, size, decoded); break;
#endif
#if SPECIESCLF_HAVE_WEBP
    case Format::kWebp: view = webp_decode(data, size, decoded); break;
#endif
    default: fail(Status::kCodecUnavailable, std::string(format_name(probe.format)) + " is not decoded natively");
  }
  (void)data;
  (void)size;
  (void)reduction;
  (void)needed;
  return orient(view, probe.orientation, oriented);
}

RgbView orient(const RgbView& src, int orientation, ScratchBuffer& out) {
  if (orientation <= 1 || orientation > 8) return src;
  const int w = src.width, h = src.height;
  const bool swap = orientation >= 5;
  const int ow = swap ? h : w, oh = swap ? w : h;
  uint8_t* dst = out.reserve(std::size_t(ow) * oh * 3);
  for (int y = 0; y < oh; ++y) {
    uint8_t* row = dst + std::size_t(y) * ow * 3;
    for (int x = 0; x < ow; ++x) {
      int sx, sy;  // the source pixel that lands at (x, y)
      switch (orientation) {
        case 2: sx = w - 1 - x; sy = y; break;          // mirror
        case 3: sx = w - 1 - x; sy = h - 1 - y; break;  // rotate 180
        case 4: sx = x; sy = h - 1 - y; break;          // flip
        case 5: sx = y; sy = x; break;                  // transpose
        case 6: sx = y; sy = h - 1 - x; break;          // rotate 90 clockwise
        case 7: sx = w - 1 - y; sy = h - 1 - x; break;  // transverse
        default: sx = w - 1 - y; sy = x; break;         // 8: rotate 90 counter-clockwise
      }
      const uint8_t* p = src.pixel(sx, sy);
      row[3 * x] = p[0];
      row[3 * x + 1] = p[1];
      row[3 * x + 2] = p[2];
    }
  }
  return RgbView{dst, ow, oh, std::ptrdiff_t(ow) * 3};
}

}  // namespace speciesclf
