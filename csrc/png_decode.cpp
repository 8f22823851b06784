// PNG through libspng: no setjmp, errors as codes, memory for chunks bounded. Before libspng sees the
// file, every chunk's CRC is checked (libspng skips some, Pillow skips IDAT's: we check all, as the
// Python path does) and ancillary chunks are dropped: no ancillary chunk changes the RGB we produce,
// and a malformed one (an empty eXIf, say) must not cost the image.
#include <spng.h>
#include <zlib.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "codecs.h"
#include "exif.h"
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

// --- orientation -------------------------------------------------------------------------------------
// As Pillow finds it: the eXIf chunk; else the "Raw profile type exif" text chunk (ImageMagick's: hex
// after three header lines, in tEXt, zTXt or iTXt); then, if neither holds an orientation tag, the XMP
// packet (a text chunk "XML:com.adobe.xmp"). Of several chunks of one kind the last counts (Pillow's info
// dict keeps the last), also after the image data. Twin of _png_orientation in _formats.py.

constexpr char kRawProfileKey[] = "Raw profile type exif";
constexpr char kXmpKey[] = "XML:com.adobe.xmp";
// Compressed text past this is ignored (Pillow's PngImagePlugin.MAX_TEXT_CHUNK refuses the file): only
// the last chunk of each kind is ever inflated, so a file costs at most two such inflations.
constexpr std::size_t kTextBudget = 1u << 20;

struct TextCarrier {
  const uint8_t* text = nullptr;  // after the chunk's header fields
  std::size_t size = 0;
  bool compressed = false;
  bool found = false;
};

bool has_keyword(const uint8_t* payload, std::size_t size, const char* keyword, std::size_t* after) {
  const std::size_t n = std::strlen(keyword);
  if (size < n || std::memcmp(payload, keyword, n) != 0 || (size > n && payload[n] != 0)) return false;
  *after = n;
  return true;
}

// Fills `carrier` for a text chunk with one of our keywords. tEXt and zTXt chunks without a separator hold
// the keyword and an empty text, as Pillow reads them; an iTXt chunk with a broken header, and a zTXt or
// iTXt chunk compressed by an unknown method, are no carriers at all (Pillow skips them, or refuses the file).
bool read_text_header(const uint8_t* type, const uint8_t* payload, std::size_t size, const char** keyword,
                      TextCarrier* carrier) {
  std::size_t after = 0;
  if (has_keyword(payload, size, kRawProfileKey, &after)) *keyword = kRawProfileKey;
  else if (has_keyword(payload, size, kXmpKey, &after)) *keyword = kXmpKey;
  else return false;
  const bool itxt = std::memcmp(type, "iTXt", 4) == 0, ztxt = std::memcmp(type, "zTXt", 4) == 0;
  *carrier = TextCarrier{payload + size, 0, false, true};
  if (after == size) return !itxt;
  std::size_t text = after + 1;
  if (!itxt && !ztxt) {
    *carrier = TextCarrier{payload + text, size - text, false, true};
    return true;
  }
  if (ztxt) {
    if (text == size) return true;
    if (payload[text] != 0) return false;
    *carrier = TextCarrier{payload + text + 1, size - text - 1, true, true};
    return true;
  }
  if (size - text < 2) return false;
  const bool compressed = payload[text] != 0;
  const uint8_t method = payload[text + 1];
  const uint8_t* end = payload + size;
  const uint8_t* language_end = static_cast<const uint8_t*>(std::memchr(payload + text + 2, 0, size - text - 2));
  if (language_end == nullptr) return false;
  const uint8_t* translated_end =
      static_cast<const uint8_t*>(std::memchr(language_end + 1, 0, std::size_t(end - language_end - 1)));
  if (translated_end == nullptr || (compressed && method != 0)) return false;
  *carrier = TextCarrier{translated_end + 1, std::size_t(end - translated_end - 1), compressed, true};
  return true;
}

