// One exact Adam step (torch.optim.Adam: no amsgrad, no weight decay) on an I × H parameter whose
// gradient is row-sparse: U rows given as (row ids, U × H values), every other row's gradient 0.
// A row id may repeat (an uncoalesced COO gradient, as embedding_bag's sparse backward gives): its
// rows of values are summed in the order given, so nobody has to coalesce first (torch's CPU
// coalesce of ~40k × 600 values costs more than the whole step).
//
// Exact, not lazy: a row with a zero gradient still decays its moments and moves, as it does under
// torch.optim.Adam with the dense gradient. What this saves is the dense gradient itself: at 1M
// items × 600 it is 2.4 GB that the backward would zero and scatter into and the step would read.
// Here one pass reads and writes param and both moments, row by row; a row's gradient is found
// through an I-sized map from row id to its first position in `values` (-1: none) and a list that
// chains the later positions of the same row.
//
// The arithmetic follows torch's single-tensor Adam in the parameter's dtype, operation by
// operation, so that results match it to rounding:
//   m = m + (1 − β1)·(g − m)                  (lerp_)
//   v = v·β2 + (1 − β2)·g·g                   (mul_, addcmul_)
//   p = p + (−lr/bc1)·m / (√v / √bc2 + eps)   (sqrt, div, add_, addcdiv_)
// Rows are spread over OpenMP threads (torch's pool: see topk_masked.cpp) with the GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "checks.h"

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

// Scalars as torch passes them to its kernels: computed in double, used in T.
template <class T>
struct AdamScalars {
    T w1, b2, w2, neg_step, bc2s, eps;
};

template <class T>
inline __attribute__((always_inline)) void update_row(T* __restrict__ p, T* __restrict__ m, T* __restrict__ v,
                                                      const T* __restrict__ g, int64_t hidden, AdamScalars<T> s) {
    for (int64_t h = 0; h < hidden; ++h) {
        const T mh = m[h] + s.w1 * (g[h] - m[h]);
        const T vh = v[h] * s.b2 + s.w2 * g[h] * g[h];
        const T denom = std::sqrt(vh) / s.bc2s + s.eps;
        p[h] = p[h] + s.neg_step * mh / denom;
        m[h] = mh;
        v[h] = vh;
    }
}

// The loop has two divisions and a square root per element, so it is bound by their throughput
// rather than by memory unless vectorised wide: compile it for AVX-512 and AVX2 as well as the
// baseline and let the loader pick (GCC function multi-versioning; it needs glibc's ifunc).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define RSA_TARGETS __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define RSA_TARGETS
#endif

RSA_TARGETS void update_row_f32(float* p, float* m, float* v, const float* g, int64_t hidden, AdamScalars<float> s) {
    update_row<float>(p, m, v, g, hidden, s);
}
RSA_TARGETS void update_row_f64(double* p, double* m, double* v, const double* g, int64_t hidden,
                                AdamScalars<double> s) {
    update_row<double>(p, m, v, g, hidden, s);
}
inline void update_row_any(float* p, float* m, float* v, const float* g, int64_t h, AdamScalars<float> s) {
    update_row_f32(p, m, v, g, h, s);
}
inline void update_row_any(double* p, double* m, double* v, const double* g, int64_t h, AdamScalars<double> s) {
    update_row_f64(p, m, v, g, h, s);
}

template <class T>
void step_rows(T* param, T* exp_avg, T* exp_avg_sq, const T* values, const int64_t* first, const int64_t* next,
               int64_t n_rows, int64_t hidden, double lr, double beta1, double beta2, double eps, int64_t step,
               int n_threads) {
    const double bc1 = 1.0 - std::pow(beta1, double(step));
    const double bc2_sqrt = std::sqrt(1.0 - std::pow(beta2, double(step)));
    const AdamScalars<T> s{T(1.0 - beta1), T(beta2), T(1.0 - beta2), T(-(lr / bc1)), T(bc2_sqrt), T(eps)};
    const std::vector<T> zero_row(size_t(hidden), T(0));

#if defined(_OPENMP)
#pragma omp parallel num_threads(n_threads)
#endif
    {
        std::vector<T> sum_row;  // a repeated row's summed gradient (this thread's)
#if defined(_OPENMP)
#pragma omp for schedule(static)
#endif
        for (int64_t r = 0; r < n_rows; ++r) {
            const int64_t k = first[r];
            const T* g = zero_row.data();
            if (k >= 0 && next[k] < 0) {
                g = values + k * hidden;
            } else if (k >= 0) {
                sum_row.assign(values + k * hidden, values + (k + 1) * hidden);
                for (int64_t j = next[k]; j >= 0; j = next[j])
                    for (int64_t h = 0; h < hidden; ++h) sum_row[size_t(h)] += values[j * hidden + h];
                g = sum_row.data();
            }
            update_row_any(param + r * hidden, exp_avg + r * hidden, exp_avg_sq + r * hidden, g, hidden, s);
        }
    }
}

