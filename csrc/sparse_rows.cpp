// Weighted sums of table rows picked by a CSR matrix: a sparse × dense product, the gather that the
// sparse input layer (fc1) and the multinomial NLL's Σ x·Wd need on the CPU.
//
//   out[r, :] = Σ_{n ∈ [indptr[r], indptr[r+1])} weights[n] · table[cols[n], :]   (0 for an empty row)
//
// summed in the order given. The sparse input layer's backward uses it with rows = items and
// cols = users (the batch transposed, by csr_transpose below for a dense gradient): dW1 from the
// B × H upstream gradient. torch's embedding_bag computes the same but costs about 0.8 µs per bag on
// the CPU, which made it most of fc1's backward at 20k items (17k bags of ~2 rows each: 15–24 ms
// against ~5 ms here). For the forward's few long bags (users × items) embedding_bag is as fast as
// this, and stays.
//
// Rows are spread over OpenMP threads (the process's OpenMP runtime, i.e. torch's own pool: see
// topk_masked.cpp) with the GIL released. Every index is checked before anything is written.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "checks.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define SR_TARGETS __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SR_TARGETS
#endif

constexpr int64_t PREFETCH_AHEAD = 4;

template <class T>
inline __attribute__((always_inline)) void sum_row(T* __restrict__ out, const int64_t* cols, const T* weights, int64_t begin,
                                                   int64_t end, int64_t nnz, const T* __restrict__ table,
                                                   int64_t width) {
    for (int64_t h = 0; h < width; ++h) out[h] = T(0);
    for (int64_t n = begin; n < end; ++n) {
        // The rows picked are scattered over a table larger than the caches: fetch the row
        // a few ahead while this one is summed (the hardware prefetcher cannot guess the jump).
        if (n + PREFETCH_AHEAD < nnz) {
            const char* ahead = reinterpret_cast<const char*>(table + cols[n + PREFETCH_AHEAD] * width);
            for (int64_t b = 0; b < width * int64_t(sizeof(T)); b += 64) __builtin_prefetch(ahead + b);
        }
        const T w = weights[n];
        const T* __restrict__ src = table + cols[n] * width;
        for (int64_t h = 0; h < width; ++h) out[h] += w * src[h];
    }
}

SR_TARGETS void sum_row_f32(float* out, const int64_t* cols, const float* weights, int64_t begin,
                            int64_t end, int64_t nnz, const float* table, int64_t width) {
    sum_row<float>(out, cols, weights, begin, end, nnz, table, width);
}
SR_TARGETS void sum_row_f64(double* out, const int64_t* cols, const double* weights,
                            int64_t begin, int64_t end, int64_t nnz, const double* table, int64_t width) {
    sum_row<double>(out, cols, weights, begin, end, nnz, table, width);
}
inline void sum_row_any(float* o, const int64_t* c, const float* w, int64_t b, int64_t e,
                        int64_t nnz, const float* t, int64_t h) {
    sum_row_f32(o, c, w, b, e, nnz, t, h);
}
inline void sum_row_any(double* o, const int64_t* c, const double* w, int64_t b, int64_t e,
                        int64_t nnz, const double* t, int64_t h) {
    sum_row_f64(o, c, w, b, e, nnz, t, h);
}

template <class T>
void run(const int64_t* indptr, const int64_t* cols, const T* weights, const T* table, T* out,
         int64_t n_rows, int64_t width, int n_threads) {
#if defined(_OPENMP)
#pragma omp parallel for num_threads(n_threads) schedule(dynamic, 64)
#endif
    for (int64_t r = 0; r < n_rows; ++r)
        sum_row_any(out + r * width, cols, weights, indptr[r], indptr[r + 1], indptr[n_rows], table, width);
}

using checks::value_error;
[[noreturn]] void fail(const std::string& what) { value_error("weighted_row_sums", what); }

