// One image from bytes or pixels to its slot of the output batch: decode at the right DCT
// reduction, turn upright, resize only what the crop keeps, normalise, convert dtype and layout.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "decoder.h"
#include "output_format.h"
#include "resample.h"
#include "status.h"

namespace speciesclf {

constexpr uint64_t kDefaultMaxPixels = 89478485;  // spec.DEFAULT_MAX_PIXELS, Pillow's bomb threshold

struct OutputSpec {
  int size = 224;
  int resize = 256;  // shorter side before the centre crop; 0 squashes straight to size x size
  Filter filter = Filter::kBilinear;
  DType dtype = DType::kFloat32;
  Layout layout = Layout::kNCHW;
  float mean[3] = {0.485f, 0.456f, 0.406f};
  float std[3] = {0.229f, 0.224f, 0.225f};
  Limits limits{kDefaultMaxPixels, 64u << 20};
  double reduce_margin = 1.25;  // see PreprocessSpec.jpeg_reduce_margin; 0 never reduces
};

// torchvision's Resize(resize) + CenterCrop(size) on a width x height image (or a squash). The resized image
// has at most max(max_pixels, kDefaultMaxPixels) pixels and a longer side of at most kMaxResizedSide (int
// geometry): beyond either, kImageTooLarge. The twin of spec.plan_geometry.
constexpr int kMaxResizedSide = 1 << 24;
struct Geometry {
  int resized_width, resized_height;
  int crop_x, crop_y;
};
Geometry plan_geometry(int width, int height, int size, int resize, uint64_t max_pixels);

// The source rectangle of a reduced decode, (0, 0, W/r, H/r) in stored coordinates, carried through
// the EXIF orientation (the decoded image's padding column moves with it).
void upright_box(const Probe& probe, int reduction, int decoded_width, int decoded_height, double box[4]);

// What a worker needs to know about one input.
struct Item {
  const uint8_t* data = nullptr;
  std::size_t size = 0;     // encoded bytes; 0 with `pixels`
  bool pixels = false;      // an H x W x channels uint8 array
  int height = 0, width = 0, channels = 0;
  std::ptrdiff_t row_stride = 0;
};

class Preprocessor {
 public:
  explicit Preprocessor(const OutputSpec& spec);
  std::size_t slot_bytes() const { return slot_bytes_; }
  // Never throws: a failure is returned with its message and the slot is left as it was.
  // seconds[0] gets the decode time, seconds[1] the resize-and-write time (when seconds is not null).
  Status run(const Item& item, uint8_t* slot, std::string* message, double* seconds = nullptr) const;

 private:
  void write_row(uint8_t* slot, int row, const uint8_t* rgb) const;
  OutputSpec spec_;
  std::size_t slot_bytes_;
  float lut_[3][256];        // value -> normalised float32, computed as torchvision does
  uint16_t bits16_lut_[3][256];  // the same as float16 or bfloat16 bits, for those dtypes
};

// The [3][256] table of `lut_` above, for the GPU path.
void normalization_table(const OutputSpec& spec, float table[3][256]);

}  // namespace speciesclf
