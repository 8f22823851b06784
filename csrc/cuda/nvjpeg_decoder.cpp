#include "cuda/nvjpeg_decoder.h"

#include <nvjpeg.h>

#include "cuda/cuda_check.h"

namespace speciesclf {

namespace {

void nvjpeg_check(nvjpegStatus_t status, const char* what) {
  if (status != NVJPEG_STATUS_SUCCESS) throw CudaFailure(std::string(what) + " failed: nvJPEG status " + std::to_string(int(status)));
}

bool known_layout(int components, nvjpegChromaSubsampling_t subsampling) {
  if (components == 1) return subsampling == NVJPEG_CSS_GRAY;
  return components == 3 && subsampling != NVJPEG_CSS_UNKNOWN && subsampling != NVJPEG_CSS_GRAY;
}

}  // namespace

struct NvjpegDecoder::Handles {
  cudaStream_t stream = nullptr;
  nvjpegHandle_t hybrid = nullptr;
  nvjpegJpegState_t hybrid_state = nullptr;
  nvjpegHandle_t hardware = nullptr;
  nvjpegJpegState_t hardware_state = nullptr;
  nvjpegJpegStream_t parsed = nullptr;  // header parse for the hardware support check
  int hardware_batch = 0;               // the size the hardware state was initialised for

  ~Handles() {
    if (parsed) nvjpegJpegStreamDestroy(parsed);
    if (hardware_state) nvjpegJpegStateDestroy(hardware_state);
    if (hardware) nvjpegDestroy(hardware);
    if (hybrid_state) nvjpegJpegStateDestroy(hybrid_state);
    if (hybrid) nvjpegDestroy(hybrid);
  }

  bool hardware_supports(const GpuJpeg& j) {
    if (nvjpegJpegStreamParseHeader(hardware, j.data, j.size, parsed) != NVJPEG_STATUS_SUCCESS) return false;
    int unsupported = 1;  // nvJPEG answers 0 for "supported"
    return nvjpegDecodeBatchedSupported(hardware, parsed, &unsupported) == NVJPEG_STATUS_SUCCESS && unsupported == 0;
  }

  bool decode_on_hardware(const std::vector<GpuJpeg*>& list) {
    const int n = int(list.size());
    if (n != hardware_batch) {
      if (nvjpegDecodeBatchedInitialize(hardware, hardware_state, n, 1, NVJPEG_OUTPUT_RGBI) != NVJPEG_STATUS_SUCCESS)
        return false;
      hardware_batch = n;
    }
    std::vector<const unsigned char*> data(n);
    std::vector<std::size_t> sizes(n);
    std::vector<nvjpegImage_t> images(n);
    for (int i = 0; i < n; ++i) {
      data[i] = list[i]->data;
      sizes[i] = list[i]->size;
      images[i] = nvjpegImage_t{};
      images[i].channel[0] = list[i]->dst;
      images[i].pitch[0] = std::size_t(list[i]->width) * 3;
    }
    if (nvjpegDecodeBatched(hardware, hardware_state, data.data(), sizes.data(), images.data(), stream) ==
        NVJPEG_STATUS_SUCCESS)
      return true;
    hardware_batch = 0;  // a failed batch leaves the state to be reset
    return false;
  }

  bool decode_one(const GpuJpeg& j) {
    nvjpegImage_t image{};
    image.channel[0] = j.dst;
    image.pitch[0] = std::size_t(j.width) * j.channels;
    const nvjpegOutputFormat_t format = j.channels == 1 ? NVJPEG_OUTPUT_Y : NVJPEG_OUTPUT_RGBI;
    return nvjpegDecode(hybrid, hybrid_state, j.data, j.size, format, &image, stream) == NVJPEG_STATUS_SUCCESS;
  }
};

NvjpegDecoder::NvjpegDecoder(cudaStream_t stream, bool use_hardware) : h_(new Handles) {
  h_->stream = stream;
  nvjpeg_check(nvjpegCreateEx(NVJPEG_BACKEND_DEFAULT, nullptr, nullptr, 0, &h_->hybrid), "nvjpegCreateEx");
  nvjpeg_check(nvjpegJpegStateCreate(h_->hybrid, &h_->hybrid_state), "nvjpegJpegStateCreate");
  // GPUs without the JPEG engine refuse this backend; they keep the hybrid decoder only.
  if (use_hardware &&
      nvjpegCreateEx(NVJPEG_BACKEND_HARDWARE, nullptr, nullptr, 0, &h_->hardware) == NVJPEG_STATUS_SUCCESS) {
    if (nvjpegJpegStateCreate(h_->hardware, &h_->hardware_state) != NVJPEG_STATUS_SUCCESS ||
        nvjpegJpegStreamCreate(h_->hardware, &h_->parsed) != NVJPEG_STATUS_SUCCESS) {
      if (h_->parsed) nvjpegJpegStreamDestroy(h_->parsed);
      if (h_->hardware_state) nvjpegJpegStateDestroy(h_->hardware_state);
      nvjpegDestroy(h_->hardware);
      h_->parsed = nullptr;
      h_->hardware_state = nullptr;
      h_->hardware = nullptr;
    }
  } else {
    h_->hardware = nullptr;
  }
}

NvjpegDecoder::~NvjpegDecoder() = default;

bool NvjpegDecoder::has_hardware() const { return h_->hardware != nullptr; }

bool NvjpegDecoder::inspect(GpuJpeg& j) const {
  int components = 0;
  nvjpegChromaSubsampling_t subsampling = NVJPEG_CSS_UNKNOWN;
  int widths[NVJPEG_MAX_COMPONENT] = {0}, heights[NVJPEG_MAX_COMPONENT] = {0};
  if (nvjpegGetImageInfo(h_->hybrid, j.data, j.size, &components, &subsampling, widths, heights) !=
      NVJPEG_STATUS_SUCCESS)
    return false;
  if (!known_layout(components, subsampling) || widths[0] <= 0 || heights[0] <= 0) return false;
  j.width = widths[0];
  j.height = heights[0];
  j.channels = components;
  return true;
}

void NvjpegDecoder::decode(const std::vector<GpuJpeg*>& batch) {
  std::vector<GpuJpeg*> hardware, single;
  for (GpuJpeg* j : batch) {
    j->ok = false;
    j->hardware = false;
    if (h_->hardware && j->channels == 3 && h_->hardware_supports(*j))
      hardware.push_back(j);
    else
      single.push_back(j);
  }
  if (!hardware.empty()) {
    if (h_->decode_on_hardware(hardware)) {
      for (GpuJpeg* j : hardware) j->ok = j->hardware = true;
    } else {
      single.insert(single.end(), hardware.begin(), hardware.end());  // one by one finds the bad one
    }
  }
  for (GpuJpeg* j : single) j->ok = h_->decode_one(*j);
}

std::string NvjpegDecoder::version() {
  int major = 0, minor = 0, patch = 0;
  if (nvjpegGetProperty(MAJOR_VERSION, &major) != NVJPEG_STATUS_SUCCESS) return "unknown";
  nvjpegGetProperty(MINOR_VERSION, &minor);
  nvjpegGetProperty(PATCH_LEVEL, &patch);
  return std::to_string(major) + "." + std::to_string(minor) + "." + std::to_string(patch);
}

}  // namespace speciesclf
