#include "cuda/gpu_pipeline.h"

#include <algorithm>
#include <cstring>
#include <new>

#include "cuda/cuda_check.h"
#include "cuda/fused_kernels.h"
#include "fused_job.h"
#include "thread_pool.h"
#if SPECIESCLF_HAVE_NVJPEG
#include "cuda/nvjpeg_decoder.h"
#else
namespace speciesclf {
class NvjpegDecoder {};  // not built: every JPEG is decoded on the CPU
}  // namespace speciesclf
#endif

namespace speciesclf {

namespace {

constexpr std::size_t kAlign = 256;

std::size_t aligned(std::size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

// nvJPEG decodes a truncated file without complaint where the CPU path reports it: a JPEG that does not
// end in an EOI marker (trailing bytes after it allowed) goes to the CPU, which gives the same error.
bool has_end_marker(const uint8_t* data, std::size_t size) {
  const std::size_t window = std::min<std::size_t>(size, 64 * 1024);
  for (std::size_t k = size; k >= size - window + 2; --k)
    if (data[k - 2] == 0xFF && data[k - 1] == 0xD9) return true;
  return false;
}

}  // namespace

enum class Route { kSkip, kNvjpeg, kCpu, kPixels };

struct GpuPipeline::Work {
  Route route = Route::kSkip;
  Probe probe;
#if SPECIESCLF_HAVE_NVJPEG
  GpuJpeg jpeg;
#endif
  Geometry geometry{};
  int reduction = 1;
  int width = 0, height = 0, channels = 3;  // the pixels the kernel reads, in stored orientation
  int orientation = 1;
  double box[4] = {0, 0, 0, 0};
  const uint8_t* device_pixels = nullptr;
  std::size_t decoded_offset = 0;                  // nvJPEG's output, in decoded_
  std::size_t staged_offset = 0, staged_bytes = 0;  // CPU-decoded or pixel input, in staging_ and uploaded_
};

GpuPipeline::GpuPipeline(const OutputSpec& spec, int device, bool use_nvjpeg, bool use_hardware_decoder)
    : spec_(spec), device_(device) {
  OutputFormat format;
  format.size = spec.size;
  format.dtype = spec.dtype;
  slot_bytes_ = speciesclf::slot_bytes(format);
  cuda_check(cudaSetDevice(device), "cudaSetDevice");
  cuda_check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
  try {
    float table[3][256];
    normalization_table(spec, table);
    uint8_t* t = table_.reserve(sizeof table);
    cuda_check(cudaMemcpy(t, table, sizeof table, cudaMemcpyHostToDevice), "cudaMemcpy (table)");
#if SPECIESCLF_HAVE_NVJPEG
    if (use_nvjpeg) {
      try {
        nvjpeg_.reset(new NvjpegDecoder(stream_, use_hardware_decoder));
      } catch (const CudaFailure& e) {
        // The GPU path still works without nvJPEG: every image is then decoded by the CPU core.
        nvjpeg_error_ = e.what();
      }
    }
#else
    (void)use_nvjpeg;
    (void)use_hardware_decoder;
#endif
  } catch (...) {
    cudaStreamDestroy(stream_);
    throw;
  }
}

GpuPipeline::~GpuPipeline() {
  cudaSetDevice(device_);
  if (stream_) cudaStreamSynchronize(stream_);
  nvjpeg_.reset();
  if (stream_) cudaStreamDestroy(stream_);
}

std::string GpuPipeline::decoder() const {
#if SPECIESCLF_HAVE_NVJPEG
  if (nvjpeg_) return nvjpeg_->has_hardware() ? "nvjpeg (hardware + hybrid)" : "nvjpeg (hybrid)";
#endif
  return nvjpeg_error_.empty() ? "cpu" : "cpu (nvJPEG did not start: " + nvjpeg_error_ + ")";
}

void GpuPipeline::plan_cpu_decode(Work& w) const {
  // Exactly the CPU path's choice: the same DCT reduction and source box, turned upright by the decoder.
  const Probe& p = w.probe;
  w.route = Route::kCpu;
  w.reduction = reduction_for(p, w.geometry.resized_width, w.geometry.resized_height, spec_.reduce_margin);
  upright_decoded_size(p, w.reduction, &w.width, &w.height);
  const bool swap = p.orientation >= 5;
  upright_box(p, w.reduction, swap ? w.height : w.width, swap ? w.width : w.height, w.box);
  w.channels = 3;
  w.orientation = 1;
  w.staged_bytes = std::size_t(w.width) * w.height * 3;
}

void GpuPipeline::route(const Item& item, Work& w) const {
  if (item.pixels) {
    if (item.height <= 0 || item.width <= 0) fail(Status::kInvalidImage, "pixel array has no pixels");
    if (item.channels != 1 && item.channels != 3 && item.channels != 4)
      fail(Status::kInvalidImage, "pixel array must have 1, 3 or 4 channels, got " + std::to_string(item.channels));
    w.route = Route::kPixels;
    w.width = item.width;
    w.height = item.height;
    w.channels = item.channels;
    w.geometry = plan_geometry(w.width, w.height, spec_.size, spec_.resize, spec_.limits.max_pixels);
    w.box[2] = w.width;
    w.box[3] = w.height;
    w.staged_bytes = std::size_t(w.width) * w.height * w.channels;
    return;
  }
  w.probe = probe_image(item.data, item.size, spec_.limits);
  w.geometry = plan_geometry(w.probe.upright_width(), w.probe.upright_height(), spec_.size, spec_.resize,
                             spec_.limits.max_pixels);
#if SPECIESCLF_HAVE_NVJPEG
  if (nvjpeg_ && w.probe.format == Format::kJpeg && has_end_marker(item.data, item.size)) {
    w.jpeg.data = item.data;
    w.jpeg.size = item.size;
    if (nvjpeg_->inspect(w.jpeg) && w.jpeg.width == w.probe.stored_width && w.jpeg.height == w.probe.stored_height) {
      w.route = Route::kNvjpeg;
      w.width = w.jpeg.width;
      w.height = w.jpeg.height;
      w.channels = w.jpeg.channels;
      w.orientation = w.probe.orientation;  // applied by the kernel as it reads
      w.box[2] = w.probe.upright_width();
      w.box[3] = w.probe.upright_height();
      return;
    }
  }
#endif
  plan_cpu_decode(w);
}

void GpuPipeline::stage(const Item& item, Work& w, uint8_t* pinned) const {
  uint8_t* dst = pinned + w.staged_offset;
  if (w.route == Route::kPixels) {
    const std::size_t row = std::size_t(w.width) * w.channels;
    for (int y = 0; y < w.height; ++y) std::memcpy(dst + y * row, item.data + std::ptrdiff_t(y) * item.row_stride, row);
    return;
  }
  thread_local ScratchBuffer decoded, oriented;
  const RgbView view = decode_upright(w.probe, item.data, item.size, w.reduction, nullptr, decoded, oriented);
  if (view.width != w.width || view.height != w.height) fail(Status::kDecodeError, "decoded size differs from the header's");
  const std::size_t row = std::size_t(w.width) * 3;
  for (int y = 0; y < w.height; ++y) std::memcpy(dst + y * row, view.pixel(0, y), row);
  decoded.trim();
  oriented.trim();
}

void GpuPipeline::run(const std::vector<Item>& items, const std::vector<std::size_t>& slots, uint8_t* out,
                      std::vector<Status>& statuses, std::vector<std::string>& messages, int threads) {
  cuda_check(cudaSetDevice(device_), "cudaSetDevice");
  const std::size_t n = items.size();
  std::vector<Work> work(n);
  routes_ = RouteCounts{};
  const auto guarded = [&](std::size_t i, auto&& step) {
    try {
      step();
    } catch (const ImageFailure& f) {
      statuses[i] = f.status();
      messages[i] = f.what();
    } catch (const std::bad_alloc&) {
      statuses[i] = Status::kOutOfMemory;
      messages[i] = "out of memory";
    } catch (const std::exception& e) {
      statuses[i] = Status::kInternal;
      messages[i] = e.what();
    }
    if (statuses[i] != Status::kOk) work[i].route = Route::kSkip;
  };
  ThreadPool& pool = ThreadPool::instance();

  // 1. Probe every item and choose its decoder (limits and format errors surface here, as on the CPU).
  pool.parallel_for(n, threads, [&](std::size_t i) {
    if (statuses[i] == Status::kOk) guarded(i, [&] { route(items[i], work[i]); });
  });

  // 2. JPEGs nvJPEG takes, decoded on the device; the ones it fails go to the CPU like the rest.
#if SPECIESCLF_HAVE_NVJPEG
  std::vector<GpuJpeg*> jpegs;
  std::size_t decoded_bytes = 0;
  for (Work& w : work) {
    if (w.route != Route::kNvjpeg) continue;
    w.decoded_offset = decoded_bytes;
    decoded_bytes += aligned(std::size_t(w.width) * w.height * w.channels);
    jpegs.push_back(&w.jpeg);
  }
  if (!jpegs.empty()) {
    uint8_t* base = decoded_.reserve(decoded_bytes);
    for (Work& w : work)
      if (w.route == Route::kNvjpeg) w.jpeg.dst = base + w.decoded_offset;
    nvjpeg_->decode(jpegs);
    for (Work& w : work) {
      if (w.route != Route::kNvjpeg) continue;
      if (w.jpeg.ok) {
        w.device_pixels = w.jpeg.dst;
        ++(w.jpeg.hardware ? routes_.nvjpeg_hardware : routes_.nvjpeg_hybrid);
      } else {
        plan_cpu_decode(w);
      }
    }
  }
#endif

  // 3. Everything else is decoded (or copied) by CPU threads into pinned memory and uploaded at once.
  std::size_t staged_bytes = 0;
  for (Work& w : work) {
    if (w.route != Route::kCpu && w.route != Route::kPixels) continue;
    w.staged_offset = staged_bytes;
    staged_bytes += aligned(w.staged_bytes);
  }
  if (staged_bytes > 0) {
    uint8_t* pinned = staging_.reserve(staged_bytes);
    pool.parallel_for(n, threads, [&](std::size_t i) {
      Work& w = work[i];
      if (w.route == Route::kCpu || w.route == Route::kPixels) guarded(i, [&] { stage(items[i], w, pinned); });
    });
    uint8_t* device = uploaded_.reserve(staged_bytes);
    cuda_check(cudaMemcpyAsync(device, pinned, staged_bytes, cudaMemcpyHostToDevice, stream_), "cudaMemcpyAsync (images)");
    for (Work& w : work) {
      if (w.route == Route::kCpu || w.route == Route::kPixels) {
        w.device_pixels = device + w.staged_offset;
        ++(w.route == Route::kCpu ? routes_.cpu : routes_.pixels);
      }
    }
  }

  // 4. One job per image that made it, its filter tables laid out in one device buffer.
  uint8_t* host_jobs = jobs_host_.reserve(std::max<std::size_t>(n, 1) * sizeof(FusedJob));
  std::size_t doubles = 0, ints = 0;
  std::vector<FusedJob> planned(n);
  for (std::size_t i = 0; i < n; ++i) {
    const Work& w = work[i];
    FusedJob& job = planned[i];
    if (w.route == Route::kSkip || w.device_pixels == nullptr) {
      if (statuses[i] != Status::kOk) ++routes_.failed;
      continue;
    }
    job.source.pixels = w.device_pixels;
    job.source.width = w.width;
    job.source.height = w.height;
    job.source.pitch = std::ptrdiff_t(w.width) * w.channels;
    job.source.channels = w.channels;
    job.source.orientation = w.orientation;
    set_job_geometry(job, w.geometry, w.box, spec_.size, spec_.filter);
    doubles += axis_entries(job.h, spec_.size) + axis_entries(job.v, spec_.size);
    ints += axis_entries(job.h, spec_.size) + axis_entries(job.v, spec_.size) + 4 * std::size_t(spec_.size);
  }
  uint8_t* tables = tables_.reserve(std::max<std::size_t>(doubles * sizeof(double) + ints * sizeof(int32_t), 1));
  auto* next_double = reinterpret_cast<double*>(tables);
  auto* next_int = reinterpret_cast<int32_t*>(tables + doubles * sizeof(double));
  const auto place = [&](AxisStorage& a) {
    const std::size_t entries = axis_entries(a, spec_.size);
    a.scratch = next_double;
    next_double += entries;
    a.weights = next_int;
    a.first = next_int + entries;
    a.count = a.first + spec_.size;
    next_int = a.count + spec_.size;
  };
  for (std::size_t i = 0; i < n; ++i) {
    FusedJob& job = planned[i];
    if (job.source.pixels != nullptr) {
      place(job.h);
      place(job.v);
      job.slot = out + slots[i] * slot_bytes_;
    }
  }
  std::memcpy(host_jobs, planned.data(), n * sizeof(FusedJob));

  // 5. Filter tables, then the fused resize, then wait: the pinned buffers are reused by the next call.
  if (n > 0) {
    auto* device_jobs = reinterpret_cast<FusedJob*>(jobs_.reserve(n * sizeof(FusedJob)));
    cuda_check(cudaMemcpyAsync(device_jobs, host_jobs, n * sizeof(FusedJob), cudaMemcpyHostToDevice, stream_),
               "cudaMemcpyAsync (jobs)");
    OutputFormat format;
    format.size = spec_.size;
    format.dtype = spec_.dtype;
    format.layout = spec_.layout;
    format.table = reinterpret_cast<const float*>(table_.data());
    launch_plan_tables(device_jobs, int(n), spec_.size, stream_);
    launch_fused_resize(device_jobs, int(n), format, stream_);
  }
  cuda_check(cudaStreamSynchronize(stream_), "GPU preprocessing");
}

}  // namespace speciesclf
