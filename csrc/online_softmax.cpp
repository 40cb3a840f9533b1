// One step of a row-wise online softmax over a block of logits, in place, in one pass per row while
// the block is in cache: the CPU multinomial NLL's per-block pipeline (recvae_fast.torch_ops).
//
// For each row r of the B × width block L (rows `row_stride` apart):
//   m        = max(run_max[r], max_j L[r, j])
//   L[r, j]  = exp(L[r, j] − m)
//   rescale[r] = exp(run_max[r] − m)                       (0 on the first block: run_max = −inf)
//   run_sum[r] = run_sum[r] · rescale[r] + Σ_j L[r, j]
//   run_max[r] = m
// In torch ops that is eight calls and five passes over the block (amax, maximum, sub_, exp_, sum,
// and the running-sum updates); here one call and two passes (max, then exp + sum).
//
// exp is computed here, not by libm, so that the loop vectorises: x = n·ln2 + r with |r| ≤ ln2/2,
// exp(r) by its Taylor polynomial (degree 7 for float, 12 for double: error under one ulp of the
// result's type on that range), times 2^n built in the exponent bits. Arguments are ≤ 0 (the row's
// max is subtracted); below the smallest normal result (x < −87.3 for float, −708 for double) the
// value is flushed to 0, which changes no sum by more than that. NaN logits give NaN sums.
// Rows are spread over OpenMP threads (torch's pool: see topk_masked.cpp) with the GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>

namespace py = pybind11;

namespace {

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define OS_TARGETS __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define OS_TARGETS
#endif

inline __attribute__((always_inline)) float exp_nonpositive(float x) {
    const float n = std::floor(x * 1.44269504088896341f + 0.5f);
    const float r = (x - n * 0.693145751953125f) - n * 1.42860682030941723e-6f;  // ln2 split in two
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const int32_t biased = int32_t(n < -126.0f ? 0.0f : n) + 127;  // 2^n as float bits
    const int32_t bits = biased << 23;
    float two_n;
    std::memcpy(&two_n, &bits, sizeof two_n);
    const float value = n < -126.0f ? 0.0f : p * two_n;
    return x != x ? x : value;  // NaN stays NaN
}

inline __attribute__((always_inline)) double exp_nonpositive(double x) {
    const double n = std::floor(x * 1.4426950408889634074 + 0.5);
    const double r = (x - n * 0.693147180369123816490) - n * 1.90821492927058770002e-10;
    double p = 1.0 / 479001600.0;  // 1/12!
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    const int64_t biased = int64_t(n < -1022.0 ? 0.0 : n) + 1023;
    const int64_t bits = biased << 52;
    double two_n;
    std::memcpy(&two_n, &bits, sizeof two_n);
    const double value = n < -1022.0 ? 0.0 : p * two_n;
    return x != x ? x : value;
}

template <class T>
inline __attribute__((always_inline)) void softmax_row(T* __restrict__ row, int64_t width, T* run_max, T* run_sum,
                                                       T* rescale) {
    // `omp simd` reductions (-fopenmp-simd) let both loops vectorise without -ffast-math; the sum
    // is then taken in vector lanes, another order than a serial loop's.
    T m = *run_max;
    int nan = 0;
#pragma omp simd reduction(max : m) reduction(| : nan)
    for (int64_t j = 0; j < width; ++j) {
        m = row[j] > m ? row[j] : m;
        nan |= row[j] != row[j];  // a comparison skips NaN: look for it
    }
    if (nan) m = std::numeric_limits<T>::quiet_NaN();
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < width; ++j) {
        const T e = exp_nonpositive(row[j] - m);
        row[j] = e;
        sum += e;
    }
    // The first block: run_max = −inf, so the old sum (0) is scaled by exp(−inf) = 0.
    const T scale = *run_max == -std::numeric_limits<T>::infinity() ? T(0) : exp_nonpositive(*run_max - m);
    *rescale = scale;
    *run_sum = *run_sum * scale + sum;
    *run_max = m;
}

