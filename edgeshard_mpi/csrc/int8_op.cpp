// The int8 product (int8_mm.c) as the torch op edgeshard::int8_mm: called from C++, by eager code
// through the dispatcher and by a compiled graph's C++ wrapper, without Python between.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>

extern "C" int int8_mm(const float *x, const int8_t *w, const uint16_t *scales, float *y, int64_t m, int64_t n,
                       int64_t k, int threads);

static at::Tensor int8_mm_op(const at::Tensor &x, const at::Tensor &weight, const at::Tensor &scales) {
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
                "edgeshard::int8_mm: x must be a contiguous 2-D fp32 tensor");
    TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar && weight.is_contiguous() &&
                    weight.size(1) == x.size(1),
                "edgeshard::int8_mm: weight must be a contiguous int8 matrix of x's columns");
    TORCH_CHECK(scales.dim() == 1 && scales.scalar_type() == at::kBFloat16 && scales.is_contiguous() &&
                    scales.size(0) == weight.size(0),
                "edgeshard::int8_mm: scales must be bf16, one a row of weight");
    at::Tensor y = at::empty({x.size(0), weight.size(0)}, x.options());
    int rc = int8_mm(x.data_ptr<float>(), weight.data_ptr<int8_t>(),
                     reinterpret_cast<const uint16_t *>(scales.data_ptr()), y.data_ptr<float>(), x.size(0),
                     weight.size(0), x.size(1), at::get_num_threads());
    TORCH_CHECK(rc == 0, "edgeshard::int8_mm: no memory for the quantized activations");
    return y;
}

TORCH_LIBRARY(edgeshard, m) { m.def("int8_mm(Tensor x, Tensor weight, Tensor scales) -> Tensor"); }

TORCH_LIBRARY_IMPL(edgeshard, CPU, m) { m.impl("int8_mm", &int8_mm_op); }
