// speciesclf._native: the Python face of the C++ core. Buffers in (buffer protocol), errors out as
// (slot, status, message) triples that python/speciesclf/errors.py turns into typed exceptions.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "decoder.h"
#include "fused_job.h"
#include "pipeline.h"
#include "python_items.h"
#include "thread_pool.h"

namespace py = pybind11;
using namespace speciesclf;

namespace {

std::size_t itemsize_of(DType dtype) { return std::size_t(dtype_size(dtype)); }

bool is_c_contiguous(const py::buffer_info& info) {
  py::ssize_t expected = info.itemsize;
  for (py::ssize_t d = info.ndim - 1; d >= 0; --d) {
    if (info.shape[d] > 1 && info.strides[d] != expected) return false;
    expected *= info.shape[d];
  }
  return true;
}

py::list preprocess(const py::list& items, const py::buffer& out, int size, int resize, int filter, int dtype,
                    int layout, std::vector<float> mean, std::vector<float> std_, uint64_t max_pixels,
                    uint64_t max_bytes, double reduce_margin, int threads, std::vector<std::size_t> slots,
                    const py::object& timings) {
  OutputSpec spec;
  spec.size = size;
  spec.resize = resize;
  spec.filter = static_cast<Filter>(filter);
  spec.dtype = static_cast<DType>(dtype);
  spec.layout = static_cast<Layout>(layout);
  if (mean.size() != 3 || std_.size() != 3) throw py::value_error("mean and std need 3 values");
  for (int c = 0; c < 3; ++c) {
    spec.mean[c] = mean[c];
    spec.std[c] = std_[c];
  }
  spec.limits = Limits{max_pixels, max_bytes};
  spec.reduce_margin = reduce_margin;
  if (size <= 0 || resize < 0) throw py::value_error("size must be positive and resize non-negative");
  const Preprocessor preprocessor(spec);

  py::buffer_info out_info = out.request(/*writable=*/true);
  if (std::size_t(out_info.itemsize) != itemsize_of(spec.dtype))
    throw py::value_error("out has itemsize " + std::to_string(out_info.itemsize) + ", the spec's dtype needs " +
                          std::to_string(itemsize_of(spec.dtype)));
  if (!is_c_contiguous(out_info)) throw py::value_error("out must be C-contiguous");
  const std::size_t out_bytes = std::size_t(out_info.size) * out_info.itemsize;
  const std::size_t capacity = out_bytes / preprocessor.slot_bytes();
  if (out_bytes % preprocessor.slot_bytes() != 0)
    throw py::value_error("out is not a whole number of images of the spec's size");

  const std::size_t n = std::size_t(py::len(items));
  if (!slots.empty() && slots.size() != n) throw py::value_error("slots must give one slot per item");
  if (slots.empty()) {
    slots.resize(n);
    for (std::size_t i = 0; i < n; ++i) slots[i] = i;
  }
  for (std::size_t s : slots)
    if (s >= capacity) throw py::value_error("out holds " + std::to_string(capacity) + " images, slot " +
                                             std::to_string(s) + " is past its end");

  DescribedBatch batch(items);
  std::vector<Item>& work = batch.items;
  std::vector<Status>& statuses = batch.statuses;
  std::vector<std::string>& messages = batch.messages;

  // Optional (capacity, 2) float64 array: per slot, seconds spent decoding and resizing.
  double* seconds = nullptr;
  py::buffer_info timing_info;
  if (!timings.is_none()) {
    timing_info = py::reinterpret_borrow<py::buffer>(timings).request(/*writable=*/true);
    if (timing_info.format != py::format_descriptor<double>::format() || !is_c_contiguous(timing_info) ||
        std::size_t(timing_info.size) < capacity * 2)
      throw py::value_error("timings must be a C-contiguous float64 array of at least (len(out), 2)");
    seconds = static_cast<double*>(timing_info.ptr);
  }
  uint8_t* base = static_cast<uint8_t*>(out_info.ptr);
  // The threads take items in this order, costliest first (encoded size, or pixels), so that the last
  // item any thread starts is a cheap one and they finish close together rather than one waiting on
  // another's large photo. Each item still goes to its own slot.
  std::vector<std::size_t> order(n);
  for (std::size_t i = 0; i < n; ++i) order[i] = i;
  if (threads != 1 && n > 2) {
    auto cost = [&work](std::size_t i) {
      return work[i].pixels ? std::size_t(work[i].height) * std::size_t(work[i].width) : work[i].size;
    };
    std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return cost(a) > cost(b); });
  }
  {
    py::gil_scoped_release release;
    ThreadPool::instance().parallel_for(n, threads, [&](std::size_t k) {
      const std::size_t i = order[k];
      if (statuses[i] != Status::kOk) return;
      statuses[i] = preprocessor.run(work[i], base + slots[i] * preprocessor.slot_bytes(), &messages[i],
                                     seconds ? seconds + 2 * slots[i] : nullptr);
    });
  }

  py::list failures;
  for (std::size_t i = 0; i < n; ++i)
    if (statuses[i] != Status::kOk)
      failures.append(py::make_tuple(slots[i], int(statuses[i]), message_text(messages[i])));
  return failures;
}

