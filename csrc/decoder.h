// Format dispatch: probe an encoded image (format, size, orientation, limits), then decode it at a
// chosen DCT reduction and turn it upright.
#pragma once

#include <cstddef>
#include <cstdint>

#include "formats.h"
#include "image.h"

namespace speciesclf {

struct Limits {
  uint64_t max_pixels;
  uint64_t max_bytes;
};

struct Probe {
  Format format = Format::kUnknown;
  int stored_width = 0;   // as encoded, before EXIF orientation
  int stored_height = 0;
  int orientation = 1;    // EXIF 1..8
  int upright_width() const { return orientation >= 5 ? stored_height : stored_width; }
  int upright_height() const { return orientation >= 5 ? stored_width : stored_height; }
};

// Throws ImageFailure: empty input, unknown bytes, a format this build leaves to Pillow, a broken
// header, or more pixels or bytes than the limits allow (checked before any pixel is decoded).
Probe probe_image(const uint8_t* data, std::size_t size, const Limits& limits);

// The largest DCT reduction (1, 2, 4 or 8; JPEG only) that keeps the upright image at least
// margin * (min_width x min_height). With margin 1 this is Pillow's Image.draft rule; a margin of 0
// (or a zero size) means no reduction.
int reduction_for(const Probe& probe, int min_width, int min_height, double margin);

// Size of the image decode_upright returns for this reduction (JPEG rounds the scaled size up).
void upright_decoded_size(const Probe& probe, int reduction, int* width, int* height);

// Decodes and applies the orientation. The view lives in one of the two scratch buffers. `needed`
// (upright coordinates, may be null) is the only region the caller will read: a JPEG decoder then
// skips most of the work for the rest. The returned view may hold just that region (see RgbView).
RgbView decode_upright(const Probe& probe, const uint8_t* data, std::size_t size, int reduction,
                       const Region* needed, ScratchBuffer& decoded, ScratchBuffer& oriented);

// Applies EXIF orientation 1..8 the way PIL.ImageOps.exif_transpose does.
RgbView orient(const RgbView& src, int orientation, ScratchBuffer& out);

}  // namespace speciesclf
