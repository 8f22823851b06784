// speciesclf._native_cuda: the GPU pipeline's Python face. Imported lazily (python/speciesclf/_cuda.py) so
// that the package works where no CUDA library exists. Inputs arrive as buffers, the output tensor as a
// DLPack capsule; per-item failures come back as (slot, status, message) like the CPU module's.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <Python.h>
#include <cuda_runtime_api.h>

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "cuda/cuda_check.h"
#include "cuda/dlpack_abi.h"
#include "cuda/gpu_pipeline.h"
#include "python_items.h"
#if SPECIESCLF_HAVE_NVJPEG
#include "cuda/nvjpeg_decoder.h"
#endif

namespace py = pybind11;
using namespace speciesclf;

namespace {

// Borrows the device memory of a "dltensor" capsule for one call, checking that it is the batch the
// spec describes; the capsule is marked used and its deleter called when the call is done.
class BorrowedOutput {
 public:
  BorrowedOutput(const py::capsule& capsule, int device, const OutputSpec& spec, std::size_t needed_rows,
                 int32_t device_type = dlpack::kCUDA) {
    if (std::string(capsule.name() ? capsule.name() : "") != "dltensor")
      throw py::value_error("out must be a DLPack capsule named 'dltensor' (tensor.__dlpack__())");
    managed_ = static_cast<dlpack::ManagedTensor*>(PyCapsule_GetPointer(capsule.ptr(), "dltensor"));
    if (managed_ == nullptr) throw py::error_already_set();
    const dlpack::Tensor& t = managed_->dl_tensor;
    if (t.device.device_type != device_type || t.device.device_id != device)
      fail_check(device_type == dlpack::kCUDA ? "out must be on cuda:" + std::to_string(device)
                                              : "out is on the wrong device");
    const bool dtype_ok = t.dtype.lanes == 1 && [&] {
      switch (spec.dtype) {
        case DType::kFloat32: return t.dtype.code == dlpack::kFloat && t.dtype.bits == 32;
        case DType::kFloat16: return t.dtype.code == dlpack::kFloat && t.dtype.bits == 16;
        case DType::kBFloat16: return t.dtype.code == dlpack::kBfloat && t.dtype.bits == 16;
        case DType::kUInt8: return t.dtype.code == dlpack::kUInt && t.dtype.bits == 8;
      }
      return false;
    }();
    if (!dtype_ok) fail_check("out has the wrong dtype for the spec");
    const int64_t s = spec.size;
    const bool nchw = spec.layout == Layout::kNCHW;
    if (t.ndim != 4 || t.shape[1] != (nchw ? 3 : s) || t.shape[2] != s || t.shape[3] != (nchw ? s : 3) ||
        t.shape[0] < int64_t(needed_rows))
      fail_check("out has the wrong shape for the spec and batch");
    if (t.strides != nullptr) {
      int64_t expected = 1;
      for (int d = 3; d >= 0; --d) {
        if (t.shape[d] > 1 && t.strides[d] != expected) fail_check("out must be C-contiguous");
        expected *= t.shape[d];
      }
    }
    data_ = static_cast<uint8_t*>(t.data) + t.byte_offset;
    PyCapsule_SetName(capsule.ptr(), "used_dltensor");
  }
  ~BorrowedOutput() {
    if (managed_ && managed_->deleter) managed_->deleter(managed_);
  }
  uint8_t* data() const { return data_; }

 private:
  [[noreturn]] void fail_check(const std::string& message) {
    managed_ = nullptr;  // still owned by the capsule, which was not consumed
    throw py::value_error(message);
  }
  dlpack::ManagedTensor* managed_ = nullptr;
  uint8_t* data_ = nullptr;
};

class PyGpuPipeline {
 public:
  PyGpuPipeline(int size, int resize, int filter, int dtype, int layout, std::vector<float> mean,
                std::vector<float> std_, uint64_t max_pixels, uint64_t max_bytes, double reduce_margin, int device,
                bool nvjpeg, bool hardware_decoder) {
    if (size <= 0 || resize < 0) throw py::value_error("size must be positive and resize non-negative");
    if (mean.size() != 3 || std_.size() != 3) throw py::value_error("mean and std need 3 values");
    spec_.size = size;
    spec_.resize = resize;
    spec_.filter = static_cast<Filter>(filter);
    spec_.dtype = static_cast<DType>(dtype);
    spec_.layout = static_cast<Layout>(layout);
    for (int c = 0; c < 3; ++c) {
      spec_.mean[c] = mean[c];
      spec_.std[c] = std_[c];
    }
    spec_.limits = Limits{max_pixels, max_bytes};
    spec_.reduce_margin = reduce_margin;
    py::gil_scoped_release release;
    pipeline_ = std::make_unique<GpuPipeline>(spec_, device, nvjpeg, hardware_decoder);
  }

