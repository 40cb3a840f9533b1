// Rows spread over OpenMP threads, each thread summing columns of its own rows: the backward steps
// whose per-row pass also yields a bias gradient (a sum over rows). Shared by the CPU extensions
// (nll_blocks.cpp, swish_layer_norm.cpp); call with the GIL released.
#pragma once

#include <cstdint>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

// row_fn(r, sums) for every row r in [0, n_rows), one contiguous range of rows per thread; `sums`
// is that thread's `width` accumulators of type Acc, zeroed first. The threads' sums are then
// added in double, column by column in thread order, into totals[0, width).
template <class Acc, class RowFn>
void rows_with_column_sums(int64_t n_rows, int64_t width, int n_threads, RowFn&& row_fn, double* totals) {
    if (n_threads < 1) n_threads = 1;
    std::vector<Acc> partial(size_t(n_threads) * size_t(width), Acc(0));
    int used = 1;
#if defined(_OPENMP)
#pragma omp parallel num_threads(n_threads)
#endif
    {
#if defined(_OPENMP)
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
#pragma omp single
        used = nt;
#else
        const int t = 0, nt = 1;
#endif
        Acc* sums = partial.data() + size_t(t) * size_t(width);
        for (int64_t r = n_rows * t / nt; r < n_rows * (t + 1) / nt; ++r) row_fn(r, sums);
    }
    for (int64_t j = 0; j < width; ++j) {
        double total = 0;
        for (int t = 0; t < used; ++t) total += double(partial[size_t(t) * size_t(width) + size_t(j)]);
        totals[j] = total;
    }
}
