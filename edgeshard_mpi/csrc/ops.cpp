// The CPU kernels (int8_mm.c, bf16_mm.c, panels_mm.c) as the torch ops edgeshard::int8_mm, edgeshard::bf16_mm,
// edgeshard::bf16_panels_mm and edgeshard::f32_panels_mm:
// called from C++, by eager code through the dispatcher and by a compiled graph's C++ wrapper, without
// Python between.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

extern "C" int int8_mm(const float *x, const int8_t *w, const uint16_t *scales, float *y, int64_t m, int64_t n,
                       int64_t k, int threads);
extern "C" void bf16_mm(const float *x, const uint16_t *w, float *y, int64_t m, int64_t n, int64_t k,
                        int threads);
extern "C" void bf16_panels_mm(const float *x, const uint16_t *p, float *y, int64_t m, int64_t n, int64_t k,
                               int threads);
extern "C" void f32_panels_mm(const float *x, const float *p, float *y, int64_t m, int64_t n, int64_t k, int threads);
constexpr int64_t PANEL = 24;  // panels_mm.c's

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

// x (m x k, any float dtype) @ weight.T (+ bias), summed in fp32, returned in x's dtype: rounded once, as
// torch's own bf16 product rounds.
static at::Tensor bf16_mm_op(const at::Tensor &x, const at::Tensor &weight, const std::optional<at::Tensor> &bias) {
    TORCH_CHECK(x.dim() == 2 && x.is_floating_point(), "edgeshard::bf16_mm: x must be a 2-D float tensor");
    TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16 && weight.is_contiguous() &&
                    weight.size(1) == x.size(1),
                "edgeshard::bf16_mm: weight must be a contiguous bf16 matrix of x's columns");
    at::Tensor x32 = x.to(at::kFloat).contiguous();
    at::Tensor y = at::empty({x.size(0), weight.size(0)}, x32.options());
    bf16_mm(x32.data_ptr<float>(), reinterpret_cast<const uint16_t *>(weight.data_ptr()), y.data_ptr<float>(),
            x.size(0), weight.size(0), x.size(1), at::get_num_threads());
    if (bias.has_value()) y.add_(*bias);
    return y.to(x.scalar_type());
}

// The same for a weight of n rows held as panels (cpu_kernels.to_panels: [ceil(n / 24)][k][24]).
static at::Tensor bf16_panels_op(const at::Tensor &x, const at::Tensor &panels, const std::optional<at::Tensor> &bias,
                                 int64_t n) {
    TORCH_CHECK(x.dim() == 2 && x.is_floating_point(), "edgeshard::bf16_panels_mm: x must be a 2-D float tensor");
    TORCH_CHECK(panels.dim() == 3 && panels.scalar_type() == at::kBFloat16 && panels.is_contiguous() &&
                    panels.size(0) == (n + PANEL - 1) / PANEL && panels.size(1) == x.size(1) && panels.size(2) == PANEL,
                "edgeshard::bf16_panels_mm: panels must be contiguous bf16 [ceil(n / 24)][x's columns][24]");
    at::Tensor x32 = x.to(at::kFloat).contiguous();
    at::Tensor y = at::empty({x.size(0), n}, x32.options());
    bf16_panels_mm(x32.data_ptr<float>(), reinterpret_cast<const uint16_t *>(panels.data_ptr()), y.data_ptr<float>(),
                   x.size(0), n, x.size(1), at::get_num_threads());
    if (bias.has_value()) y.add_(*bias);
    return y.to(x.scalar_type());
}

// x (m x k, fp32) @ weight.T (+ bias) for an fp32 weight of n rows held as panels, in fp32.
static at::Tensor f32_panels_op(const at::Tensor &x, const at::Tensor &panels, const std::optional<at::Tensor> &bias,
                                int64_t n) {
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "edgeshard::f32_panels_mm: x must be a 2-D fp32 tensor");
    TORCH_CHECK(panels.dim() == 3 && panels.scalar_type() == at::kFloat && panels.is_contiguous() &&
                    panels.size(0) == (n + PANEL - 1) / PANEL && panels.size(1) == x.size(1) && panels.size(2) == PANEL,
                "edgeshard::f32_panels_mm: panels must be contiguous fp32 [ceil(n / 24)][x's columns][24]");
    at::Tensor x32 = x.contiguous();
    at::Tensor y = at::empty({x.size(0), n}, x32.options());
    f32_panels_mm(x32.data_ptr<float>(), panels.data_ptr<float>(), y.data_ptr<float>(), x.size(0), n, x.size(1),
                  at::get_num_threads());
    if (bias.has_value()) y.add_(*bias);
    return y;
}

TORCH_LIBRARY(edgeshard, m) {
    m.def("int8_mm(Tensor x, Tensor weight, Tensor scales) -> Tensor");
    m.def("bf16_mm(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
    m.def("bf16_panels_mm(Tensor x, Tensor panels, Tensor? bias, int n) -> Tensor");
    m.def("f32_panels_mm(Tensor x, Tensor panels, Tensor? bias, int n) -> Tensor");
}

TORCH_LIBRARY_IMPL(edgeshard, CPU, m) {
    m.impl("int8_mm", &int8_mm_op);
    m.impl("bf16_mm", &bf16_mm_op);
    m.impl("bf16_panels_mm", &bf16_panels_op);
    m.impl("f32_panels_mm", &f32_panels_op);
}
