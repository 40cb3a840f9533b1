// The CPU multinomial NLL's per-item-block steps (recvae_fast.torch_ops): each is one call that does
// all of a step's work on a B × width block of logits while the block is in cache.
//
// online_softmax_block (forward), for each row r of the block L = z·Wd[start : start + width]ᵀ:
//   L[r, j]   += bias[j]                                      (when a bias is given)
//   target[r] += Σ x_ri·L[r, i − start] over r's nonzeros i in the block  (when nonzeros are given)
//   m          = max(run_max[r], max_j L[r, j]);   L[r, j] = exp(L[r, j] − m)
//   rescale[r] = exp(run_max[r] − m)                       (0 on the first block: run_max = −inf)
//   run_sum[r] = run_sum[r] · rescale[r] + Σ_j L[r, j];    run_max[r] = m
// In torch ops that is a bias copy, eight calls and five passes over the block, and the targets a
// gather of whole Wd rows (embedding_bag: 5 ms at 20k items); here one call and two passes.
//
// decoder_grad_block (backward), the block's G = ∂(Σ_r g_r·nll_r)/∂logits and its column sums:
//   G[r, j] = row_scale[r] · P[r, j]                                 (P: the kept probabilities), or
//   G[r, j] = row_scale[r] · exp(L[r, j] + bias[j] − row_shift[r])    (L recomputed, row_shift = lse)
//   G[r, i − start] −= row_grad[r] · x_ri over r's nonzeros i in the block
//   grad_bias[j] = Σ_r G[r, j]                                        (summed in double)
// In torch ops: a multiply, an index_add_ over nonzeros sorted by item beforehand, and a column sum.
//
// Nonzeros (a CsrCursor): the batch's CSR arrays and, per row, the position of its next unvisited
// nonzero. Each call visits a row's nonzeros from its cursor on and stops at the first one outside
// the block, so a row sorted by item (a canonical batch) is visited once, in order, over the blocks.
// With unsorted rows or out-of-range items the cursor stops short: what it passed was visited
// correctly, and `positions` lets the caller handle the rest itself.
//
// exp is fast_exp.h's, which vectorises; its arguments here are ≤ 0 (the row's max, or the log-sum-exp,
// is subtracted), and results below the smallest normal value are flushed to 0, which changes no sum
// by more than that. NaN logits give NaN sums.
// Rows are spread over OpenMP threads (torch's pool: see topk_masked.cpp) with the GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "checks.h"
#include "column_sums.h"
#include "fast_exp.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>
#include <string>


namespace py = pybind11;

namespace {

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define OS_TARGETS __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define OS_TARGETS
#endif

#define AI inline __attribute__((always_inline))

// A batch's CSR nonzeros with a cursor per row (see the top of the file). Validated once, when made.
struct CsrCursor {
    py::array indptr, indices, values;  // kept alive while the cursor is
    std::vector<int64_t> cursor;
    int64_t n_rows;

    CsrCursor(py::array indptr_, py::array indices_, py::array values_)
        : indptr(indptr_), indices(indices_), values(values_) {
        const char* fn = "CsrCursor";
        const auto i64 = py::dtype::of<int64_t>();
        if (indptr.ndim() != 1 || indptr.shape(0) < 1 || !indptr.dtype().is(i64) || !checks::is_c_contiguous(indptr))
            checks::value_error(fn, "indptr must be a contiguous 1-D int64 array of B + 1 entries");
        if (indices.ndim() != 1 || !indices.dtype().is(i64) || !checks::is_c_contiguous(indices))
            checks::value_error(fn, "indices must be a contiguous 1-D int64 array");
        checks::float_dtype(fn, "values", values.dtype());
        if (!checks::has_shape(values, {indices.shape(0)}) || !checks::is_c_contiguous(values))
            checks::value_error(fn, "values must be contiguous, one per index");
        n_rows = indptr.shape(0) - 1;
        const int64_t* ptr = static_cast<const int64_t*>(indptr.data());
        const int64_t nnz = indices.shape(0);
        if (ptr[0] != 0 || ptr[n_rows] != nnz) checks::value_error(fn, "indptr must run from 0 to nnz");
        for (int64_t r = 0; r < n_rows; ++r)
            if (ptr[r + 1] < ptr[r]) checks::value_error(fn, "indptr must not decrease");
        cursor.assign(ptr, ptr + n_rows);
    }

    // Every nonzero visited (the normal case for a canonical batch once all blocks are done).
    bool complete() const {
        const int64_t* ptr = static_cast<const int64_t*>(indptr.data());
        for (int64_t r = 0; r < n_rows; ++r)
            if (cursor[r] != ptr[r + 1]) return false;
        return true;
    }

    py::array_t<int64_t> positions() const { return py::array_t<int64_t>(n_rows, cursor.data()); }

