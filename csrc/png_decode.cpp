// PNG through libspng: no setjmp, errors as codes, memory for chunks bounded. Before libspng sees the
// file, every chunk's CRC is checked (libspng skips some, Pillow skips IDAT's: we check all, as the
// Python path does) and ancillary chunks are dropped: no ancillary chunk changes the RGB we produce,
// and a malformed one (an empty eXIf, say) must not cost the image.
#include <spng.h>
#include <zlib.h>

#include <cstring>
#include <memory>
#include <string>

#include "codecs.h"
#include "status.h"

namespace speciesclf {

namespace {

// A chunk type as text: printable ASCII as is, any other byte (and ' and \) as \xNN, as
// _formats.chunk_name does. A hostile file's raw bytes would not even be valid UTF-8.
std::string chunk_name(const uint8_t* type) {
  static const char* hex = "0123456789abcdef";
  std::string name;
  for (int i = 0; i < 4; ++i) {
    const uint8_t b = type[i];
    if (b >= 0x20 && b < 0x7F && b != '\'' && b != '\\') {
      name += char(b);
    } else {
      name += "\\x";
      name += hex[b >> 4];
      name += hex[b & 15];
    }
  }
  return name;
}

struct ContextDeleter {
  void operator()(spng_ctx* ctx) const { spng_ctx_free(ctx); }
};
using Context = std::unique_ptr<spng_ctx, ContextDeleter>;

constexpr uint8_t kSignature[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};

uint32_t read_u32(const uint8_t* p) {
  return (uint32_t(p[0]) << 24) | (uint32_t(p[1]) << 16) | (uint32_t(p[2]) << 8) | uint32_t(p[3]);
}

void check(int rc, const char* what) {
  if (rc == SPNG_OK) return;
  fail(Status::kDecodeError, std::string("PNG ") + what + ": " + spng_strerror(rc));
}

// Verifies CRCs and copies the signature and the critical chunks (IHDR, PLTE, IDAT, IEND) into
// `critical`. A chunk running past the end is copied as it is: libspng reports the truncation.
void keep_critical_chunks(const uint8_t* data, std::size_t size, ScratchBuffer& critical, std::size_t* kept) {
  uint8_t* out = critical.reserve(size);
  std::memcpy(out, kSignature, 8);
  std::size_t pos = 8, used = 8;
  bool ended = false;
  while (pos + 12 <= size) {
    const std::size_t length = read_u32(data + pos);
    const uint8_t* type = data + pos + 4;
    if (length > size - pos - 12) {
      std::memcpy(out + used, data + pos, size - pos);
      used += size - pos;
      break;
    }
    const uint32_t stored = read_u32(data + pos + 8 + length);
    const uLong crc = crc32(crc32(0L, Z_NULL, 0), type, uInt(length + 4));
    if (crc != stored) fail(Status::kDecodeError, "PNG data: CRC mismatch in '" + chunk_name(type) + "' chunk");
    const bool is_critical = (type[0] & 0x20) == 0;  // an uppercase first letter
    if (is_critical) {
      std::memcpy(out + used, data + pos, length + 12);
      used += length + 12;
    }
    pos += length + 12;
    if (std::memcmp(type, "IEND", 4) == 0) {
      ended = true;
      break;
    }
  }
  if (!ended && pos < size && pos + 12 > size) {  // a few stray bytes: a truncated chunk header
    std::memcpy(out + used, data + pos, size - pos);
    used += size - pos;
  }
  *kept = used;
}

Context open(const uint8_t* data, std::size_t size, spng_ihdr* ihdr) {
  Context ctx(spng_ctx_new(0));
  if (!ctx) fail(Status::kOutOfMemory, "libspng: could not create a decoder");
  check(spng_set_chunk_limits(ctx.get(), 16u << 20, 64u << 20), "limits");
  check(spng_set_png_buffer(ctx.get(), data, size), "input");
  check(spng_get_ihdr(ctx.get(), ihdr), "header");
  return ctx;
}

thread_local ScratchBuffer critical_chunks;

}  // namespace

StoredSize png_read_size(const uint8_t* data, std::size_t size) {
  // The size drives everything planned before the decode (which checks every chunk): a damaged IHDR is
  // refused here, as the Python twin's CRC walk refuses it, not trusted.
  if (size >= 33 && read_u32(data + 8) == 13) {
    const uLong crc = crc32(crc32(0L, Z_NULL, 0), data + 12, 17);
    if (crc != read_u32(data + 29))
      fail(Status::kDecodeError, "PNG data: CRC mismatch in '" + chunk_name(data + 12) + "' chunk");
  }
  spng_ihdr ihdr{};
  open(data, size, &ihdr);
  return {int(ihdr.width), int(ihdr.height)};
}

// RGB8 without SPNG_DECODE_TRNS or gamma: palette, gray and alpha images come out as Pillow's
// convert("RGB") gives them (alpha dropped, tRNS ignored), 16-bit samples keep their high byte.
RgbView png_decode(const uint8_t* data, std::size_t size, ScratchBuffer& buffer) {
  std::size_t kept = 0;
  keep_critical_chunks(data, size, critical_chunks, &kept);
  spng_ihdr ihdr{};
  Context ctx = open(critical_chunks.reserve(kept), kept, &ihdr);
  std::size_t bytes = 0;
  check(spng_decoded_image_size(ctx.get(), SPNG_FMT_RGB8, &bytes), "size");
  uint8_t* pixels = buffer.reserve(bytes);
  check(spng_decode_image(ctx.get(), pixels, bytes, SPNG_FMT_RGB8, 0), "data");
  ctx.reset();  // it reads from critical_chunks
  critical_chunks.trim();
  return RgbView{pixels, int(ihdr.width), int(ihdr.height), std::ptrdiff_t(ihdr.width) * 3};
}

}  // namespace speciesclf
