// The encoder's per-layer elementwise tail, LayerNorm(swish(pre + linear_bias + residual)), forward
// and backward, one pass per row while the row is in L1 (CPU, float32 / float64).
//
// Forward, for each row r (H values):
//   s = pre + linear_bias + residual          (each optional but pre; linear_bias is broadcast)
//   t = s·σ(s)                                 (swish, σ the logistic function)
//   mean = Σ t / H;  rstd = 1 / sqrt(Σ (t − mean)² / H + eps)   (biased variance, as LayerNorm)
//   y = (t − mean)·rstd·gamma + beta
// In torch ops that is an add (plus addmm's bias copy), silu and layer_norm: three to four passes
// over a B × H tensor, each a fresh allocation, and two B × H tensors kept for backward; here one
// call per row (its passes over the row in L1), keeping s, mean and rstd.
//
// Backward, from dy and the kept s, mean, rstd (t and t̂ = (t − mean)·rstd recomputed):
//   dt̂ = dy·gamma;  dt = rstd·(dt̂ − mean(dt̂) − t̂·mean(dt̂·t̂))
//   ds = dt·σ(s)·(1 + s·(1 − σ(s)))          (what pre, linear_bias and residual all receive)
//   dgamma = Σ_rows dy·t̂;  dbeta = Σ_rows dy;  dlinear_bias = Σ_rows ds
//
// σ(s) = 1/(1 + e) for s ≥ 0 and e/(1 + e) for s < 0, with e = exp(−|s|) ≤ 1: no overflow, and the
// exp is fast_exp.h's vectorised one (under one ulp). Sums are taken in T across vector lanes (the
// column sums per thread, then the threads' added in double). Rows are spread over OpenMP threads
// (torch's pool) with the GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "checks.h"
#include "column_sums.h"
#include "fast_exp.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>


namespace py = pybind11;

namespace {

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define SLN_TARGETS __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SLN_TARGETS
#endif
#define AI inline __attribute__((always_inline))

template <class T>
AI T sigmoid(T s) {
    const T e = exp_nonpositive(s < T(0) ? s : -s);  // exp(−|s|)
    return (s < T(0) ? e : T(1)) / (T(1) + e);
}

template <class T>
struct Layer {
    int64_t width;
    const T* linear_bias;  // may be null
    const T* gamma;
    const T* beta;
    T eps;
};

template <class T>
AI void forward_row(const T* __restrict__ pre, const T* __restrict__ residual, T* __restrict__ y, T* __restrict__ s_out,
                    T* mean_out, T* rstd_out, const Layer<T>& L) {
    const int64_t H = L.width;
    const T* __restrict__ linear_bias = L.linear_bias;
    // s = pre + linear_bias + residual into s_out (or y when backward does not need it), then
    // t = swish(s) into y; the row's statistics are summed in T across vector lanes.
    T* __restrict__ s = s_out ? s_out : y;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) s[j] = pre[j] + (linear_bias ? linear_bias[j] : T(0)) + (residual ? residual[j] : T(0));
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < H; ++j) {
        const T t = s[j] * sigmoid(s[j]);
        y[j] = t;
        sum += t;
    }
    const T mean = sum / T(H);
    T squares = 0;
#pragma omp simd reduction(+ : squares)
    for (int64_t j = 0; j < H; ++j) {
        const T d = y[j] - mean;
        squares += d * d;
    }
    const T rstd = T(1) / std::sqrt(squares / T(H) + L.eps);
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) y[j] = (y[j] - mean) * rstd * L.gamma[j] + L.beta[j];
    *mean_out = mean;
    *rstd_out = rstd;
}

// Column sums go to sums[0..H) (dgamma), sums[H..2H) (dbeta), sums[2H..3H) (dlinear_bias).
template <class T>
AI void backward_row(const T* __restrict__ dy, const T* __restrict__ s, T mean, T rstd, T* __restrict__ ds,
                     const Layer<T>& L, T* __restrict__ sums) {
    const int64_t H = L.width;
    const T* __restrict__ gamma = L.gamma;
    T* __restrict__ sum_gamma = sums;
    T* __restrict__ sum_beta = sums + H;
    T* __restrict__ sum_linear_bias = sums + 2 * H;
    // ds holds t̂ for now
    T dxhat_sum = 0, dxhat_xhat_sum = 0;
#pragma omp simd reduction(+ : dxhat_sum, dxhat_xhat_sum)
    for (int64_t j = 0; j < H; ++j) {
        const T xhat = (s[j] * sigmoid(s[j]) - mean) * rstd;
        const T dxhat = dy[j] * gamma[j];
        ds[j] = xhat;
        dxhat_sum += dxhat;
        dxhat_xhat_sum += dxhat * xhat;
        sum_gamma[j] += dy[j] * xhat;
        sum_beta[j] += dy[j];
    }
    const T a = dxhat_sum / T(H), b = dxhat_xhat_sum / T(H);
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
        const T sg = sigmoid(s[j]);
        const T dt = rstd * (dy[j] * gamma[j] - a - ds[j] * b);
        const T g = dt * sg * (T(1) + s[j] * (T(1) - sg));
        ds[j] = g;
        sum_linear_bias[j] += g;
    }
}

