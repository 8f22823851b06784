// EXIF orientation (tag 0x0112) from JPEG APP1, PNG eXIf and WebP EXIF chunks.
// Anything malformed reads as orientation 1: a broken tag must not cost the user the image.
// python/speciesclf/_exif.py is the pure-Python twin; tests hold the two to the same answers.
#pragma once

#include <cstddef>
#include <cstdint>

#include "formats.h"

namespace speciesclf {

int exif_orientation(Format format, const uint8_t* data, std::size_t size);

}  // namespace speciesclf