  py::list run(const py::list& items, const py::capsule& out, std::vector<std::size_t> slots, int threads) {
    const std::size_t n = std::size_t(py::len(items));
    if (slots.size() != n) throw py::value_error("slots must give one slot per item");
    std::size_t rows = 0;
    for (std::size_t s : slots) rows = std::max(rows, s + 1);
    BorrowedOutput output(out, pipeline_->device(), spec_, rows);
    DescribedBatch batch(items);
    std::vector<Item>& work = batch.items;
    std::vector<Status>& statuses = batch.statuses;
    std::vector<std::string>& messages = batch.messages;
    {
      py::gil_scoped_release release;
      std::lock_guard<std::mutex> lock(mutex_);  // this object's buffers, not a process-wide lock
      pipeline_->run(work, slots, output.data(), statuses, messages, threads);
    }
    py::list failures;
    for (std::size_t i = 0; i < n; ++i)
      if (statuses[i] != Status::kOk)
        failures.append(py::make_tuple(slots[i], int(statuses[i]), message_text(messages[i])));
    return failures;
  }

  py::dict last_routes() const {
    const RouteCounts& r = pipeline_->last_routes();
    py::dict d;
    d["nvjpeg_hardware"] = r.nvjpeg_hardware;
    d["nvjpeg_hybrid"] = r.nvjpeg_hybrid;
    d["cpu"] = r.cpu;
    d["pixels"] = r.pixels;
    d["failed"] = r.failed;
    return d;
  }

  uintptr_t stream() const { return reinterpret_cast<uintptr_t>(pipeline_->stream()); }
  int device() const { return pipeline_->device(); }
  std::string decoder() const { return pipeline_->decoder(); }

  void close() {
    py::gil_scoped_release release;
    std::lock_guard<std::mutex> lock(mutex_);
    pipeline_.reset();
  }

  void check_open() const {
    if (!pipeline_) throw py::value_error("this GPU preprocessor is closed");
  }

 private:
  OutputSpec spec_;
  std::unique_ptr<GpuPipeline> pipeline_;
  std::mutex mutex_;
};

// The checks run() makes on its output capsule, for the tests: with device_type 1 (CPU) they can be
// exercised on machines without a GPU. Returns the data address.
uintptr_t check_output(const py::capsule& capsule, int device_type, int device, int size, int dtype, int layout,
                       std::size_t rows) {
  OutputSpec spec;
  spec.size = size;
  spec.dtype = static_cast<DType>(dtype);
  spec.layout = static_cast<Layout>(layout);
  BorrowedOutput output(capsule, device, spec, rows, device_type);
  return reinterpret_cast<uintptr_t>(output.data());
}

// 0 where there is no driver or no GPU: never raises, so callers can probe.
int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    return 0;
  }
  return count;
}

py::dict runtime_info() {
  py::dict info;
  int driver = 0, runtime = 0;
  cudaDriverGetVersion(&driver);
  cudaRuntimeGetVersion(&runtime);
  info["driver_version"] = driver;  // 0: no driver
  info["runtime_version"] = runtime;
  info["device_count"] = device_count();
#if SPECIESCLF_HAVE_NVJPEG
  info["nvjpeg_version"] = NvjpegDecoder::version();
#else
  info["nvjpeg_version"] = py::none();
#endif
  return info;
}

py::dict build_info() {
  py::dict info;
  info["version"] = SPECIESCLF_VERSION;
  info["cuda"] = true;
  info["cuda_toolkit"] = SPECIESCLF_CUDA_TOOLKIT;
  info["cuda_architectures"] = SPECIESCLF_CUDA_ARCHS;
#if SPECIESCLF_HAVE_NVJPEG
  info["nvjpeg"] = true;
#else
  info["nvjpeg"] = false;
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(_native_cuda, m) {
  m.doc() = "speciesclf CUDA pipeline (private: use speciesclf.gpu)";
  py::register_exception<CudaFailure>(m, "CudaError", PyExc_RuntimeError);
  py::class_<PyGpuPipeline>(m, "GpuPipeline")
      .def(py::init<int, int, int, int, int, std::vector<float>, std::vector<float>, uint64_t, uint64_t, double, int,
                    bool, bool>(),
           py::arg("size"), py::arg("resize"), py::arg("filter"), py::arg("dtype"), py::arg("layout"), py::arg("mean"),
           py::arg("std"), py::arg("max_pixels"), py::arg("max_bytes"), py::arg("reduce_margin"), py::arg("device"),
           py::arg("nvjpeg"), py::arg("hardware_decoder"))
      .def("run",
           [](PyGpuPipeline& self, const py::list& items, const py::capsule& out, std::vector<std::size_t> slots,
              int threads) {
             self.check_open();
             return self.run(items, out, std::move(slots), threads);
           },
           py::arg("items"), py::arg("out"), py::arg("slots"), py::arg("threads"))
      .def("last_routes", [](const PyGpuPipeline& self) { self.check_open(); return self.last_routes(); })
      .def_property_readonly("stream", [](const PyGpuPipeline& self) { self.check_open(); return self.stream(); })
      .def_property_readonly("device", [](const PyGpuPipeline& self) { self.check_open(); return self.device(); })
      .def_property_readonly("decoder", [](const PyGpuPipeline& self) { self.check_open(); return self.decoder(); })
      .def("close", &PyGpuPipeline::close);
  m.def("_check_output", &check_output, py::arg("capsule"), py::arg("device_type"), py::arg("device"),
        py::arg("size"), py::arg("dtype"), py::arg("layout"), py::arg("rows"));
  m.def("device_count", &device_count);
  m.def("runtime_info", &runtime_info);
  m.def("build_info", &build_info);
}
