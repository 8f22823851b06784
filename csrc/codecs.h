// One native file per codec (jpeg_decode.cpp, png_decode.cpp, webp_decode.cpp), each compiled only when
// its library was found. Every decoder writes interleaved 8-bit RGB with Pillow's convert("RGB")
// semantics into the caller's scratch buffer and throws ImageFailure for the image it cannot decode.
#pragma once

#include <cstddef>
#include <cstdint>

#include "image.h"

namespace speciesclf {

struct StoredSize {
  int width = 0;
  int height = 0;
};

#if SPECIESCLF_HAVE_JPEG
StoredSize jpeg_read_size(const uint8_t* data, std::size_t size);
// scale_denom is 1, 2, 4 or 8: libjpeg-turbo's reduced-size DCT, so we never pay for discarded pixels.
// With `needed`, only that region (of the scaled image, plus a margin) goes through IDCT and colour
// conversion; the rest is entropy-decoded and skipped.
RgbView jpeg_decode(const uint8_t* data, std::size_t size, int scale_denom, const Region* needed,
                    ScratchBuffer& buffer);
#endif

#if SPECIESCLF_HAVE_PNG
StoredSize png_read_size(const uint8_t* data, std::size_t size);
RgbView png_decode(const uint8_t* data, std::size_t size, ScratchBuffer& buffer);
// Orientation 1..8 from the eXIf chunk, ImageMagick's raw-profile text chunk or the XMP packet (exif.h).
int png_orientation(const uint8_t* data, std::size_t size);
#endif

#if SPECIESCLF_HAVE_WEBP
// Returns false for an animated WebP, which Pillow decodes (its first frame).
bool webp_read_size(const uint8_t* data, std::size_t size, StoredSize* out);
RgbView webp_decode(const uint8_t* data, std::size_t size, ScratchBuffer& buffer);
#endif

}  // namespace speciesclf
