// JPEG through libjpeg-turbo's libjpeg API, for its reduced-size DCT and its partial decoding
// (jpeg_crop_scanline, jpeg_skip_scanlines). One decompressor per worker thread, reused across images.
#include <algorithm>
#include <csetjmp>
#include <cstdio>
#include <cstring>
#include <string>

#include <jpeglib.h>
#include <jerror.h>

#include "codecs.h"
#include "status.h"

namespace speciesclf {

namespace {

// Upsampling and IDCT read neighbours across block edges; a margin of two 16-pixel iMCUs around the
// needed region keeps every needed pixel identical to a full decode.
constexpr int kCropMargin = 32;
// Each progressive scan is a pass over the whole image, so a few hundred scans of a huge image are seconds
// of work for a tiny file: a budget of scans x pixels keeps any image under about a quarter of a second,
// while real encoders' 6-20 scans always pass. The twin of _formats.jpeg_scan_limit.
constexpr long long kMaxScans = 500;
constexpr long long kScanPixelBudget = 1LL << 31;

long long scan_limit(long long pixels) {
  return std::max(16LL, std::min(kMaxScans, kScanPixelBudget / std::max(pixels, 1LL)));
}

struct ErrorManager {
  jpeg_error_mgr base;
  std::jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
  bool ran_out_of_data;
};

void on_error(j_common_ptr cinfo) {
  auto* err = reinterpret_cast<ErrorManager*>(cinfo->err);
  (*cinfo->err->format_message)(cinfo, err->message);
  std::longjmp(err->jump, 1);
}

// Warnings about stray bytes leave a usable image (Pillow accepts them too); running out of data does not.
void on_message(j_common_ptr cinfo, int level) {
  auto* err = reinterpret_cast<ErrorManager*>(cinfo->err);
  if (level < 0 && cinfo->err->msg_code == JWRN_JPEG_EOF) err->ran_out_of_data = true;
}

void on_progress(j_common_ptr cinfo) {
  auto* d = reinterpret_cast<j_decompress_ptr>(cinfo);
  const long long limit = scan_limit(static_cast<long long>(d->image_width) * d->image_height);
  if (d->input_scan_number > limit) {
    auto* err = reinterpret_cast<ErrorManager*>(cinfo->err);
    std::snprintf(err->message, sizeof err->message, "more than %lld progressive scans", limit);
    std::longjmp(err->jump, 1);
  }
}

struct Decompressor {
  jpeg_decompress_struct cinfo;
  ErrorManager err;
  jpeg_progress_mgr progress;
  bool ready = false;

