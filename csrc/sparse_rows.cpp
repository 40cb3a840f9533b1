// Weighted sums of table rows picked by a CSR matrix: a sparse × dense product, the gather that the
// sparse input layer (fc1) and the multinomial NLL's Σ x·Wd need on the CPU.
//
//   out[r, :] = Σ_{n ∈ [indptr[r], indptr[r+1])} weights[n] · table[cols[n], :]   (0 for an empty row)
//
// summed in the order given. The sparse input layer's backward uses it with rows = items and
// cols = users: dW1 from the B × H upstream gradient. torch's embedding_bag computes the same but
// costs about 0.8 µs per bag on the CPU, which made it most of fc1's backward at 20k items (17k bags
// of ~2 rows each: 15–24 ms against ~5 ms here). For the forward's few long bags (users × items)
// embedding_bag is as fast as this, and stays.
//
// Rows are spread over OpenMP threads (the process's OpenMP runtime, i.e. torch's own pool: see
// topk_masked.cpp) with the GIL released. Every index is checked before anything is written.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

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

[[noreturn]] void fail(const std::string& what) { throw py::value_error("weighted_row_sums: " + what); }

void check_array(const py::array& a, const char* name, int ndim, const py::dtype& dt) {
    if (a.ndim() != ndim) fail(std::string(name) + " must be " + std::to_string(ndim) + "-D");
    if (!a.dtype().is(dt)) throw py::type_error(std::string("weighted_row_sums: ") + name + " has a different dtype than table");
    if (!(a.flags() & py::array::c_style)) fail(std::string(name) + " must be C-contiguous");
}

// out [R, H] is written in place (it must not overlap the inputs). indptr int64 [R + 1], cols int64
// [nnz] in [0, table rows), weights [nnz], table [N, H].
void weighted_row_sums(py::array_t<int64_t, py::array::c_style> indptr, py::array_t<int64_t, py::array::c_style> cols,
                       py::array weights, py::array table, py::array out, int n_threads) {
    if (table.ndim() != 2) fail("table must be 2-D");
    const py::dtype dt = table.dtype();
    const bool is_f32 = dt.is(py::dtype::of<float>()), is_f64 = dt.is(py::dtype::of<double>());
    if (!is_f32 && !is_f64) throw py::type_error("weighted_row_sums: table must be float32 or float64");
    check_array(table, "table", 2, dt);
    check_array(weights, "weights", 1, dt);
    check_array(out, "out", 2, dt);
    if (!out.writeable()) fail("out must be writable");
    if (indptr.ndim() != 1 || indptr.shape(0) < 1) fail("indptr must be 1-D with at least one entry");
    if (cols.ndim() != 1) fail("cols must be 1-D");
    const int64_t n_rows = indptr.shape(0) - 1, nnz = cols.shape(0), n_table = table.shape(0),
                  width = table.shape(1);
    if (weights.shape(0) != nnz) fail("weights must have one entry per col (" + std::to_string(nnz) + ")");
    if (out.shape(0) != n_rows || out.shape(1) != width)
        fail("out must have shape (" + std::to_string(n_rows) + ", " + std::to_string(width) + ")");
    const int64_t* ip = indptr.data();
    const int64_t* cp = cols.data();
    if (ip[0] != 0 || ip[n_rows] != nnz) fail("indptr must start at 0 and end at the number of cols");
    for (int64_t r = 0; r < n_rows; ++r)
        if (ip[r + 1] < ip[r]) fail("indptr must be non-decreasing (row " + std::to_string(r) + ")");
    for (int64_t n = 0; n < nnz; ++n)
        if (cp[n] < 0 || cp[n] >= n_table)
            fail("col " + std::to_string(cp[n]) + " outside [0, " + std::to_string(n_table) + ")");
    if (n_rows == 0 || width == 0) return;
    if (n_threads < 1) n_threads = 1;

    py::gil_scoped_release release;
    if (is_f32)
        run<float>(ip, cp, static_cast<const float*>(weights.data()), static_cast<const float*>(table.data()),
                   static_cast<float*>(out.mutable_data()), n_rows, width, n_threads);
    else
        run<double>(ip, cp, static_cast<const double*>(weights.data()), static_cast<const double*>(table.data()),
                    static_cast<double*>(out.mutable_data()), n_rows, width, n_threads);
}

}  // namespace

PYBIND11_MODULE(_sparse_rows, m) {
    m.doc() = "Weighted sums of table rows picked by a CSR matrix (CPU sparse x dense product)";
    m.def("weighted_row_sums", &weighted_row_sums, py::arg("indptr"), py::arg("cols"), py::arg("weights"),
          py::arg("table"), py::arg("out"), py::arg("n_threads"));
}
