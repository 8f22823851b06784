// Orientation 1..8 as Pillow's ImageOps.exif_transpose finds it: the EXIF orientation tag (0x0112) from
// JPEG APP1, PNG eXIf (or ImageMagick's raw-profile text chunk) and WebP EXIF chunks; where EXIF has no
// such tag, the XMP packet's tiff:Orientation. Anything malformed reads as orientation 1: a broken tag
// must not cost the user the image. python/speciesclf/_formats.py is the pure-Python twin; tests hold the
// two to the same answers.
#pragma once

#include <cstddef>
#include <cstdint>

#include "formats.h"

namespace speciesclf {

int exif_orientation(Format format, const uint8_t* data, std::size_t size);

// The orientation tag of an EXIF (TIFF) block, with or without the "Exif\0\0" prefix: 1..8, 1 for a tag
// holding no usable value, 0 where the block has no orientation tag or cannot be read.
int tiff_orientation_tag(const uint8_t* tiff, std::size_t size);

// An XMP packet's tiff:Orientation, found as Pillow finds it (the first `tiff:Orientation="D` or
// `tiff:Orientation>D`, D a digit; a search, not an XML parse): 1..8, 1 for 0 or 9, 0 when it has none.
int xmp_orientation(const uint8_t* text, std::size_t size);

}  // namespace speciesclf
