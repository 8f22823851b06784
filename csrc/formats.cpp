#include "formats.h"

#include <cstring>

namespace speciesclf {

namespace {
bool starts_with(const uint8_t* data, std::size_t size, const char* magic, std::size_t n) {
  return size >= n && std::memcmp(data, magic, n) == 0;
}
}  // namespace

Format sniff_format(const uint8_t* data, std::size_t size) {
  if (starts_with(data, size, "\xFF\xD8\xFF", 3)) return Format::kJpeg;
  if (starts_with(data, size, "\x89PNG\r\n\x1A\n", 8)) return Format::kPng;
  if (size >= 12 && std::memcmp(data, "RIFF", 4) == 0 && std::memcmp(data + 8, "WEBP", 4) == 0)
    return Format::kWebp;
  if (starts_with(data, size, "GIF87a", 6) || starts_with(data, size, "GIF89a", 6)) return Format::kGif;
  if (starts_with(data, size, "BM", 2)) return Format::kBmp;
  if (starts_with(data, size, "II*\0", 4) || starts_with(data, size, "MM\0*", 4)) return Format::kTiff;
  return Format::kUnknown;
}

const char* format_name(Format format) {
  switch (format) {
    case Format::kJpeg: return "JPEG";
    case Format::kPng: return "PNG";
    case Format::kWebp: return "WEBP";
    case Format::kGif: return "GIF";
    case Format::kBmp: return "BMP";
    case Format::kTiff: return "TIFF";
    case Format::kUnknown: break;
  }
  return "unknown";
}

}  // namespace speciesclf