// The carrier's text; false where it does not inflate, or inflates past kTextBudget. A zlib stream cut
// short gives what it holds, as Python's zlib (so Pillow) gives it.
bool carrier_text(const TextCarrier& carrier, std::vector<uint8_t>& inflated, const uint8_t** text,
                  std::size_t* size) {
  if (!carrier.compressed) {
    *text = carrier.text;
    *size = carrier.size;
    return true;
  }
  z_stream stream{};
  if (inflateInit(&stream) != Z_OK) return false;
  stream.next_in = const_cast<Bytef*>(carrier.text);
  stream.avail_in = uInt(std::min<std::size_t>(carrier.size, 0xFFFFFFFFu));
  inflated.resize(std::min<std::size_t>(kTextBudget + 1, 64u << 10));
  std::size_t produced = 0;
  int rc = Z_OK;
  for (;;) {
    stream.next_out = inflated.data() + produced;
    stream.avail_out = uInt(inflated.size() - produced);
    rc = inflate(&stream, Z_SYNC_FLUSH);  // as CPython's zlib decompresses
    produced = inflated.size() - stream.avail_out;
    if (rc != Z_OK) break;  // the end, damage, or no progress possible (the input ran out)
    if (stream.avail_out == 0) {
      if (inflated.size() > kTextBudget) break;
      inflated.resize(std::min(kTextBudget + 1, inflated.size() * 2));
    }
  }
  inflateEnd(&stream);
  if ((rc != Z_OK && rc != Z_STREAM_END && rc != Z_BUF_ERROR) || produced > kTextBudget) return false;
  *text = inflated.data();
  *size = produced;
  return true;
}

bool is_hex_space(uint8_t c) { return c == ' ' || (c >= '\t' && c <= '\r'); }

int hex_value(uint8_t c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// The EXIF block of a raw profile: Pillow's bytes.fromhex("".join(text.split("\n")[3:])), so hex digits
// in pairs with ASCII whitespace between them, after three lines; false for anything else.
bool raw_profile_exif(const uint8_t* text, std::size_t size, std::vector<uint8_t>& exif) {
  const uint8_t* at = text;
  const uint8_t* const end = text + size;
  for (int line = 0; line < 3; ++line) {
    at = static_cast<const uint8_t*>(std::memchr(at, '\n', std::size_t(end - at)));
    if (at == nullptr) {
      exif.clear();
      return true;
    }
    ++at;
  }
  exif.clear();
  exif.reserve(std::size_t(end - at) / 2);
  while (at < end) {
    if (is_hex_space(*at)) {
      ++at;
      continue;
    }
    const int high = hex_value(*at++);
    // Lines are joined first, so a newline (only) may split a pair.
    while (at < end && *at == '\n') ++at;
    const int low = at < end ? hex_value(*at++) : -1;
    if (high < 0 || low < 0) return false;
    exif.push_back(uint8_t(high * 16 + low));
  }
  return true;
}

}  // namespace

int png_orientation(const uint8_t* data, std::size_t size) {
  const uint8_t* exif = nullptr;
  std::size_t exif_size = 0;
  TextCarrier raw_profile, xmp;
  std::size_t pos = 8;
  while (pos + 12 <= size) {
    const std::size_t length = read_u32(data + pos);
    if (length > size - pos - 12) break;  // truncated: the decoder reports it
    const uint8_t* type = data + pos + 4;
    const uint8_t* payload = data + pos + 8;
    if (std::memcmp(type, "eXIf", 4) == 0) {
      exif = payload;
      exif_size = length;
    } else if (std::memcmp(type, "tEXt", 4) == 0 || std::memcmp(type, "zTXt", 4) == 0 ||
               std::memcmp(type, "iTXt", 4) == 0) {
      const char* keyword = nullptr;
      TextCarrier carrier;
      if (read_text_header(type, payload, length, &keyword, &carrier))
        (keyword == kRawProfileKey ? raw_profile : xmp) = carrier;
    } else if (std::memcmp(type, "IEND", 4) == 0) {
      break;
    }
    pos += 12 + length;
  }
  int tag = 0;
  std::vector<uint8_t> inflated, block;
  const uint8_t* text = nullptr;
  std::size_t text_size = 0;
  if (exif != nullptr) {
    tag = tiff_orientation_tag(exif, exif_size);
  } else if (raw_profile.found && carrier_text(raw_profile, inflated, &text, &text_size) &&
             raw_profile_exif(text, text_size, block) && !block.empty()) {
    tag = tiff_orientation_tag(block.data(), block.size());
  }
  if (tag == 0 && xmp.found && carrier_text(xmp, inflated, &text, &text_size)) tag = xmp_orientation(text, text_size);
  return tag == 0 ? 1 : tag;
}

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
