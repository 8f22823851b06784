// The GPU side of the fused resize: thin kernels around the __host__ __device__ functions of
// fused_resize.h, whose CPU twin (fused_job.cpp) the tests hold to the CPU path.
#include "cuda/fused_kernels.h"

#include "cuda/cuda_check.h"

namespace speciesclf {

namespace {

__global__ void plan_tables_kernel(const FusedJob* jobs, int count, int size) {
  const long long total = (long long)count * 2 * size;
  const long long step = (long long)gridDim.x * blockDim.x;
  for (long long index = (long long)blockIdx.x * blockDim.x + threadIdx.x; index < total; index += step) {
    const int image = int(index / (2 * size));
    const int rest = int(index % (2 * size));
    const FusedJob& job = jobs[image];
    if (job.slot != nullptr) plan_job_sample(job, rest / size, rest % size);
  }
}

__global__ void fused_resize_kernel(const FusedJob* jobs, OutputFormat format) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  const int i = blockIdx.y * blockDim.y + threadIdx.y;
  const FusedJob& job = jobs[blockIdx.z];
  if (job.slot == nullptr || i >= format.size || j >= format.size) return;
  run_job_pixel(job, format, i, j);
}

}  // namespace

void launch_plan_tables(const FusedJob* jobs, int count, int size, cudaStream_t stream) {
  if (count <= 0) return;
  const int threads = 256;
  const long long total = (long long)count * 2 * size;
  const long long wanted = (total + threads - 1) / threads;
  const int blocks = int(wanted < 4096 ? wanted : 4096);  // the loop strides over the rest
  plan_tables_kernel<<<blocks, threads, 0, stream>>>(jobs, count, size);
  cuda_check(cudaGetLastError(), "plan_tables_kernel launch");
}

void launch_fused_resize(const FusedJob* jobs, int count, const OutputFormat& format, cudaStream_t stream) {
  const dim3 block(32, 8);
  const int max_z = 65535;  // gridDim.z limit
  for (int first = 0; first < count; first += max_z) {
    const int n = count - first < max_z ? count - first : max_z;
    const dim3 grid((format.size + block.x - 1) / block.x, (format.size + block.y - 1) / block.y, n);
    fused_resize_kernel<<<grid, block, 0, stream>>>(jobs + first, format);
    cuda_check(cudaGetLastError(), "fused_resize_kernel launch");
  }
}

}  // namespace speciesclf