// A CSR matrix's structure: indptr [n_rows + 1] from 0 to nnz, non-decreasing; every col in [0, n_cols).
void check_csr(const char* fn, const int64_t* ip, int64_t n_rows, const int64_t* cp, int64_t nnz, int64_t n_cols) {
    if (ip[0] != 0 || ip[n_rows] != nnz) value_error(fn, "indptr must start at 0 and end at the number of cols");
    for (int64_t r = 0; r < n_rows; ++r)
        if (ip[r + 1] < ip[r]) value_error(fn, "indptr must be non-decreasing (row " + std::to_string(r) + ")");
    for (int64_t n = 0; n < nnz; ++n)
        if (cp[n] < 0 || cp[n] >= n_cols)
            value_error(fn, "col " + std::to_string(cp[n]) + " outside [0, " + std::to_string(n_cols) + ")");
}

void check_array(const py::array& a, const char* name, int ndim, const py::dtype& dt) {
    if (a.ndim() != ndim) fail(std::string(name) + " must be " + std::to_string(ndim) + "-D");
    checks::same_dtype("weighted_row_sums", a, name, dt, "table");
    checks::contiguous("weighted_row_sums", a, name, "C-contiguous");
}

// out [R, H] is written in place (it must not overlap the inputs). indptr int64 [R + 1], cols int64
// [nnz] in [0, table rows), weights [nnz], table [N, H].
void weighted_row_sums(py::array_t<int64_t, py::array::c_style> indptr, py::array_t<int64_t, py::array::c_style> cols,
                       py::array weights, py::array table, py::array out, int n_threads) {
    if (table.ndim() != 2) fail("table must be 2-D");
    const py::dtype dt = table.dtype();
    checks::float_dtype("weighted_row_sums", "table", dt);
    check_array(table, "table", 2, dt);
    check_array(weights, "weights", 1, dt);
    check_array(out, "out", 2, dt);
    checks::writable("weighted_row_sums", out, "out");
    if (indptr.ndim() != 1 || indptr.shape(0) < 1) fail("indptr must be 1-D with at least one entry");
    if (cols.ndim() != 1) fail("cols must be 1-D");
    const int64_t n_rows = indptr.shape(0) - 1, nnz = cols.shape(0), n_table = table.shape(0),
                  width = table.shape(1);
    if (weights.shape(0) != nnz) fail("weights must have one entry per col (" + std::to_string(nnz) + ")");
    if (out.shape(0) != n_rows || out.shape(1) != width)
        fail("out must have shape (" + std::to_string(n_rows) + ", " + std::to_string(width) + ")");
    const int64_t* ip = indptr.data();
    const int64_t* cp = cols.data();
    check_csr("weighted_row_sums", ip, n_rows, cp, nnz, n_table);
    if (n_rows == 0 || width == 0) return;
    if (n_threads < 1) n_threads = 1;

    checks::dispatch_float("weighted_row_sums", "table", dt, [&](auto element) {
        using T = decltype(element);
        py::gil_scoped_release release;
        run<T>(ip, cp, static_cast<const T*>(weights.data()), static_cast<const T*>(table.data()),
               static_cast<T*>(out.mutable_data()), n_rows, width, n_threads);
    });
}