OS_TARGETS void softmax_row_f32(float* row, int64_t width, float* run_max, float* run_sum, float* rescale) {
    softmax_row<float>(row, width, run_max, run_sum, rescale);
}
OS_TARGETS void softmax_row_f64(double* row, int64_t width, double* run_max, double* run_sum, double* rescale) {
    softmax_row<double>(row, width, run_max, run_sum, rescale);
}
inline void softmax_row_any(float* r, int64_t w, float* m, float* s, float* c) { softmax_row_f32(r, w, m, s, c); }
inline void softmax_row_any(double* r, int64_t w, double* m, double* s, double* c) { softmax_row_f64(r, w, m, s, c); }

template <class T>
void run(T* logits, int64_t n_rows, int64_t width, int64_t row_stride, T* run_max, T* run_sum, T* rescale,
         int n_threads) {
#if defined(_OPENMP)
#pragma omp parallel for num_threads(n_threads) schedule(static)
#endif
    for (int64_t r = 0; r < n_rows; ++r)
        softmax_row_any(logits + r * row_stride, width, run_max + r, run_sum + r, rescale + r);
}

[[noreturn]] void fail(const std::string& what) { throw py::value_error("online_softmax_block: " + what); }

void check_vector(const py::array& a, const char* name, int64_t n, const py::dtype& dt) {
    if (a.ndim() != 1 || a.shape(0) != n) fail(std::string(name) + " must be 1-D with one entry per row");
    if (!a.dtype().is(dt)) throw py::type_error(std::string("online_softmax_block: ") + name + " has a different dtype than logits");
    if (!(a.flags() & py::array::c_style)) fail(std::string(name) + " must be contiguous");
    if (!a.writeable()) fail(std::string(name) + " must be writable");
}

// logits: B × width, rows contiguous (any row stride ≥ width); run_max, run_sum, rescale: [B].
void online_softmax_block(py::array logits, py::array run_max, py::array run_sum, py::array rescale, int n_threads) {
    if (logits.ndim() != 2) fail("logits must be 2-D");
    const py::dtype dt = logits.dtype();
    const bool is_f32 = dt.is(py::dtype::of<float>()), is_f64 = dt.is(py::dtype::of<double>());
    if (!is_f32 && !is_f64) throw py::type_error("online_softmax_block: logits must be float32 or float64");
    const int64_t n_rows = logits.shape(0), width = logits.shape(1), item = int64_t(dt.itemsize());
    if (n_rows > 0 && width > 1 && logits.strides(1) != item) fail("logits must have contiguous rows");
    if (n_rows > 1 && (logits.strides(0) % item != 0 || logits.strides(0) / item < width))
        fail("logits rows must not overlap");
    if (!logits.writeable()) fail("logits must be writable");
    check_vector(run_max, "run_max", n_rows, dt);
    check_vector(run_sum, "run_sum", n_rows, dt);
    check_vector(rescale, "rescale", n_rows, dt);
    if (n_rows == 0) return;
    const int64_t row_stride = n_rows > 1 ? logits.strides(0) / item : width;
    if (n_threads < 1) n_threads = 1;
    py::gil_scoped_release release;
    if (is_f32)
        run<float>(static_cast<float*>(logits.mutable_data()), n_rows, width, row_stride,
                   static_cast<float*>(run_max.mutable_data()), static_cast<float*>(run_sum.mutable_data()),
                   static_cast<float*>(rescale.mutable_data()), n_threads);
    else
        run<double>(static_cast<double*>(logits.mutable_data()), n_rows, width, row_stride,
                    static_cast<double*>(run_max.mutable_data()), static_cast<double*>(run_sum.mutable_data()),
                    static_cast<double*>(rescale.mutable_data()), n_threads);
}

}  // namespace

PYBIND11_MODULE(_online_softmax, m) {
    m.doc() = "One in-place step of a row-wise online softmax over a block of logits (CPU)";
    m.def("online_softmax_block", &online_softmax_block, py::arg("logits"), py::arg("run_max"), py::arg("run_sum"),
          py::arg("rescale"), py::arg("n_threads"));
}
