// JPEG through the TurboJPEG API of libjpeg-turbo: one decompressor handle per worker thread.
#include <turbojpeg.h>

#include <cstring>
#include <string>

#include "codecs.h"
#include "status.h"

namespace speciesclf {

namespace {

struct DecompressHandle {
  tjhandle handle = tjInitDecompress();
  ~DecompressHandle() {
    if (handle) tjDestroy(handle);
  }
};

tjhandle thread_handle() {
  thread_local DecompressHandle h;
  if (!h.handle) fail(Status::kOutOfMemory, "TurboJPEG: could not create a decompressor");
  return h.handle;
}

struct Header {
  int width, height, subsampling, colorspace;
};

Header read_header(tjhandle handle, const uint8_t* data, std::size_t size) {
  Header h{};
  if (tjDecompressHeader3(handle, data, static_cast<unsigned long>(size), &h.width, &h.height,
                          &h.subsampling, &h.colorspace) != 0)
    fail(Status::kDecodeError, std::string("JPEG header: ") + tjGetErrorStr2(handle));
  if (h.width <= 0 || h.height <= 0) fail(Status::kDecodeError, "JPEG header: zero image size");
  return h;
}

// A complete JPEG ends with EOI; some writers pad after it with zeros.
bool ends_with_eoi(const uint8_t* data, std::size_t size) {
  while (size > 2 && data[size - 1] == 0) --size;
  return size >= 2 && data[size - 2] == 0xFF && data[size - 1] == 0xD9;
}

// Pillow reads every CMYK JPEG as inverted ("Adobe") CMYK, then converts with
// rgb = (255 - k') - (255 - k') * c' / 255 computed in its MULDIV255 integer form. Done in place:
// pixel i moves from byte 4i to 3i, which never overtakes an unread pixel.
void inverted_cmyk_to_rgb(uint8_t* pixels, std::size_t count) {
  for (std::size_t i = 0; i < count; ++i) {
    const uint8_t* in = pixels + 4 * i;
    const int nk = in[3];  // 255 - k with k = 255 - stored
    int rgb[3];
    for (int c = 0; c < 3; ++c) {
      const int ink = 255 - in[c];
      const int t = ink * nk + 128;
      const int v = nk - (((t >> 8) + t) >> 8);
      rgb[c] = v < 0 ? 0 : (v > 255 ? 255 : v);
    }
    uint8_t* out = pixels + 3 * i;
    out[0] = uint8_t(rgb[0]);
    out[1] = uint8_t(rgb[1]);
    out[2] = uint8_t(rgb[2]);
  }
}

}  // namespace

StoredSize jpeg_read_size(const uint8_t* data, std::size_t size) {
  const Header h = read_header(thread_handle(), data, size);
  return {h.width, h.height};
}

RgbView jpeg_decode(const uint8_t* data, std::size_t size, int scale_denom, ScratchBuffer& buffer) {
  tjhandle handle = thread_handle();
  const Header h = read_header(handle, data, size);
  const tjscalingfactor factor{1, scale_denom};
  const int width = TJSCALED(h.width, factor);
  const int height = TJSCALED(h.height, factor);
  const bool cmyk = h.colorspace == TJCS_CMYK || h.colorspace == TJCS_YCCK;
  const int pixel_format = cmyk ? TJPF_CMYK : TJPF_RGB;
  const int channels = cmyk ? 4 : 3;
  uint8_t* pixels = buffer.reserve(std::size_t(width) * height * channels);
  // LIMITSCANS bounds the work a hostile progressive file can ask for.
  const int flags = TJFLAG_ACCURATEDCT | TJFLAG_LIMITSCANS;
  if (tjDecompress2(handle, data, static_cast<unsigned long>(size), pixels, width, width * channels,
                    height, pixel_format, flags) != 0) {
    const bool warning_only = tjGetErrorCode(handle) == TJERR_WARNING;
    // A warning on a file that still ends properly (stray bytes before a marker) leaves a good image,
    // as it does for Pillow; running out of data means the rest of the picture was made up.
    if (!warning_only) fail(Status::kDecodeError, std::string("JPEG: ") + tjGetErrorStr2(handle));
    if (!ends_with_eoi(data, size))
      fail(Status::kDecodeError, std::string("JPEG is truncated: ") + tjGetErrorStr2(handle));
  }
  if (cmyk) inverted_cmyk_to_rgb(pixels, std::size_t(width) * height);
  return RgbView{pixels, width, height, std::ptrdiff_t(width) * 3};
}

}  // namespace speciesclf
