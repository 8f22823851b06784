// How both Python modules read one input of a batch (while the GIL is held): encoded bytes or an
// HxW[xC] uint8 pixel array. What cannot be read is that item's failure, not the batch's.
#pragma once

#include <pybind11/pybind11.h>

#include <string>
#include <vector>

#include "pipeline.h"

namespace speciesclf {

// A failure message as a Python str. Codec messages are ASCII, but one that quotes a hostile file's bytes
// must not turn into a UnicodeDecodeError that loses the whole batch: invalid UTF-8 is replaced.
inline pybind11::str message_text(const std::string& message) {
  PyObject* text = PyUnicode_DecodeUTF8(message.data(), Py_ssize_t(message.size()), "replace");
  if (text == nullptr) throw pybind11::error_already_set();
  return pybind11::reinterpret_steal<pybind11::str>(text);
}

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

// A whole batch, read while the GIL is held. `views` keeps every input alive and pinned until the GIL
// comes back; an item that is no buffer at all gets its failure here.
struct DescribedBatch {
  std::vector<pybind11::buffer_info> views;
  std::vector<Item> items;
  std::vector<Status> statuses;
  std::vector<std::string> messages;

  explicit DescribedBatch(const pybind11::list& inputs) {
    const std::size_t n = std::size_t(pybind11::len(inputs));
    views.reserve(n);
    items.resize(n);
    statuses.assign(n, Status::kOk);
    messages.resize(n);
    for (std::size_t i = 0; i < n; ++i) {
      pybind11::handle obj = inputs[i];
      try {
        views.emplace_back(pybind11::reinterpret_borrow<pybind11::buffer>(obj).request());
      } catch (const pybind11::error_already_set&) {
        views.emplace_back();
        statuses[i] = Status::kInvalidImage;
        messages[i] = std::string("not a buffer: ") + pybind11::str(pybind11::type::of(obj)).cast<std::string>();
        continue;
      }
      items[i] = describe_item(views.back(), &statuses[i], &messages[i]);
    }
  }
};

}  // namespace speciesclf