  Decompressor() {
    cinfo.err = jpeg_std_error(&err.base);
    err.base.error_exit = on_error;
    err.base.emit_message = on_message;
    if (setjmp(err.jump)) return;  // out of memory while creating: `ready` stays false
    jpeg_create_decompress(&cinfo);
    progress.progress_monitor = on_progress;
    cinfo.progress = &progress;
    ready = true;
  }
  ~Decompressor() {
    if (ready) jpeg_destroy_decompress(&cinfo);
  }
};

Decompressor& thread_decompressor() {
  thread_local Decompressor d;
  if (!d.ready) fail(Status::kOutOfMemory, "libjpeg: could not create a decompressor");
  return d;
}

// Pillow reads every CMYK JPEG as inverted ("Adobe") CMYK, then converts with
// rgb = (255 - k') - (255 - k') * c' / 255 in its MULDIV255 integer form. Done in place:
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

struct Decoded {
  uint8_t* pixels;
  int width, height;          // scaled image
  int x0, y0, columns, rows;  // the part that was decoded
  int channels;
};

// Plain C control flow only between setjmp and any longjmp: nothing here has a destructor.
bool decode_into(Decompressor& d, const uint8_t* data, std::size_t size, int scale_denom, const Region* needed,
                 ScratchBuffer& buffer, Decoded* out, bool header_only) {
  jpeg_decompress_struct& cinfo = d.cinfo;
  // A C++ exception (std::bad_alloc from the scratch buffer below) leaves this thread's decompressor
  // mid-decode; resetting it first keeps that failure from spilling into the next image.
  jpeg_abort_decompress(&cinfo);
  d.err.ran_out_of_data = false;
  d.err.message[0] = '\0';
  if (setjmp(d.err.jump)) {
    jpeg_abort_decompress(&cinfo);
    return false;
  }
  jpeg_mem_src(&cinfo, data, static_cast<unsigned long>(size));
  jpeg_read_header(&cinfo, TRUE);
  if (header_only) {
    out->width = int(cinfo.image_width);
    out->height = int(cinfo.image_height);
    jpeg_abort_decompress(&cinfo);
    return true;
  }
  const bool cmyk = cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK;
  cinfo.out_color_space = cmyk ? JCS_CMYK : JCS_RGB;
  cinfo.scale_num = 1;
  cinfo.scale_denom = unsigned(scale_denom);
  cinfo.dct_method = JDCT_ISLOW;  // what Pillow uses: the same pixels
  cinfo.do_fancy_upsampling = TRUE;
  jpeg_start_decompress(&cinfo);
  out->width = int(cinfo.output_width);
  out->height = int(cinfo.output_height);
  out->channels = cmyk ? 4 : 3;

  JDIMENSION x0 = 0, columns = cinfo.output_width;
  int y0 = 0, y1 = out->height;
  if (needed) {
    const int nx0 = needed->x0 - kCropMargin > 0 ? needed->x0 - kCropMargin : 0;
    const int nx1 = needed->x1 + kCropMargin < out->width ? needed->x1 + kCropMargin : out->width;
    if (nx0 > 0 || nx1 < out->width) {
      x0 = JDIMENSION(nx0);
      columns = JDIMENSION(nx1 - nx0);
      jpeg_crop_scanline(&cinfo, &x0, &columns);  // widens to iMCU boundaries
    }
    y0 = needed->y0 - kCropMargin > 0 ? needed->y0 - kCropMargin : 0;
    y1 = needed->y1 + kCropMargin < out->height ? needed->y1 + kCropMargin : out->height;
  }
  const std::size_t stride = std::size_t(columns) * out->channels;
  uint8_t* pixels = buffer.reserve(stride * std::size_t(y1 - y0));
  if (y0 > 0) jpeg_skip_scanlines(&cinfo, JDIMENSION(y0));
  while (int(cinfo.output_scanline) < y1) {
    JSAMPROW row = pixels + stride * (cinfo.output_scanline - JDIMENSION(y0));
    jpeg_read_scanlines(&cinfo, &row, 1);
  }
  // Entropy-decode the rest so a truncated file is noticed, as a full decode (and Pillow) would.
  if (int(cinfo.output_scanline) < out->height)
    jpeg_skip_scanlines(&cinfo, cinfo.output_height - cinfo.output_scanline);
  jpeg_finish_decompress(&cinfo);
  out->pixels = pixels;
  out->x0 = int(x0);
  out->y0 = y0;
  out->columns = int(columns);
  out->rows = y1 - y0;
  return true;
}

}  // namespace

StoredSize jpeg_read_size(const uint8_t* data, std::size_t size) {
  Decompressor& d = thread_decompressor();
  ScratchBuffer unused;
  Decoded decoded{};
  if (!decode_into(d, data, size, 1, nullptr, unused, &decoded, /*header_only=*/true))
    fail(Status::kDecodeError, std::string("JPEG header: ") + d.err.message);
  if (decoded.width <= 0 || decoded.height <= 0) fail(Status::kDecodeError, "JPEG header: zero image size");
  return {decoded.width, decoded.height};
}

RgbView jpeg_decode(const uint8_t* data, std::size_t size, int scale_denom, const Region* needed,
                    ScratchBuffer& buffer) {
  Decompressor& d = thread_decompressor();
  Decoded decoded{};
  if (!decode_into(d, data, size, scale_denom, needed, buffer, &decoded, /*header_only=*/false))
    fail(Status::kDecodeError, std::string("JPEG: ") + d.err.message);
  if (d.err.ran_out_of_data) fail(Status::kDecodeError, "JPEG is truncated: premature end of data");
  if (decoded.channels == 4) inverted_cmyk_to_rgb(decoded.pixels, std::size_t(decoded.columns) * decoded.rows);
  RgbView view;
  view.data = decoded.pixels;
  view.width = decoded.width;
  view.height = decoded.height;
  view.row_stride = std::ptrdiff_t(decoded.columns) * 3;
  view.x_offset = decoded.x0;
  view.y_offset = decoded.y0;
  return view;
}

}  // namespace speciesclf