// The transpose of a CSR matrix with n_cols columns, by a counting sort over the columns, into
// col_ptr [n_cols + 1], rows [nnz] and weights_t [nnz], each column's entries in row order (as a
// stable sort by column gives them). O(nnz + n_cols), one thread: fc1's backward groups the batch's
// nonzeros by item this way for a dense weight gradient, which has n_cols rows anyway (torch's
// stable argsort and gathers: 2.2–2.5 ms for 18k nonzeros on 2 cores, this 0.5–0.9 ms with the
// op's checks; benches/bench_csr_transpose.py).
// The outputs are plain arrays checked here (an array_t would be converted into a copy, and the
// results written there lost), and must not overlap the inputs.
void csr_transpose(py::array_t<int64_t, py::array::c_style> indptr, py::array_t<int64_t, py::array::c_style> cols,
                   py::array weights, py::array col_ptr, py::array rows, py::array weights_t) {
    const char* fn = "csr_transpose";
    const auto tfail = [fn](const std::string& what) { value_error(fn, what); };
    const py::dtype dt = weights.dtype();
    checks::float_dtype(fn, "weights", dt);
    if (!weights_t.dtype().is(dt)) checks::type_error(fn, "weights_t must have weights' dtype");
    const auto i64 = py::dtype::of<int64_t>();
    if (!col_ptr.dtype().is(i64) || !rows.dtype().is(i64)) checks::type_error(fn, "col_ptr and rows must be int64");
    if (!checks::is_c_contiguous(col_ptr) || !checks::is_c_contiguous(rows)) tfail("col_ptr and rows must be contiguous");
    const py::array inputs[] = {indptr, cols, weights};
    for (const py::array& out : {col_ptr, rows, weights_t})
        for (const py::array& in : inputs)
            if (checks::overlap(out, in)) tfail("the outputs must not overlap the inputs");
    if (indptr.ndim() != 1 || indptr.shape(0) < 1) tfail("indptr must be 1-D with at least one entry");
    if (cols.ndim() != 1 || weights.ndim() != 1 || rows.ndim() != 1 || weights_t.ndim() != 1 || col_ptr.ndim() != 1)
        tfail("cols, weights, col_ptr, rows and weights_t must be 1-D");
    if (!checks::is_c_contiguous(weights) || !checks::is_c_contiguous(weights_t))
        tfail("weights and weights_t must be contiguous");
    if (!col_ptr.writeable() || !rows.writeable() || !weights_t.writeable()) tfail("the outputs must be writable");
    const int64_t n_rows = indptr.shape(0) - 1, nnz = cols.shape(0), n_cols = col_ptr.shape(0) - 1;
    if (n_cols < 0) tfail("col_ptr must have n_cols + 1 entries");
    if (weights.shape(0) != nnz) tfail("weights must have one entry per col (" + std::to_string(nnz) + ")");
    if (rows.shape(0) != nnz || weights_t.shape(0) != nnz) tfail("rows and weights_t must have one entry per col");
    const int64_t* ip = indptr.data();
    const int64_t* cp = cols.data();
    check_csr("csr_transpose", ip, n_rows, cp, nnz, n_cols);
    int64_t* ptr = static_cast<int64_t*>(col_ptr.mutable_data());
    int64_t* out_rows = static_cast<int64_t*>(rows.mutable_data());
    const size_t item = dt.itemsize();
    const char* w_in = static_cast<const char*>(weights.data());
    char* w_out = static_cast<char*>(weights_t.mutable_data());
    py::gil_scoped_release release;
    std::fill(ptr, ptr + n_cols + 1, int64_t(0));
    for (int64_t n = 0; n < nnz; ++n) ++ptr[cp[n] + 1];
    for (int64_t c = 0; c < n_cols; ++c) ptr[c + 1] += ptr[c];
    std::vector<int64_t> next(ptr, ptr + n_cols);  // each column's next free slot
    for (int64_t r = 0; r < n_rows; ++r)
        for (int64_t n = ip[r]; n < ip[r + 1]; ++n) {
            const int64_t slot = next[cp[n]]++;
            out_rows[slot] = r;
            std::memcpy(w_out + slot * item, w_in + n * item, item);
        }
}

}  // namespace

PYBIND11_MODULE(_sparse_rows, m) {
    m.doc() = "Weighted sums of table rows picked by a CSR matrix (CPU sparse x dense product)";
    m.def("weighted_row_sums", &weighted_row_sums, py::arg("indptr"), py::arg("cols"), py::arg("weights"),
          py::arg("table"), py::arg("out"), py::arg("n_threads"));
    m.def("csr_transpose", &csr_transpose, py::arg("indptr"), py::arg("cols"), py::arg("weights"), py::arg("col_ptr"),
          py::arg("rows"), py::arg("weights_t"));
}
