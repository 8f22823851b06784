// nvJPEG behind an owned object: the hardware engine for the baseline JPEGs it supports, nvJPEG's hybrid
// decoder for the rest. What nvJPEG cannot decode stays undecoded (ok == false): the caller decodes it on
// the CPU, which also gives it the same typed error as the CPU path.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace speciesclf {

struct GpuJpeg {
  const uint8_t* data = nullptr;
  std::size_t size = 0;
  int width = 0, height = 0, channels = 0;  // from the header; channels is 1 (gray) or 3
  uint8_t* dst = nullptr;                   // device memory, width * channels bytes per row
  bool hardware = false;                    // decoded by the hardware engine
  bool ok = false;
};

class NvjpegDecoder {
 public:
  // The current CUDA device must be the one `stream` belongs to. Throws CudaFailure when nvJPEG
  // cannot start; a GPU without the hardware engine just uses the hybrid decoder.
  NvjpegDecoder(cudaStream_t stream, bool use_hardware);
  ~NvjpegDecoder();
  NvjpegDecoder(const NvjpegDecoder&) = delete;
  NvjpegDecoder& operator=(const NvjpegDecoder&) = delete;

  // Reads the header into width/height/channels; false when nvJPEG cannot take the image (CMYK, an
  // unknown subsampling, a header it rejects). Thread-safe.
  bool inspect(GpuJpeg& jpeg) const;
  // Decodes every image of the batch into its dst, asynchronously on the stream.
  void decode(const std::vector<GpuJpeg*>& batch);
  bool has_hardware() const;

  static std::string version();  // of the nvJPEG library loaded, e.g. "13.0.1"

 private:
  struct Handles;
  std::unique_ptr<Handles> h_;
};

}  // namespace speciesclf