constexpr const char* FN = "adam_step_row_sparse";

void check_2d(const py::array& a, const char* name, int64_t rows, int64_t cols, const py::dtype& dt, bool writable) {
    const std::string n(name);
    if (a.ndim() != 2) checks::value_error(FN, n + " must be 2-D");
    if (!checks::has_shape(a, {rows, cols}))
        checks::value_error(FN, n + " must have shape (" + std::to_string(rows) + ", " + std::to_string(cols) +
                                    "), got (" + std::to_string(a.shape(0)) + ", " + std::to_string(a.shape(1)) + ")");
    checks::same_dtype(FN, a, n, dt, "param");
    checks::contiguous(FN, a, n, "C-contiguous");
    if (writable) checks::writable(FN, a, n);
}

// Updates param, exp_avg and exp_avg_sq in place. rows: int64 [U] in [0, I); values: [U, H].
void adam_step_row_sparse(py::array param, py::array exp_avg, py::array exp_avg_sq,
                          py::array_t<int64_t, py::array::c_style | py::array::forcecast> rows, py::array values,
                          double lr, double beta1, double beta2, double eps, int64_t step, int n_threads) {
    if (param.ndim() != 2) checks::value_error(FN, "param must be 2-D");
    const int64_t n_rows = param.shape(0), hidden = param.shape(1);
    const py::dtype dt = param.dtype();
    checks::float_dtype(FN, "param", dt);
    check_2d(param, "param", n_rows, hidden, dt, true);
    check_2d(exp_avg, "exp_avg", n_rows, hidden, dt, true);
    check_2d(exp_avg_sq, "exp_avg_sq", n_rows, hidden, dt, true);
    if (rows.ndim() != 1) checks::value_error(FN, "rows must be 1-D");
    const int64_t n_grad = rows.shape(0);
    check_2d(values, "values", n_grad, hidden, dt, false);
    if (step < 1) checks::value_error(FN, "step counts from 1");
    if (n_threads < 1) n_threads = 1;

    // first[r]: r's first position in values; next[k]: the next position with the same row as k.
    std::vector<int64_t> first(size_t(n_rows), -1), next(size_t(n_grad), -1);
    const int64_t* rp = rows.data();
    for (int64_t k = 0; k < n_grad; ++k)
        if (rp[k] < 0 || rp[k] >= n_rows)
            checks::value_error(FN, "gradient row " + std::to_string(rp[k]) + " outside [0, " + std::to_string(n_rows) + ")");
    for (int64_t k = n_grad - 1; k >= 0; --k) {  // backwards, so that each chain is in input order
        next[size_t(k)] = first[size_t(rp[k])];
        first[size_t(rp[k])] = k;
    }
    if (n_rows == 0 || hidden == 0) return;

    checks::dispatch_float(FN, "param", dt, [&](auto element) {
        using T = decltype(element);
        py::gil_scoped_release release;
        step_rows<T>(static_cast<T*>(param.mutable_data()), static_cast<T*>(exp_avg.mutable_data()),
                     static_cast<T*>(exp_avg_sq.mutable_data()), static_cast<const T*>(values.data()), first.data(),
                     next.data(), n_rows, hidden, lr, beta1, beta2, eps, step, n_threads);
    });
}

}  // namespace

PYBIND11_MODULE(_row_sparse_adam, m) {
    m.doc() = "Exact Adam step for a parameter with a row-sparse gradient (CPU)";
    m.def("adam_step_row_sparse", &adam_step_row_sparse, py::arg("param"), py::arg("exp_avg"), py::arg("exp_avg_sq"),
          py::arg("rows"), py::arg("values"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
          py::arg("step"), py::arg("n_threads"));
}
