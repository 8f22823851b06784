// How both Python modules read one input of a batch (while the GIL is held): encoded bytes or an
// HxW[xC] uint8 pixel array. What cannot be read is that item's failure, not the batch's.
#pragma once

#include <pybind11/pybind11.h>

#include <string>

#include "pipeline.h"

namespace speciesclf {

inline Item describe_item(const pybind11::buffer_info& info, Status* status, std::string* message) {
  Item item;
  if (info.ndim == 1 && info.itemsize == 1) {
    if (info.size > 1 && info.strides[0] != 1) {
      *status = Status::kInvalidImage;
      *message = "encoded bytes must be contiguous";
    }
    item.data = static_cast<const uint8_t*>(info.ptr);
    item.size = std::size_t(info.size);
    return item;
  }
  if ((info.ndim == 2 || info.ndim == 3) && info.format == pybind11::format_descriptor<uint8_t>::format()) {
    item.pixels = true;
    item.height = int(info.shape[0]);
    item.width = int(info.shape[1]);
    item.channels = info.ndim == 3 ? int(info.shape[2]) : 1;
    item.row_stride = info.strides[0];
    item.data = static_cast<const uint8_t*>(info.ptr);
    const bool packed = info.strides[1] == item.channels && (info.ndim == 2 || info.strides[2] == 1);
    if (!packed || item.row_stride < std::ptrdiff_t(item.width) * item.channels) {
      *status = Status::kInvalidImage;
      *message = "pixel array rows must be packed (use numpy.ascontiguousarray)";
    }
    return item;
  }
  *status = Status::kInvalidImage;
  *message = "expected encoded bytes or an HxW[xC] uint8 array, got a buffer of " + std::to_string(info.ndim) +
             " dimension(s) and format '" + info.format + "'";
  return item;
}

}  // namespace speciesclf