// Runs one image's native work with the GIL released; its failure comes back as a status and a message.
template <class Work>
Status without_gil(std::string* message, Work&& work) {
  py::gil_scoped_release release;
  try {
    work();
    return Status::kOk;
  } catch (const ImageFailure& f) {
    *message = f.what();
    return f.status();
  } catch (const std::bad_alloc&) {
    *message = "out of memory";
    return Status::kOutOfMemory;
  }
}

// Returns (status, message, array or None).
py::tuple decode(const py::buffer& data, int min_width, int min_height, uint64_t max_pixels, uint64_t max_bytes) {
  py::buffer_info info = data.request();
  if (info.ndim != 1 || info.itemsize != 1 || (info.size > 1 && info.strides[0] != 1))
    throw py::type_error("decode() takes contiguous encoded bytes");
  const auto* bytes = static_cast<const uint8_t*>(info.ptr);
  const std::size_t size = std::size_t(info.size);
  thread_local ScratchBuffer decoded, oriented;
  RgbView view;
  std::string message;
  const Status status = without_gil(&message, [&] {
    const Probe probe = probe_image(bytes, size, Limits{max_pixels, max_bytes});
    const int reduction = reduction_for(probe, min_width, min_height, 1.0);
    view = decode_upright(probe, bytes, size, reduction, /*needed=*/nullptr, decoded, oriented);
  });
  struct Trim {  // after the copy, or on any way out
    ScratchBuffer& a;
    ScratchBuffer& b;
    ~Trim() {
      a.trim();
      b.trim();
    }
  } trim{decoded, oriented};
  if (status != Status::kOk) return py::make_tuple(int(status), message_text(message), py::none());
  py::array_t<uint8_t> array({view.height, view.width, 3});
  uint8_t* dst = array.mutable_data();
  for (int y = 0; y < view.height; ++y)
    std::memcpy(dst + std::size_t(y) * view.width * 3, view.pixel(0, y),
                std::size_t(view.width) * 3);
  return py::make_tuple(0, std::string(), array);
}

// Returns (status, message, width, height): the stored size the decoder would go by, read from the header
// without decoding a pixel (no limits applied: the caller compares). Formats this build leaves to Pillow
// answer status 3 (codec unavailable).
py::tuple probe(const py::buffer& data) {
  py::buffer_info info = data.request();
  if (info.ndim != 1 || info.itemsize != 1 || (info.size > 1 && info.strides[0] != 1))
    throw py::type_error("probe() takes contiguous encoded bytes");
  const auto* bytes = static_cast<const uint8_t*>(info.ptr);
  const std::size_t size = std::size_t(info.size);
  Probe found;
  std::string message;
  const Status status =
      without_gil(&message, [&] { found = probe_image(bytes, size, Limits{UINT64_MAX, UINT64_MAX}); });
  return py::make_tuple(int(status), message_text(message), found.stored_width, found.stored_height);
}

