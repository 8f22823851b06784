// Per-image outcomes. An ImageFailure belongs to one image: the batch goes on without it.
#pragma once

#include <exception>
#include <string>
#include <utility>

namespace speciesclf {

// Stable numeric codes shared with python/speciesclf/errors.py (_STATUS_TO_ERROR).
enum class Status : int {
  kOk = 0,
  kEmptyInput = 1,
  kUnsupportedFormat = 2,  // the bytes are no image format we know
  kCodecUnavailable = 3,   // a known format this build cannot decode natively: Pillow takes it
  kDecodeError = 4,
  kImageTooLarge = 5,
  kInvalidImage = 6,       // a pixel array of the wrong shape
  kOutOfMemory = 7,
  kInternal = 8,
};

class ImageFailure : public std::exception {
 public:
  ImageFailure(Status status, std::string message) : status_(status), message_(std::move(message)) {}
  Status status() const noexcept { return status_; }
  const char* what() const noexcept override { return message_.c_str(); }

 private:
  Status status_;
  std::string message_;
};

[[noreturn]] inline void fail(Status status, std::string message) {
  throw ImageFailure(status, std::move(message));
}

}  // namespace speciesclf