SLN_TARGETS void forward_row_f32(const float* pre, const float* res, float* y, float* s, float* mean, float* rstd,
                                 const Layer<float>& L) {
    forward_row<float>(pre, res, y, s, mean, rstd, L);
}
SLN_TARGETS void forward_row_f64(const double* pre, const double* res, double* y, double* s, double* mean,
                                 double* rstd, const Layer<double>& L) {
    forward_row<double>(pre, res, y, s, mean, rstd, L);
}
SLN_TARGETS void backward_row_f32(const float* dy, const float* s, float mean, float rstd, float* ds,
                                  const Layer<float>& L, float* sums) {
    backward_row<float>(dy, s, mean, rstd, ds, L, sums);
}
SLN_TARGETS void backward_row_f64(const double* dy, const double* s, double mean, double rstd, double* ds,
                                  const Layer<double>& L, double* sums) {
    backward_row<double>(dy, s, mean, rstd, ds, L, sums);
}
inline void forward_row_any(const float* p, const float* r, float* y, float* s, float* m, float* d, const Layer<float>& L) {
    forward_row_f32(p, r, y, s, m, d, L);
}
inline void forward_row_any(const double* p, const double* r, double* y, double* s, double* m, double* d,
                            const Layer<double>& L) {
    forward_row_f64(p, r, y, s, m, d, L);
}
inline void backward_row_any(const float* dy, const float* s, float m, float r, float* ds, const Layer<float>& L,
                             float* sums) {
    backward_row_f32(dy, s, m, r, ds, L, sums);
}
inline void backward_row_any(const double* dy, const double* s, double m, double r, double* ds,
                             const Layer<double>& L, double* sums) {
    backward_row_f64(dy, s, m, r, ds, L, sums);
}

// ---------------------------------------------------------------------------- checks and bindings

using checks::value_error;

template <class T>
T* data_of(const char* fn, const py::array& a, const char* name, std::vector<int64_t> shape, bool writable) {
    checks::same_dtype(fn, a, name, py::dtype::of<T>(), "pre");
    if (a.ndim() != int64_t(shape.size())) value_error(fn, std::string(name) + " has the wrong number of dimensions");
    for (size_t d = 0; d < shape.size(); ++d)
        if (a.shape(d) != shape[d]) value_error(fn, std::string(name) + " has the wrong shape");
    checks::contiguous(fn, a, name);
    if (writable) checks::writable(fn, a, name);
    return static_cast<T*>(const_cast<void*>(a.data()));
}

template <class T>
T* optional_data(const char* fn, const py::object& obj, const char* name, std::vector<int64_t> shape, bool writable) {
    if (obj.is_none()) return nullptr;
    return data_of<T>(fn, py::cast<py::array>(obj), name, std::move(shape), writable);
}

template <class T>
void run_forward(const py::array& pre, const py::object& linear_bias, const py::object& residual, const py::array& gamma,
                 const py::array& beta, double eps, py::array& y, const py::object& s_out, py::array& mean,
                 py::array& rstd, int n_threads) {
    const char* fn = "swish_layer_norm_forward";
    if (pre.ndim() != 2) value_error(fn, "pre must be 2-D");
    const int64_t B = pre.shape(0), H = pre.shape(1);
    const T* p = data_of<T>(fn, pre, "pre", {B, H}, false);
    const T* res = optional_data<T>(fn, residual, "residual", {B, H}, false);
    T* s = optional_data<T>(fn, s_out, "s_out", {B, H}, true);
    const Layer<T> L{H, optional_data<T>(fn, linear_bias, "linear_bias", {H}, false),
                     data_of<T>(fn, gamma, "gamma", {H}, false), data_of<T>(fn, beta, "beta", {H}, false), T(eps)};
    T* out = data_of<T>(fn, y, "y", {B, H}, true);
    T* m = data_of<T>(fn, mean, "mean", {B}, true);
    T* r = data_of<T>(fn, rstd, "rstd", {B}, true);
    if (H == 0) value_error(fn, "rows must not be empty");
    py::gil_scoped_release release;
#if defined(_OPENMP)
#pragma omp parallel for num_threads(n_threads) schedule(static)
#endif
    for (int64_t i = 0; i < B; ++i)
        forward_row_any(p + i * H, res ? res + i * H : nullptr, out + i * H, s ? s + i * H : nullptr, m + i, r + i, L);
}

