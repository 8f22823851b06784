// PNG through libspng: no setjmp, errors as codes, CRCs checked, memory for chunks bounded.
#include <spng.h>

#include <memory>
#include <string>

#include "codecs.h"
#include "status.h"

namespace speciesclf {

namespace {

struct ContextDeleter {
  void operator()(spng_ctx* ctx) const { spng_ctx_free(ctx); }
};
using Context = std::unique_ptr<spng_ctx, ContextDeleter>;

void check(int rc, const char* what) {
  if (rc == SPNG_OK) return;
  fail(Status::kDecodeError, std::string("PNG ") + what + ": " + spng_strerror(rc));
}

Context open(const uint8_t* data, std::size_t size, spng_ihdr* ihdr) {
  Context ctx(spng_ctx_new(0));
  if (!ctx) fail(Status::kOutOfMemory, "libspng: could not create a decoder");
  // Ancillary chunks (text, ICC) are not needed; cap what a hostile file can make us hold.
  check(spng_set_chunk_limits(ctx.get(), 16u << 20, 64u << 20), "limits");
  check(spng_set_png_buffer(ctx.get(), data, size), "input");
  check(spng_get_ihdr(ctx.get(), ihdr), "header");
  return ctx;
}

}  // namespace

StoredSize png_read_size(const uint8_t* data, std::size_t size) {
  spng_ihdr ihdr{};
  open(data, size, &ihdr);
  return {int(ihdr.width), int(ihdr.height)};
}

// RGB8 without SPNG_DECODE_TRNS or gamma: palette, gray and alpha images come out as Pillow's
// convert("RGB") gives them (alpha dropped, tRNS ignored), 16-bit samples keep their high byte.
RgbView png_decode(const uint8_t* data, std::size_t size, ScratchBuffer& buffer) {
  spng_ihdr ihdr{};
  Context ctx = open(data, size, &ihdr);
  std::size_t bytes = 0;
  check(spng_decoded_image_size(ctx.get(), SPNG_FMT_RGB8, &bytes), "size");
  uint8_t* pixels = buffer.reserve(bytes);
  check(spng_decode_image(ctx.get(), pixels, bytes, SPNG_FMT_RGB8, 0), "data");
  return RgbView{pixels, int(ihdr.width), int(ihdr.height), std::ptrdiff_t(ihdr.width) * 3};
}

}  // namespace speciesclf
