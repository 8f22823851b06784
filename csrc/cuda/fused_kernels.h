// Launchers of the two GPU kernels of the fused resize (fused_kernels.cu). `jobs` is in device memory.
#pragma once

#include <cuda_runtime_api.h>

#include "fused_resize.h"

namespace speciesclf {

// Fills every job's filter tables: one thread per output sample of each axis.
void launch_plan_tables(const FusedJob* jobs, int count, int size, cudaStream_t stream);

// Resizes, crops, normalises and writes every job's slot: one thread per output pixel.
void launch_fused_resize(const FusedJob* jobs, int count, const OutputFormat& format, cudaStream_t stream);

}  // namespace speciesclf