template <class T>
void run_backward(const py::array& dy, const py::array& s, const py::array& mean, const py::array& rstd,
                  const py::array& gamma, py::array& ds, py::array& grad_gamma, py::array& grad_beta,
                  py::array& grad_linear_bias, int n_threads) {
    const char* fn = "swish_layer_norm_backward";
    if (dy.ndim() != 2) value_error(fn, "dy must be 2-D");
    const int64_t B = dy.shape(0), H = dy.shape(1);
    const T* g = data_of<T>(fn, dy, "dy", {B, H}, false);
    const T* sv = data_of<T>(fn, s, "s", {B, H}, false);
    const T* m = data_of<T>(fn, mean, "mean", {B}, false);
    const T* r = data_of<T>(fn, rstd, "rstd", {B}, false);
    const Layer<T> L{H, nullptr, data_of<T>(fn, gamma, "gamma", {H}, false), nullptr, T(0)};
    T* out = data_of<T>(fn, ds, "ds", {B, H}, true);
    T* gg = data_of<T>(fn, grad_gamma, "grad_gamma", {H}, true);
    T* gb = data_of<T>(fn, grad_beta, "grad_beta", {H}, true);
    T* gl = data_of<T>(fn, grad_linear_bias, "grad_linear_bias", {H}, true);
    py::gil_scoped_release release;
    // the three column sums side by side: dgamma, dbeta, dlinear_bias (see backward_row)
    std::vector<double> column_sums(static_cast<size_t>(3 * H));
    rows_with_column_sums<T>(
        B, 3 * H, n_threads,
        [&](int64_t i, T* sums) { backward_row_any(g + i * H, sv + i * H, m[i], r[i], out + i * H, L, sums); },
        column_sums.data());
    T* targets[3] = {gg, gb, gl};
    for (int k = 0; k < 3; ++k)
        for (int64_t j = 0; j < H; ++j) targets[k][j] = T(column_sums[size_t(k * H + j)]);
}

void forward(py::array pre, py::object linear_bias, py::object residual, py::array gamma, py::array beta, double eps,
             py::array y, py::object s_out, py::array mean, py::array rstd, int n_threads) {
    if (n_threads < 1) n_threads = 1;
    checks::dispatch_float("swish_layer_norm_forward", "pre", pre.dtype(), [&](auto element) {
        run_forward<decltype(element)>(pre, linear_bias, residual, gamma, beta, eps, y, s_out, mean, rstd, n_threads);
    });
}

// dy has the dtype of the forward's output, hence of pre: the dtype error names pre.
void backward(py::array dy, py::array s, py::array mean, py::array rstd, py::array gamma, py::array ds,
              py::array grad_gamma, py::array grad_beta, py::array grad_linear_bias, int n_threads) {
    if (n_threads < 1) n_threads = 1;
    checks::dispatch_float("swish_layer_norm_backward", "pre", dy.dtype(), [&](auto element) {
        run_backward<decltype(element)>(dy, s, mean, rstd, gamma, ds, grad_gamma, grad_beta, grad_linear_bias, n_threads);
    });
}

}  // namespace

PYBIND11_MODULE(_swish_layer_norm, m) {
    m.doc() = "LayerNorm(swish(pre + linear_bias + residual)), forward and backward, one pass per row (CPU)";
    m.def("forward", &forward, py::arg("pre"), py::arg("linear_bias"), py::arg("residual"), py::arg("gamma"),
          py::arg("beta"), py::arg("eps"), py::arg("y"), py::arg("s_out"), py::arg("mean"), py::arg("rstd"),
          py::arg("n_threads"));
    m.def("backward", &backward, py::arg("dy"), py::arg("s"), py::arg("mean"), py::arg("rstd"), py::arg("gamma"),
          py::arg("ds"), py::arg("grad_gamma"), py::arg("grad_beta"), py::arg("grad_linear_bias"), py::arg("n_threads"));
}
