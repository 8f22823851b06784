#include "exif.h"

#include <cstring>

#if SPECIESCLF_HAVE_PNG
#include "codecs.h"
#endif

namespace speciesclf {

namespace {

uint32_t read_u16(const uint8_t* p, bool little) {
  return little ? (p[0] | (p[1] << 8)) : ((p[0] << 8) | p[1]);
}

uint32_t read_u32(const uint8_t* p, bool little) {
  return little ? (uint32_t(p[0]) | (uint32_t(p[1]) << 8) | (uint32_t(p[2]) << 16) | (uint32_t(p[3]) << 24))
                : ((uint32_t(p[0]) << 24) | (uint32_t(p[1]) << 16) | (uint32_t(p[2]) << 8) | uint32_t(p[3]));
}

constexpr char kJpegXmpId[] = "http://ns.adobe.com/xap/1.0/";  // and its terminating NUL
constexpr std::size_t kJpegXmpIdSize = sizeof(kJpegXmpId);

int jpeg_orientation(const uint8_t* data, std::size_t size);
int webp_orientation(const uint8_t* data, std::size_t size);

}  // namespace

int tiff_orientation_tag(const uint8_t* tiff, std::size_t size) {
  if (size >= 6 && std::memcmp(tiff, "Exif\0\0", 6) == 0) {  // some WebP writers keep the JPEG prefix
    tiff += 6;
    size -= 6;
  }
  if (size < 8) return 0;
  bool little;
  if (tiff[0] == 'I' && tiff[1] == 'I') little = true;
  else if (tiff[0] == 'M' && tiff[1] == 'M') little = false;
  else return 0;
  if (read_u16(tiff + 2, little) != 42) return 0;
  const uint32_t ifd = read_u32(tiff + 4, little);
  if (ifd > size || size - ifd < 2) return 0;
  const uint32_t count = read_u16(tiff + ifd, little);
  for (uint32_t i = 0; i < count; ++i) {
    const std::size_t entry = std::size_t(ifd) + 2 + std::size_t(i) * 12;
    if (entry + 12 > size) return 0;
    if (read_u16(tiff + entry, little) != 0x0112) continue;
    const uint32_t type = read_u16(tiff + entry + 2, little);
    if (read_u32(tiff + entry + 4, little) != 1) return 1;  // one value, or the entry is broken
    uint32_t value;
    if (type == 3) value = read_u16(tiff + entry + 8, little);       // SHORT
    else if (type == 4) value = read_u32(tiff + entry + 8, little);  // LONG
    else return 1;
    return (value >= 1 && value <= 8) ? int(value) : 1;
  }
  return 0;
}

int xmp_orientation(const uint8_t* text, std::size_t size) {
  static constexpr char kName[] = "tiff:Orientation";
  constexpr std::size_t kNameSize = sizeof(kName) - 1;
  const uint8_t* const end = text + size;
  const uint8_t* at = text;
  // Each step moves past one 't': at most 16 byte compares per byte of the packet, whatever it holds.
  while (std::size_t(end - at) >= kNameSize + 2) {
    const auto* found = static_cast<const uint8_t*>(std::memchr(at, 't', std::size_t(end - at) - kNameSize - 1));
    if (found == nullptr) return 0;
    at = found + 1;
    if (std::memcmp(found, kName, kNameSize) != 0) continue;
    const uint8_t* after = found + kNameSize;
    uint8_t digit = 0;
    if (after < end && after[0] == '>') {
      if (end - after >= 2) digit = after[1];
    } else if (end - after >= 3 && after[0] == '=' && after[1] == '"') {
      digit = after[2];
    }
    if (digit >= '0' && digit <= '9') return (digit >= '1' && digit <= '8') ? digit - '0' : 1;
  }
  return 0;
}

namespace {

// The first EXIF segment's orientation tag, else the last XMP segment's (Pillow's JpegImagePlugin keeps
// the last), among the markers before the image data.
int jpeg_orientation(const uint8_t* data, std::size_t size) {
  int tag = 0;
  bool seen_exif = false;
  const uint8_t* xmp = nullptr;
  std::size_t xmp_size = 0;
  std::size_t pos = 2;
  while (pos + 4 <= size) {
    if (data[pos] != 0xFF) break;
    const uint8_t marker = data[pos + 1];
    if (marker == 0xFF) {  // fill byte
      ++pos;
      continue;
    }
    if (marker == 0x01 || (marker >= 0xD0 && marker <= 0xD8)) {  // markers without a length
      pos += 2;
      continue;
    }
    if (marker == 0xDA || marker == 0xD9) break;  // entropy-coded data starts: no metadata after it
    const std::size_t length = read_u16(data + pos + 2, false);
    if (length < 2 || pos + 2 + length > size) break;
    if (marker == 0xE1 && length >= 8 && std::memcmp(data + pos + 4, "Exif\0\0", 6) == 0) {
      if (!seen_exif) tag = tiff_orientation_tag(data + pos + 10, length - 8);
      seen_exif = true;
    } else if (marker == 0xE1 && length - 2 >= kJpegXmpIdSize &&
               std::memcmp(data + pos + 4, kJpegXmpId, kJpegXmpIdSize) == 0) {
      xmp = data + pos + 4 + kJpegXmpIdSize;
      xmp_size = length - 2 - kJpegXmpIdSize;
    }
    pos += 2 + length;
  }
  if (tag == 0 && xmp != nullptr) tag = xmp_orientation(xmp, xmp_size);
  return tag == 0 ? 1 : tag;
}

constexpr uint8_t kWebpExifFlag = 0x08, kWebpXmpFlag = 0x04;

// As libwebp's demuxer (so Pillow) reads it: only an extended file (VP8X first) has metadata, and only
// the kinds its flags declare; the first EXIF chunk's tag, else the first XMP chunk's; nothing past the
// RIFF size counts.
int webp_orientation(const uint8_t* data, std::size_t size) {
  if (size < 21 || std::memcmp(data + 12, "VP8X", 4) != 0) return 1;
  const uint8_t flags = data[20];
  const std::size_t riff_end = std::size_t(read_u32(data + 4, true)) + 8;
  if (riff_end < size) size = riff_end;
  const uint8_t *exif = nullptr, *xmp = nullptr;
  std::size_t exif_size = 0, xmp_size = 0;
  std::size_t pos = 12;
  while (pos + 8 <= size) {
    const std::size_t length = read_u32(data + pos + 4, true);
    if (length > size - pos - 8) break;
    if (std::memcmp(data + pos, "EXIF", 4) == 0 && (flags & kWebpExifFlag) && exif == nullptr) {
      exif = data + pos + 8;
      exif_size = length;
    } else if (std::memcmp(data + pos, "XMP ", 4) == 0 && (flags & kWebpXmpFlag) && xmp == nullptr) {
      xmp = data + pos + 8;
      xmp_size = length;
    }
    pos += 8 + length + (length & 1);
  }
  int tag = exif != nullptr ? tiff_orientation_tag(exif, exif_size) : 0;
  if (tag == 0 && xmp != nullptr) tag = xmp_orientation(xmp, xmp_size);
  return tag == 0 ? 1 : tag;
}

}  // namespace

int exif_orientation(Format format, const uint8_t* data, std::size_t size) {
  switch (format) {
    case Format::kJpeg: return jpeg_orientation(data, size);
#if SPECIESCLF_HAVE_PNG
    case Format::kPng: return png_orientation(data, size);  // its text chunks may need zlib
#endif
    case Format::kWebp: return webp_orientation(data, size);
    default: return 1;
  }
}

}  // namespace speciesclf
