#include "fused_job.h"

namespace speciesclf {

void set_job_geometry(FusedJob& job, const Geometry& g, const double box[4], int size, Filter filter) {
  job.filter = filter;
  for (int k = 0; k < 4; ++k) job.box[k] = box[k];
  job.resized_width = g.resized_width;
  job.resized_height = g.resized_height;
  job.crop_x = g.crop_x;
  job.crop_y = g.crop_y;
  job.size = size;
  job.h.taps = axis_taps(filter, box[0], box[2], g.resized_width);
  job.v.taps = axis_taps(filter, box[1], box[3], g.resized_height);
  job.vertical_first = vertical_pass_first(upright_width(job.source), upright_height(job.source), g.resized_width,
                                           g.resized_height);
}

void run_job_on_cpu(FusedJob job, const OutputFormat& format) {
  std::vector<int32_t> ints[2];
  std::vector<double> scratch[2];
  AxisStorage* axes[2] = {&job.h, &job.v};
  for (int axis = 0; axis < 2; ++axis) {
    const std::size_t n = axis_entries(*axes[axis], job.size);
    ints[axis].assign(n + 2 * std::size_t(job.size), 0);
    scratch[axis].assign(n, 0.0);
    axes[axis]->weights = ints[axis].data();
    axes[axis]->first = ints[axis].data() + n;
    axes[axis]->count = ints[axis].data() + n + job.size;
    axes[axis]->scratch = scratch[axis].data();
  }
  for (int axis = 0; axis < 2; ++axis)
    for (int k = 0; k < job.size; ++k) plan_job_sample(job, axis, k);
  for (int i = 0; i < job.size; ++i)
    for (int j = 0; j < job.size; ++j) run_job_pixel(job, format, i, j);
}

}  // namespace speciesclf