// The CPU twin of the CUDA kernels (fused_resize.h), for the tests: one image in its stored orientation
// (HxW or HxWx3 uint8, rows packed) to one output slot, returned as raw bytes.
py::bytes fused_resize_cpu(const py::buffer& pixels, int orientation, int size, int resize, int filter, int dtype,
                           int layout, std::vector<float> mean, std::vector<float> std_) {
  py::buffer_info info = pixels.request();
  const int channels = info.ndim == 3 ? int(info.shape[2]) : 1;
  if (info.format != py::format_descriptor<uint8_t>::format() || (info.ndim != 2 && info.ndim != 3) ||
      (channels != 1 && channels != 3 && channels != 4) || info.strides[1] != channels)
    throw py::value_error("pixels must be an HxW or HxWx{3,4} uint8 array with packed rows");
  if (orientation < 1 || orientation > 8) throw py::value_error("orientation must be 1..8");
  if (mean.size() != 3 || std_.size() != 3) throw py::value_error("mean and std need 3 values");
  OutputSpec spec;
  for (int c = 0; c < 3; ++c) {
    spec.mean[c] = mean[c];
    spec.std[c] = std_[c];
  }
  float table[3][256];
  normalization_table(spec, table);
  OutputFormat format;
  format.size = size;
  format.dtype = static_cast<DType>(dtype);
  format.layout = static_cast<Layout>(layout);
  format.table = &table[0][0];
  std::string slot(slot_bytes(format), '\0');
  FusedJob job;
  job.source.pixels = static_cast<const uint8_t*>(info.ptr);
  job.source.height = int(info.shape[0]);
  job.source.width = int(info.shape[1]);
  job.source.pitch = info.strides[0];
  job.source.channels = channels;
  job.source.orientation = orientation;
  const int w = upright_width(job.source), h = upright_height(job.source);
  const double box[4] = {0.0, 0.0, double(w), double(h)};
  set_job_geometry(job, plan_geometry(w, h, size, resize, UINT64_MAX), box, size, static_cast<Filter>(filter));
  job.slot = reinterpret_cast<uint8_t*>(&slot[0]);
  {
    py::gil_scoped_release release;
    run_job_on_cpu(job, format);
  }
  return py::bytes(slot);
}

py::dict build_info() {
  py::dict codecs;
#if SPECIESCLF_HAVE_JPEG
  codecs["jpeg"] = "libjpeg-turbo " SPECIESCLF_JPEG_VERSION;
#endif
#if SPECIESCLF_HAVE_PNG
  codecs["png"] = "libspng " SPECIESCLF_SPNG_VERSION;
#endif
#if SPECIESCLF_HAVE_WEBP
  codecs["webp"] = "libwebp " SPECIESCLF_WEBP_VERSION;
#endif
  py::list simd;
#if defined(__AVX512F__)
  simd.append("avx512f");
#endif
#if defined(__AVX2__)
  simd.append("avx2");
#endif
#if defined(__SSE4_2__)
  simd.append("sse4.2");
#endif
#if defined(__SSE2__)
  simd.append("sse2");
#endif
#if defined(__ARM_NEON)
  simd.append("neon");
#endif
  py::dict info;
  info["version"] = SPECIESCLF_VERSION;
  info["codecs"] = codecs;
#if SPECIESCLF_HAVE_JPEG
  info["turbojpeg"] = true;
#else
  info["turbojpeg"] = false;
#endif
  info["simd"] = simd;
  info["cuda"] = false;
  info["nvjpeg"] = false;
#if defined(__clang__)
  info["compiler"] = "clang " __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = "gcc " __VERSION__;
#else
  info["compiler"] = "unknown";
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "speciesclf native core (private: use the speciesclf package)";
  m.def("preprocess", &preprocess, py::arg("items"), py::arg("out"), py::arg("size"), py::arg("resize"),
        py::arg("filter"), py::arg("dtype"), py::arg("layout"), py::arg("mean"), py::arg("std"),
        py::arg("max_pixels"), py::arg("max_bytes"), py::arg("reduce_margin"), py::arg("threads"),
        py::arg("slots"), py::arg("timings") = py::none());
  m.def("decode", &decode, py::arg("data"), py::arg("min_width"), py::arg("min_height"), py::arg("max_pixels"),
        py::arg("max_bytes"));
  m.def("probe", &probe, py::arg("data"));
  m.def("build_info", &build_info);
  m.def("_fused_resize_cpu", &fused_resize_cpu, py::arg("pixels"), py::arg("orientation"), py::arg("size"),
        py::arg("resize"), py::arg("filter"), py::arg("dtype"), py::arg("layout"), py::arg("mean"), py::arg("std"));
  m.def("hardware_threads", [] { return int(std::thread::hardware_concurrency()); });
  m.def("pool_workers", [] { return ThreadPool::instance().worker_count(); });
}
