// The GPU preprocessing pipeline, one owned object per user with its own stream: JPEGs through nvJPEG
// (hardware engine, else hybrid), everything nvJPEG rejects and every other format decoded by the CPU
// core and uploaded, then the two fused-resize kernels write the batch in place.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "cuda/device_memory.h"
#include "pipeline.h"

namespace speciesclf {

class NvjpegDecoder;

// How the items of the last batch were decoded.
struct RouteCounts {
  int nvjpeg_hardware = 0;
  int nvjpeg_hybrid = 0;
  int cpu = 0;     // decoded by the CPU core (formats and JPEGs nvJPEG does not take)
  int pixels = 0;  // pixel arrays, uploaded as they are
  int failed = 0;
};

class GpuPipeline {
 public:
  // Throws CudaFailure when the device or nvJPEG cannot be set up.
  GpuPipeline(const OutputSpec& spec, int device, bool use_nvjpeg, bool use_hardware_decoder);
  ~GpuPipeline();
  GpuPipeline(const GpuPipeline&) = delete;
  GpuPipeline& operator=(const GpuPipeline&) = delete;

  int device() const { return device_; }
  cudaStream_t stream() const { return stream_; }
  std::size_t slot_bytes() const { return slot_bytes_; }
  std::string decoder() const;  // "nvjpeg (hardware + hybrid)", "nvjpeg (hybrid)" or "cpu[ (why)]"
  const RouteCounts& last_routes() const { return routes_; }

  // Writes item i into the device buffer `out` at slot slots[i]. Items whose status is already set are
  // skipped; a failure is recorded in statuses/messages and leaves its slot untouched. Returns when the
  // stream has finished, so `out` is ready for any stream. Not reentrant: one call at a time per object.
  void run(const std::vector<Item>& items, const std::vector<std::size_t>& slots, uint8_t* out,
           std::vector<Status>& statuses, std::vector<std::string>& messages, int threads);

 private:
  struct Work;
  void route(const Item& item, Work& w) const;
  void plan_cpu_decode(Work& w) const;
  void stage(const Item& item, Work& w, uint8_t* pinned) const;

  OutputSpec spec_;
  int device_;
  cudaStream_t stream_ = nullptr;
  std::size_t slot_bytes_;
  std::unique_ptr<NvjpegDecoder> nvjpeg_;
  std::string nvjpeg_error_;  // why nvJPEG is not used although it was asked for
  DeviceBuffer table_;       // [3][256] normalisation table
  DeviceBuffer decoded_;     // nvJPEG's output images
  PinnedBuffer staging_;     // CPU-decoded images and pixel arrays, on their way up
  DeviceBuffer uploaded_;
  PinnedBuffer jobs_host_;   // FusedJob per item
  DeviceBuffer jobs_;
  DeviceBuffer tables_;      // filter tables of every job
  RouteCounts routes_;
};

}  // namespace speciesclf
