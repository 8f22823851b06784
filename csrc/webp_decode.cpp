// Still WebP through libwebp. Animated files go to Pillow, which takes their first frame.
#include <webp/decode.h>

#include <string>

#include "codecs.h"
#include "status.h"

namespace speciesclf {

namespace {

const char* vp8_status_name(VP8StatusCode code) {
  switch (code) {
    case VP8_STATUS_OUT_OF_MEMORY: return "out of memory";
    case VP8_STATUS_INVALID_PARAM: return "invalid parameter";
    case VP8_STATUS_BITSTREAM_ERROR: return "bitstream error";
    case VP8_STATUS_UNSUPPORTED_FEATURE: return "unsupported feature";
    case VP8_STATUS_SUSPENDED: return "suspended";
    case VP8_STATUS_USER_ABORT: return "aborted";
    case VP8_STATUS_NOT_ENOUGH_DATA: return "not enough data (truncated file)";
    default: return "unknown error";
  }
}

WebPBitstreamFeatures features_of(const uint8_t* data, std::size_t size) {
  WebPBitstreamFeatures features;
  const VP8StatusCode rc = WebPGetFeatures(data, size, &features);
  if (rc != VP8_STATUS_OK) fail(Status::kDecodeError, std::string("WebP header: ") + vp8_status_name(rc));
  if (features.width <= 0 || features.height <= 0) fail(Status::kDecodeError, "WebP header: zero image size");
  return features;
}

}  // namespace

bool webp_read_size(const uint8_t* data, std::size_t size, StoredSize* out) {
  const WebPBitstreamFeatures features = features_of(data, size);
  *out = {features.width, features.height};
  return !features.has_animation;
}

// Alpha is dropped, not composited, and transparent pixels keep their stored colour: Pillow's
// convert("RGB") of a WebP.
RgbView webp_decode(const uint8_t* data, std::size_t size, ScratchBuffer& buffer) {
  const WebPBitstreamFeatures features = features_of(data, size);
  const int width = features.width, height = features.height;
  const std::size_t bytes = std::size_t(width) * height * 3;
  uint8_t* pixels = buffer.reserve(bytes);

  WebPDecoderConfig config;
  if (!WebPInitDecoderConfig(&config)) fail(Status::kInternal, "libwebp: version mismatch");
  config.output.colorspace = MODE_RGB;
  config.output.is_external_memory = 1;
  config.output.u.RGBA.rgba = pixels;
  config.output.u.RGBA.stride = width * 3;
  config.output.u.RGBA.size = bytes;
  const VP8StatusCode rc = WebPDecode(data, size, &config);
  if (rc != VP8_STATUS_OK) fail(Status::kDecodeError, std::string("WebP: ") + vp8_status_name(rc));
  return RgbView{pixels, width, height, std::ptrdiff_t(width) * 3};
}

}  // namespace speciesclf