    void rewind() {
        const int64_t* ptr = static_cast<const int64_t*>(indptr.data());
        cursor.assign(ptr, ptr + n_rows);
    }
};

// Raw view of a CsrCursor for the row loops; values in the block's dtype.
template <class T>
struct Nonzeros {
    const int64_t* indptr;
    const int64_t* indices;
    const T* values;
    int64_t* cursor;
};

// fn(offset in the block, value) for row r's nonzeros in [start, start + width) from its cursor on.
template <class T, class Fn>
AI void visit_row(const Nonzeros<T>& nz, int64_t r, int64_t start, int64_t width, Fn&& fn) {
    int64_t c = nz.cursor[r];
    const int64_t end = nz.indptr[r + 1];
    for (; c < end; ++c) {
        const int64_t offset = nz.indices[c] - start;
        if (offset < 0 || offset >= width) break;
        fn(offset, nz.values[c]);
    }
    nz.cursor[r] = c;
}

// ---------------------------------------------------------------------------- forward

template <class T>
AI void softmax_row(T* __restrict__ row, int64_t width, const T* __restrict__ bias, const Nonzeros<T>* nz,
                    int64_t r, int64_t start, T* target, T* run_max, T* run_sum, T* rescale) {
    // `omp simd` reductions (-fopenmp-simd) let the loops vectorise without -ffast-math; the sum
    // is then taken in vector lanes, another order than a serial loop's.
    T m = *run_max;
    int nan = 0;
    if (bias) {
#pragma omp simd reduction(max : m) reduction(| : nan)
        for (int64_t j = 0; j < width; ++j) {
            const T v = row[j] + bias[j];
            row[j] = v;
            m = v > m ? v : m;
            nan |= v != v;  // a comparison skips NaN: look for it
        }
    } else {
#pragma omp simd reduction(max : m) reduction(| : nan)
        for (int64_t j = 0; j < width; ++j) {
            m = row[j] > m ? row[j] : m;
            nan |= row[j] != row[j];
        }
    }
    if (nan) m = std::numeric_limits<T>::quiet_NaN();
    if (nz) {  // the nonzeros' logits, read before exp overwrites them
        T sum = 0;
        visit_row(*nz, r, start, width, [&](int64_t offset, T x) { sum += x * row[offset]; });
        *target += sum;
    }
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

#define SOFTMAX_ROW_ARGS(T) T* row, int64_t width, const T* bias, const Nonzeros<T>* nz, int64_t r, int64_t start, \
                            T* target, T* run_max, T* run_sum, T* rescale
OS_TARGETS void softmax_row_f32(SOFTMAX_ROW_ARGS(float)) {
    softmax_row<float>(row, width, bias, nz, r, start, target, run_max, run_sum, rescale);
}
OS_TARGETS void softmax_row_f64(SOFTMAX_ROW_ARGS(double)) {
    softmax_row<double>(row, width, bias, nz, r, start, target, run_max, run_sum, rescale);
}
inline void softmax_row_any(SOFTMAX_ROW_ARGS(float)) {
    softmax_row_f32(row, width, bias, nz, r, start, target, run_max, run_sum, rescale);
}
inline void softmax_row_any(SOFTMAX_ROW_ARGS(double)) {
    softmax_row_f64(row, width, bias, nz, r, start, target, run_max, run_sum, rescale);
}

// ---------------------------------------------------------------------------- backward

template <class T>
AI void grad_row(const T* block_row, T* g, int64_t width, const T* __restrict__ bias,
                 const T* row_shift, T scale, T row_grad, const Nonzeros<T>& nz, int64_t r, int64_t start,
                 double* __restrict__ column_sums) {
    // block_row and g may be the same memory (backward recomputing into the logits buffer): each
    // element is read and then written by the same iteration, which `omp simd` allows.
    if (row_shift) {  // recomputed logits: exp(L + bias − lse) · scale
        const T shift = *row_shift;
        if (bias) {
#pragma omp simd
            for (int64_t j = 0; j < width; ++j) g[j] = exp_nonpositive(block_row[j] + bias[j] - shift) * scale;
        } else {
#pragma omp simd
            for (int64_t j = 0; j < width; ++j) g[j] = exp_nonpositive(block_row[j] - shift) * scale;
        }
    } else {
#pragma omp simd
        for (int64_t j = 0; j < width; ++j) g[j] = block_row[j] * scale;
    }
    visit_row(nz, r, start, width, [&](int64_t offset, T x) { g[offset] -= row_grad * x; });
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) column_sums[j] += double(g[j]);
}

#define GRAD_ROW_ARGS(T) const T* block_row, T* g, int64_t width, const T* bias, const T* row_shift, T scale, \
                         T row_grad, const Nonzeros<T>& nz, int64_t r, int64_t start, double* column_sums
OS_TARGETS void grad_row_f32(GRAD_ROW_ARGS(float)) {
    grad_row<float>(block_row, g, width, bias, row_shift, scale, row_grad, nz, r, start, column_sums);
}
OS_TARGETS void grad_row_f64(GRAD_ROW_ARGS(double)) {
    grad_row<double>(block_row, g, width, bias, row_shift, scale, row_grad, nz, r, start, column_sums);
}
inline void grad_row_any(GRAD_ROW_ARGS(float)) {
    grad_row_f32(block_row, g, width, bias, row_shift, scale, row_grad, nz, r, start, column_sums);
}
inline void grad_row_any(GRAD_ROW_ARGS(double)) {
    grad_row_f64(block_row, g, width, bias, row_shift, scale, row_grad, nz, r, start, column_sums);
}

// ---------------------------------------------------------------------------- checks and bindings

using checks::value_error;

// A B × width block with contiguous rows (any row stride ≥ width); returns the row stride.
int64_t check_block(const char* fn, const char* name, const py::array& a, const py::dtype& dt, bool writable) {
    if (a.ndim() != 2) value_error(fn, std::string(name) + " must be 2-D");
    checks::same_dtype(fn, a, name, dt, "the block");
    const int64_t n_rows = a.shape(0), width = a.shape(1), item = int64_t(dt.itemsize());
    if (n_rows > 0 && width > 1 && a.strides(1) != item) value_error(fn, std::string(name) + " must have contiguous rows");
    if (n_rows > 1 && (a.strides(0) % item != 0 || a.strides(0) / item < width))
        value_error(fn, std::string(name) + " rows must not overlap");
    if (writable) checks::writable(fn, a, name);
    return n_rows > 1 ? a.strides(0) / item : width;
}

void check_vector(const char* fn, const py::array& a, const char* name, int64_t n, const py::dtype& dt, bool writable) {
    if (!checks::has_shape(a, {n})) value_error(fn, std::string(name) + " must be 1-D with " + std::to_string(n) + " entries");
    checks::same_dtype(fn, a, name, dt, "the block");
    checks::contiguous(fn, a, name);
    if (writable) checks::writable(fn, a, name);
}

// The optional per-column bias: None, or `width` values.
template <class T>
const T* optional_vector(const char* fn, const py::object& obj, const char* name, int64_t n, const py::dtype& dt) {
    if (obj.is_none()) return nullptr;
    py::array a = py::cast<py::array>(obj);
    check_vector(fn, a, name, n, dt, false);
    return static_cast<const T*>(a.data());
}

template <class T>
Nonzeros<T> nonzeros_of(const char* fn, CsrCursor& nz, int64_t n_rows, const py::dtype& dt) {
    if (nz.n_rows != n_rows) value_error(fn, "nonzeros must have one CSR row per block row");
    if (!nz.values.dtype().is(dt)) checks::type_error(fn, "nonzeros' values have a different dtype than the block");
    return {static_cast<const int64_t*>(nz.indptr.data()), static_cast<const int64_t*>(nz.indices.data()),
            static_cast<const T*>(nz.values.data()), nz.cursor.data()};
}

template <class T>
void softmax_block(py::array& logits, const py::object& bias_obj, py::array& run_max, py::array& run_sum,
                   py::array& rescale, CsrCursor* nonzeros, int64_t start, const py::object& target_obj, int n_threads) {
    const char* fn = "online_softmax_block";
    const py::dtype dt = logits.dtype();
    const int64_t stride = check_block(fn, "logits", logits, dt, true);
    const int64_t n_rows = logits.shape(0), width = logits.shape(1);
    check_vector(fn, run_max, "run_max", n_rows, dt, true);
    check_vector(fn, run_sum, "run_sum", n_rows, dt, true);
    check_vector(fn, rescale, "rescale", n_rows, dt, true);
    const T* bias = optional_vector<T>(fn, bias_obj, "bias", width, dt);
    Nonzeros<T> nz{};
    T* target = nullptr;
    if (nonzeros) {
        nz = nonzeros_of<T>(fn, *nonzeros, n_rows, dt);
        if (target_obj.is_none()) value_error(fn, "nonzeros need a target array");
        py::array t = py::cast<py::array>(target_obj);
        check_vector(fn, t, "target", n_rows, dt, true);
        target = static_cast<T*>(t.mutable_data());
    }
    if (n_rows == 0) return;
    T* data = static_cast<T*>(logits.mutable_data());
    T *mx = static_cast<T*>(run_max.mutable_data()), *sm = static_cast<T*>(run_sum.mutable_data());
    T* rs = static_cast<T*>(rescale.mutable_data());
    const Nonzeros<T>* nzp = nonzeros ? &nz : nullptr;
    py::gil_scoped_release release;
#if defined(_OPENMP)
#pragma omp parallel for num_threads(n_threads) schedule(static)
#endif
    for (int64_t r = 0; r < n_rows; ++r)
        softmax_row_any(data + r * stride, width, bias, nzp, r, start, target ? target + r : nullptr, mx + r, sm + r, rs + r);
}

void online_softmax_block(py::array logits, py::object bias, py::array run_max, py::array run_sum, py::array rescale,
                          CsrCursor* nonzeros, int64_t block_start, py::object target, int n_threads) {
    if (n_threads < 1) n_threads = 1;
    checks::dispatch_float("online_softmax_block", "the block", logits.dtype(), [&](auto element) {
        softmax_block<decltype(element)>(logits, bias, run_max, run_sum, rescale, nonzeros, block_start, target, n_threads);
    });
}

template <class T>
void grad_block(const py::array& block, py::array& g_out, const py::object& bias_obj, const py::object& shift_obj,
                const py::array& row_scale, const py::array& row_grad, CsrCursor& nonzeros, int64_t start,
                py::array& grad_bias, int n_threads) {
    const char* fn = "decoder_grad_block";
    const py::dtype dt = block.dtype();
    const int64_t in_stride = check_block(fn, "block", block, dt, false);
    const int64_t n_rows = block.shape(0), width = block.shape(1);
    const int64_t out_stride = check_block(fn, "g_out", g_out, dt, true);
    if (g_out.shape(0) != n_rows || g_out.shape(1) != width) value_error(fn, "g_out must have the block's shape");
    const T* bias = optional_vector<T>(fn, bias_obj, "bias", width, dt);
    const T* shift = optional_vector<T>(fn, shift_obj, "row_shift", n_rows, dt);
    check_vector(fn, row_scale, "row_scale", n_rows, dt, false);
    check_vector(fn, row_grad, "row_grad", n_rows, dt, false);
    check_vector(fn, grad_bias, "grad_bias", width, dt, true);
    const Nonzeros<T> nz = nonzeros_of<T>(fn, nonzeros, n_rows, dt);
    const T* in = static_cast<const T*>(block.data());
    T* out = static_cast<T*>(g_out.mutable_data());
    const T *scale = static_cast<const T*>(row_scale.data()), *rgrad = static_cast<const T*>(row_grad.data());
    T* gb = static_cast<T*>(grad_bias.mutable_data());
    py::gil_scoped_release release;
    std::vector<double> column_sums(static_cast<size_t>(width));
    rows_with_column_sums<double>(
        n_rows, width, n_threads,
        [&](int64_t r, double* sums) {
            grad_row_any(in + r * in_stride, out + r * out_stride, width, bias, shift ? shift + r : nullptr, scale[r],
                         rgrad[r], nz, r, start, sums);
        },
        column_sums.data());
    for (int64_t j = 0; j < width; ++j) gb[j] = T(column_sums[j]);
}

void decoder_grad_block(py::array block, py::array g_out, py::object bias, py::object row_shift, py::array row_scale,
                        py::array row_grad, CsrCursor& nonzeros, int64_t block_start, py::array grad_bias, int n_threads) {
    if (n_threads < 1) n_threads = 1;
    checks::dispatch_float("decoder_grad_block", "the block", block.dtype(), [&](auto element) {
        grad_block<decltype(element)>(block, g_out, bias, row_shift, row_scale, row_grad, nonzeros, block_start, grad_bias,
                                      n_threads);
    });
}

}  // namespace

PYBIND11_MODULE(_nll_blocks, m) {
    m.doc() = "The CPU multinomial NLL's per-item-block steps: forward online softmax, decoder backward";
    py::class_<CsrCursor>(m, "CsrCursor")
        .def(py::init<py::array, py::array, py::array>(), py::arg("indptr"), py::arg("indices"), py::arg("values"))
        .def("complete", &CsrCursor::complete, "every nonzero visited")
        .def("positions", &CsrCursor::positions, "each row's next unvisited nonzero (a copy)")
        .def("rewind", &CsrCursor::rewind, "back to each row's first nonzero");
    m.def("online_softmax_block", &online_softmax_block, py::arg("logits"), py::arg("bias"), py::arg("run_max"),
          py::arg("run_sum"), py::arg("rescale"), py::arg("nonzeros"), py::arg("block_start"), py::arg("target"),
          py::arg("n_threads"));
    m.def("decoder_grad_block", &decoder_grad_block, py::arg("block"), py::arg("g_out"), py::arg("bias"),
          py::arg("row_shift"), py::arg("row_scale"), py::arg("row_grad"), py::arg("nonzeros"), py::arg("block_start"),
          py::arg("grad_bias"), py::arg("n_threads"));
}
