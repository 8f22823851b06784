#include "exif.h"

#include <cstring>

namespace speciesclf {

namespace {

uint32_t read_u16(const uint8_t* p, bool little) {
  return little ? (p[0] | (p[1] << 8)) : ((p[0] << 8) | p[1]);
}

uint32_t read_u32(const uint8_t* p, bool little) {
  return little ? (uint32_t(p[0]) | (uint32_t(p[1]) << 8) | (uint32_t(p[2]) << 16) | (uint32_t(p[3]) << 24))
                : ((uint32_t(p[0]) << 24) | (uint32_t(p[1]) << 16) | (uint32_t(p[2]) << 8) | uint32_t(p[3]));
}

// Reads the orientation from a TIFF structure (the payload of every EXIF container).
int tiff_orientation(const uint8_t* tiff, std::size_t size) {
  if (size >= 6 && std::memcmp(tiff, "Exif\0\0", 6) == 0) {  // some WebP writers keep the JPEG prefix
    tiff += 6;
    size -= 6;
  }
  if (size < 8) return 1;
  bool little;
  if (tiff[0] == 'I' && tiff[1] == 'I') little = true;
  else if (tiff[0] == 'M' && tiff[1] == 'M') little = false;
  else return 1;
  if (read_u16(tiff + 2, little) != 42) return 1;
  const uint32_t ifd = read_u32(tiff + 4, little);
  if (ifd > size || size - ifd < 2) return 1;
  const uint32_t count = read_u16(tiff + ifd, little);
  for (uint32_t i = 0; i < count; ++i) {
    const std::size_t entry = std::size_t(ifd) + 2 + std::size_t(i) * 12;
    if (entry + 12 > size) return 1;
    if (read_u16(tiff + entry, little) != 0x0112) continue;
    const uint32_t type = read_u16(tiff + entry + 2, little);
    if (read_u32(tiff + entry + 4, little) != 1) return 1;  // one value, or the entry is broken
    uint32_t value;
    if (type == 3) value = read_u16(tiff + entry + 8, little);       // SHORT
    else if (type == 4) value = read_u32(tiff + entry + 8, little);  // LONG
    else return 1;
    return (value >= 1 && value <= 8) ? int(value) : 1;
  }
  return 1;
}

int jpeg_orientation(const uint8_t* data, std::size_t size) {
  std::size_t pos = 2;
  while (pos + 4 <= size) {
    if (data[pos] != 0xFF) return 1;
    const uint8_t marker = data[pos + 1];
    if (marker == 0xFF) {  // fill byte
      ++pos;
      continue;
    }
    if (marker == 0x01 || (marker >= 0xD0 && marker <= 0xD8)) {  // markers without a length
      pos += 2;
      continue;
    }
    if (marker == 0xDA || marker == 0xD9) return 1;  // entropy-coded data starts: no EXIF before it
    const std::size_t length = read_u16(data + pos + 2, false);
    if (length < 2 || pos + 2 + length > size) return 1;
    if (marker == 0xE1 && length >= 8 && std::memcmp(data + pos + 4, "Exif\0\0", 6) == 0)
      return tiff_orientation(data + pos + 10, length - 8);
    pos += 2 + length;
  }
  return 1;
}

int png_orientation(const uint8_t* data, std::size_t size) {
  std::size_t pos = 8;
  while (pos + 12 <= size) {
    const std::size_t length = read_u32(data + pos, false);
    if (length > size - pos - 12) return 1;
    const uint8_t* type = data + pos + 4;
    if (std::memcmp(type, "eXIf", 4) == 0) return tiff_orientation(data + pos + 8, length);
    if (std::memcmp(type, "IEND", 4) == 0) return 1;
    pos += 12 + length;
  }
  return 1;
}

int webp_orientation(const uint8_t* data, std::size_t size) {
  std::size_t pos = 12;
  while (pos + 8 <= size) {
    const std::size_t length = read_u32(data + pos + 4, true);
    if (length > size - pos - 8) return 1;
    if (std::memcmp(data + pos, "EXIF", 4) == 0) return tiff_orientation(data + pos + 8, length);
    pos += 8 + length + (length & 1);
  }
  return 1;
}

}  // namespace

int exif_orientation(Format format, const uint8_t* data, std::size_t size) {
  switch (format) {
    case Format::kJpeg: return jpeg_orientation(data, size);
    case Format::kPng: return png_orientation(data, size);
    case Format::kWebp: return webp_orientation(data, size);
    default: return 1;
  }
}

}  // namespace speciesclf
