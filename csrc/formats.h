// Recognises an image format from its first bytes, never from a name or a declared type.
#pragma once

#include <cstddef>
#include <cstdint>

namespace speciesclf {

enum class Format { kUnknown, kJpeg, kPng, kWebp, kGif, kBmp, kTiff };

Format sniff_format(const uint8_t* data, std::size_t size);
const char* format_name(Format format);

}  // namespace speciesclf
