// Host-side set-up of a FusedJob, shared by the CUDA pipeline and the CPU twin of its kernels.
#pragma once

#include <cstdint>
#include <vector>

#include "fused_resize.h"
#include "pipeline.h"

namespace speciesclf {

// Sets the geometry of `job` (its source already set): torchvision's resize + centre crop planned on
// the full upright size g, read from `box` of the source grid. Sets the tap counts and the pass order.
void set_job_geometry(FusedJob& job, const Geometry& g, const double box[4], int size, Filter filter);

// Elements each axis of a planned job needs in its tables (weights, scratch): size * taps.
inline std::size_t axis_entries(const AxisStorage& a, int size) { return std::size_t(size) * a.taps; }

// The CPU twin of the CUDA kernels: the same per-sample and per-pixel functions, run in loops.
// Tables are allocated here; `job.slot` receives the result.
void run_job_on_cpu(FusedJob job, const OutputFormat& format);

}  // namespace speciesclf
