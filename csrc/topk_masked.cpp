// Masked top-k: the best k items per row of a dense score matrix, skipping the items a CSR
// "seen" matrix lists for that row.
//
// Order: an item (s, i) ranks above (t, j) iff s > t, or s == t and i < j (ties go to the lower
// item index). NaN scores are never selected; -inf scores are ordinary (eligible) values that rank
// after every finite one. A row with fewer than k eligible items is padded with index -1 / -inf.
//
// The work is organised around a running per-row top-k (`State`): the one-shot form pushes the
// whole catalogue once, the streaming form pushes item chunks with their item offset. Per row:
// - a threshold (score, index) that any item must beat to matter. It starts from a lower bound on
//   the k-th best score computed from group maxima of the row's first WARM items (see scan_row),
//   or from the k kept items of earlier chunks;
// - blocks of 32 scores are screened against the threshold with SSE compares; only the rare
//   block with a candidate is looked at item by item (skipping NaN and seen items: the row's
//   sorted seen list is walked forward only then);
// - candidates go to the row's buffer (k + max(k, 64) entries, kept in the State between chunks);
//   when it is full a branch-free quickselect keeps the best k and raises the threshold to the
//   worst of them. Nothing is selected at the end of a chunk, so a chunk with few candidates costs
//   a row little more than its scan: the streaming form can push many small, cache-sized chunks.
// Rows are spread over OpenMP threads (the process's OpenMP pool, i.e. torch's own when torch is
// loaded) with the GIL released; without OpenMP, over std::threads.
//
// The scores are read in place through the buffer protocol (any row stride, any column stride),
// never copied or written. bfloat16 arrives as a 16-bit integer buffer (a torch tensor viewed as
// int16) with dtype "bfloat16".
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "checks.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace py = pybind11;

namespace {

constexpr const char* FN = "topk_masked";  // the prefix of every error message

// ---------------------------------------------------------------- element types

float g_half_table[65536];

float half_bits_to_float(uint16_t h) {
    const uint32_t sign = uint32_t(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1fu;
    const uint32_t man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0) {  // zero or subnormal: man * 2^-24, exact in float
        float f = float(man) * (1.0f / 16777216.0f);
        return sign ? -f : f;
    } else if (exp == 31) {  // inf / NaN
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

void init_half_table() {
    for (uint32_t h = 0; h < 65536; ++h) g_half_table[h] = half_bits_to_float(uint16_t(h));
}

struct F32 {
    using Raw = float;
    using C = float;
    static C cv(Raw x) { return x; }
};
struct F64 {
    using Raw = double;
    using C = double;
    static C cv(Raw x) { return x; }
};
struct F16 {
    using Raw = uint16_t;
    using C = float;
    static C cv(Raw x) { return g_half_table[x]; }
};
struct BF16 {
    using Raw = uint16_t;
    using C = float;
    static C cv(Raw x) {
        const uint32_t b = uint32_t(x) << 16;
        float f;
        std::memcpy(&f, &b, 4);
        return f;
    }
};

// Monotone map float -> uint32 (a < b iff order(a) < order(b); +0 and -0 map apart, NaN unused).
inline uint32_t float_order(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

inline float float_from_order(uint32_t o) {
    const uint32_t u = (o & 0x80000000u) ? (o & 0x7fffffffu) : ~o;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// ---------------------------------------------------------------- ranking and selection

// (a, ia) ranks strictly above (b, ib). NaN is never kept, so this is a strict total order.
template <class C>
inline bool better(C a, int64_t ia, C b, int64_t ib) {
    return a > b || (a == b && ia < ib);
}

template <class C>
struct Entry {
    C s;
    int64_t ix;
};

// Branch-free form of `better` for the selection loop (its outcome is unpredictable there).
template <class C>
inline bool entry_better(const Entry<C>& a, const Entry<C>& b) {
    return (a.s > b.s) | ((a.s == b.s) & (a.ix < b.ix));
}

// Reorder a[0, n) so that a[0, kth) are its kth best entries (in no particular order), 0 < kth <= n.
// Quickselect with median-of-three pivots and a branch-free out-of-place partition into `tmp`
// (size >= n): the entries are distinct under `better` (item indices are unique), so a
// median-of-three pivot leaves at least one entry on each side and every round makes progress.
template <class C>
void select_best(Entry<C>* a, Entry<C>* tmp, int64_t n, int64_t kth) {
    int64_t lo = 0, hi = n;
    while (hi - lo > 24) {
        const int64_t mid = lo + (hi - lo) / 2;
        Entry<C> x = a[lo], y = a[mid], z = a[hi - 1];
        if (entry_better(y, x)) std::swap(x, y);
        if (entry_better(z, y)) std::swap(y, z);
        if (entry_better(y, x)) std::swap(x, y);
        const Entry<C> pivot = y;  // x >= y >= z: the median
        int64_t l = lo, r = hi;
        for (int64_t j = lo; j < hi; ++j) {
            const Entry<C> e = a[j];
            const bool b = entry_better(e, pivot);
            tmp[l] = e;
            tmp[r - 1] = e;
            l += b;
            r -= !b;
        }
        std::memcpy(static_cast<void*>(a + lo), tmp + lo, size_t(hi - lo) * sizeof(Entry<C>));
        // [lo, l) better than the pivot, [l, hi) not.
        if (l == lo) {  // only with duplicate entries (an item pushed twice): no progress, fall back
            std::nth_element(a + lo, a + (kth - 1), a + hi, entry_better<C>);
            return;
        }
        if (l == kth) return;
        if (l > kth)
            hi = l;
        else
            lo = l;
    }
    for (int64_t j = lo + 1; j < hi; ++j) {  // small range: insertion sort finishes it
        const Entry<C> x = a[j];
        int64_t t = j;
        while (t > lo && entry_better(x, a[t - 1])) {
            a[t] = a[t - 1];
            --t;
        }
        a[t] = x;
    }
}

// x rounded toward -inf to C: every C value that is > x (>= x) is also > (>=) the result.
template <class C>
inline C round_down(double x) {
    if constexpr (std::is_same_v<C, double>) {
        return x;
    } else {
        C y = C(x);
        return double(y) > x ? std::nextafter(y, -std::numeric_limits<C>::infinity()) : y;
    }
}

// One row's entries and threshold, kept in the State between chunks. Scores are stored as double
// (exact for every input type), so chunks of different dtypes compare exactly.
struct RowState {
    int64_t c = 0;  // entries held
    bool have_thr = false;
    double thr = 0.0;
    int64_t thr_i = 0;
};

// Candidate buffer of one row: holds at most `room` entries; compaction keeps the best `cap`
// and sets the threshold to the worst of them, the bar any later item must clear.
template <class C>
struct Buf {
    Entry<double>* e;  // the row's entries in the State
    Entry<double>* tmp;  // scratch for the selection, room entries
    std::vector<Entry<C>>& gmax;  // scratch for group maxima (grown as needed)
    RowState& row;
    int64_t cap;   // k (or fewer when the catalogue is smaller)
    int64_t room;  // buffer size, > cap
    C screen_thr;  // row.thr rounded down to C: the block screen admits all that can beat row.thr

    void set_threshold(double s, int64_t ix) {
        row.have_thr = true;
        row.thr = s;
        row.thr_i = ix;
        screen_thr = round_down<C>(s);
    }

    void compact() {
        if (row.c > cap) {
            select_best(e, tmp, row.c, cap);
            row.c = cap;
        }
        // The threshold: the worst of the best cap.
        int64_t w = 0;
        if (row.c == cap) {
            for (int64_t t = 1; t < row.c; ++t)
                if (entry_better(e[w], e[t])) w = t;
            set_threshold(e[w].s, e[w].ix);
        }
    }

    inline void append(C v, int64_t g) {
        e[row.c].s = double(v);
        e[row.c].ix = g;
        if (++row.c == room) compact();
    }
};

// ---------------------------------------------------------------- block screening

constexpr int BLK = 32;

// Bit t set iff p[t] > thr (ge: p[t] >= thr); NaN never sets a bit.
inline uint32_t screen(const float* p, float thr, bool ge) {
#if defined(__SSE2__)
    const __m128 th = _mm_set1_ps(thr);
    __m128 m[8];
    if (ge) {
        for (int t = 0; t < 8; ++t) m[t] = _mm_cmpge_ps(_mm_loadu_ps(p + 4 * t), th);
    } else {
        for (int t = 0; t < 8; ++t) m[t] = _mm_cmpgt_ps(_mm_loadu_ps(p + 4 * t), th);
    }
    const __m128 any = _mm_or_ps(_mm_or_ps(_mm_or_ps(m[0], m[1]), _mm_or_ps(m[2], m[3])),
                                 _mm_or_ps(_mm_or_ps(m[4], m[5]), _mm_or_ps(m[6], m[7])));
    if (!_mm_movemask_ps(any)) return 0;
    uint32_t bits = 0;
    for (int t = 0; t < 8; ++t) bits |= uint32_t(_mm_movemask_ps(m[t])) << (4 * t);
    return bits;
#else
    uint32_t bits = 0;
    for (int t = 0; t < BLK; ++t) bits |= uint32_t(ge ? p[t] >= thr : p[t] > thr) << t;
    return bits;
#endif
}

inline uint32_t screen(const double* p, double thr, bool ge) {
#if defined(__SSE2__)
    const __m128d th = _mm_set1_pd(thr);
    __m128d m[16];
    if (ge) {
        for (int t = 0; t < 16; ++t) m[t] = _mm_cmpge_pd(_mm_loadu_pd(p + 2 * t), th);
    } else {
        for (int t = 0; t < 16; ++t) m[t] = _mm_cmpgt_pd(_mm_loadu_pd(p + 2 * t), th);
    }
    __m128d any = m[0];
    for (int t = 1; t < 16; ++t) any = _mm_or_pd(any, m[t]);
    if (!_mm_movemask_pd(any)) return 0;
    uint32_t bits = 0;
    for (int t = 0; t < 16; ++t) bits |= uint32_t(_mm_movemask_pd(m[t])) << (2 * t);
    return bits;
#else
    uint32_t bits = 0;
    for (int t = 0; t < BLK; ++t) bits |= uint32_t(ge ? p[t] >= thr : p[t] > thr) << t;
    return bits;
#endif
}

// Max of p[0, G), NaN ignored (-inf when all are NaN). G is a multiple of 8.
inline float group_max(const float* p, int64_t G) {
#if defined(__SSE2__)
    // Two independent chains (short dependency chains); a NaN first operand keeps the second.
    __m128 m0 = _mm_set1_ps(-std::numeric_limits<float>::infinity()), m1 = m0;
    for (int64_t t = 0; t < G; t += 8) {
        m0 = _mm_max_ps(_mm_loadu_ps(p + t), m0);
        m1 = _mm_max_ps(_mm_loadu_ps(p + t + 4), m1);
    }
    __m128 m = _mm_max_ps(m0, m1);
    m = _mm_max_ps(m, _mm_shuffle_ps(m, m, _MM_SHUFFLE(1, 0, 3, 2)));
    m = _mm_max_ps(m, _mm_shuffle_ps(m, m, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtss_f32(m);
#else
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < G; ++t) m = p[t] > m ? p[t] : m;
    return m;
#endif
}

inline double group_max(const double* p, int64_t G) {
#if defined(__SSE2__)
    __m128d m0 = _mm_set1_pd(-std::numeric_limits<double>::infinity()), m1 = m0, m2 = m0, m3 = m0;
    for (int64_t t = 0; t < G; t += 8) {
        m0 = _mm_max_pd(_mm_loadu_pd(p + t), m0);
        m1 = _mm_max_pd(_mm_loadu_pd(p + t + 2), m1);
        m2 = _mm_max_pd(_mm_loadu_pd(p + t + 4), m2);
        m3 = _mm_max_pd(_mm_loadu_pd(p + t + 6), m3);
    }
    __m128d m = _mm_max_pd(_mm_max_pd(m0, m1), _mm_max_pd(m2, m3));
    m = _mm_max_pd(m, _mm_shuffle_pd(m, m, 1));
    return _mm_cvtsd_f64(m);
#else
    double m = -std::numeric_limits<double>::infinity();
    for (int64_t t = 0; t < G; ++t) m = p[t] > m ? p[t] : m;
    return m;
#endif
}

// A row's first WARM items are read twice (the second time from cache): once for a lower bound
// on the k-th best score, then to collect the items at or above it. See scan_row.
constexpr int64_t WARM = 32768;

inline int lowest_bit(uint32_t m) {  // m != 0
#if defined(__GNUC__) || defined(__clang__)
    return __builtin_ctz(m);
#else
    int t = 0;
    while (!(m & 1u)) {
        m >>= 1;
        ++t;
    }
    return t;
#endif
}

// ---------------------------------------------------------------- one row of one chunk

// Scan columns [0, n) of one row (global item index = gofs + column) into the buffer `b`.
// [sp, se) is the row's seen list, sorted ascending (duplicates allowed).
// Contig: element j lives at ((const Raw*)base)[j]; otherwise at base + j * cs bytes.
// Biased: item j's score is element j + bias[j] (in C), so a product need not add the bias first.
template <class T, bool Contig, bool Biased>
void scan_row(const char* base, int64_t cs, int64_t n, int64_t gofs, const int64_t* sp, const int64_t* se,
              const typename T::C* bias, Buf<typename T::C>& b) {
    using C = typename T::C;
    using Raw = typename T::Raw;
    constexpr bool in_place = Contig && std::is_same_v<Raw, C> && !Biased;  // read blocks where they lie

    auto get = [&](int64_t j) -> C {
        C v;
        if constexpr (Contig) {
            v = T::cv(reinterpret_cast<const Raw*>(base)[j]);
        } else {
            Raw r;
            std::memcpy(&r, base + j * cs, sizeof(Raw));
            v = T::cv(r);
        }
        if constexpr (Biased) v += bias[j];
        return v;
    };
    sp = std::lower_bound(sp, se, gofs);
    auto is_seen = [&](int64_t g) -> bool {  // g only grows along the row: the pointer only moves on
        while (sp < se && *sp < g) ++sp;
        return sp < se && *sp == g;
    };

    alignas(64) C tmp[BLK];
    auto block = [&](int64_t j) -> const C* {
        if constexpr (in_place) {
            return reinterpret_cast<const C*>(base) + j;
        } else {
            for (int t = 0; t < BLK; ++t) tmp[t] = get(j + t);
            return tmp;
        }
    };

    if (!b.row.have_thr) {
        // Warm-up bound. Split the first min(n, WARM) items into groups of G and take each group's
        // max. If `need` = cap + (seen entries in that range) groups have max >= t, at most the seen
        // count of them hold a seen item, so >= cap groups are clean and their maxima are cap
        // distinct eligible items scoring >= t: the final cap-th best scores >= t, and collecting
        // every eligible item scoring >= t (ties included) loses nothing. For random scores this
        // leaves ~2k candidates instead of the k·ln(n/k) a running threshold admits during warm-up.
        const int64_t seg = std::min(n, WARM);
        const int64_t need = b.cap + (std::lower_bound(sp, se, gofs + seg) - sp);
        // About 1.5 * need groups: the expected number of candidates is then ~1.6 * need
        // (ng * -ln(1 - need / ng) for random scores) while the selection below stays small.
        // Groups of 8 or more items are maxed with SIMD; down to 2 items (a small first chunk of a
        // stream) the bound still saves most of the fill phase's candidates.
        int64_t G = seg / ((3 * need + 1) / 2);
        if (G >= 8) G -= G % 8;
        if (G >= 2) {
            const int64_t ng = seg / G;
            if (b.gmax.size() < size_t(2 * ng)) b.gmax.resize(size_t(2 * ng));
            Entry<C>* gm = b.gmax.data();
            for (int64_t q = 0, gi = 0; gi < ng; ++gi, q += G) {
                C m = -std::numeric_limits<C>::infinity();
                int64_t u = 0;
                if constexpr (in_place) {
                    u = G - G % 8;
                    if (u) m = group_max(reinterpret_cast<const C*>(base) + q, u);
                } else {
                    for (; u + 8 <= G; u += 8) {
                        for (int t = 0; t < 8; ++t) tmp[t] = get(q + u + t);
                        const C x = group_max(tmp, 8);
                        m = x > m ? x : m;
                    }
                }
                for (; u < G; ++u) {  // NaN compares false: ignored, as in group_max
                    const C x = get(q + u);
                    m = x > m ? x : m;
                }
                gm[gi].s = m;
                gm[gi].ix = gi;  // makes entries distinct for select_best
            }
            select_best(gm, gm + ng, ng, need);
            C t = gm[0].s;
            for (int64_t u = 1; u < need; ++u) t = gm[u].s < t ? gm[u].s : t;
            if (t > -std::numeric_limits<C>::infinity())
                b.set_threshold(double(t), std::numeric_limits<int64_t>::max());  // admits scores >= t
        }
    }

    int64_t j = 0;
    // Fill phase: no threshold yet, take every eligible item until the first compaction.
    for (; j < n && !b.row.have_thr; ++j) {
        const C v = get(j);
        if (v != v) continue;  // NaN
        const int64_t g = gofs + j;
        if (!is_seen(g)) b.append(v, g);
    }
    for (; j + BLK <= n; j += BLK) {
        const C* blk = block(j);
        // Items of this block have indices >= gofs + j. When that exceeds the threshold item's
        // index (always, unless chunks come out of order) only a strictly higher score can win.
        uint32_t m = screen(blk, b.screen_thr, gofs + j < b.row.thr_i);
        while (m) {
            const int t = lowest_bit(m);
            m &= m - 1;
            const C v = blk[t];
            const int64_t g = gofs + j + t;
            if (better(double(v), g, b.row.thr, b.row.thr_i) && !is_seen(g)) b.append(v, g);
        }
    }
    for (; j < n; ++j) {
        const C v = get(j);
        const int64_t g = gofs + j;
        if (better(double(v), g, b.row.thr, b.row.thr_i) && !is_seen(g)) b.append(v, g);
    }
}

// ---------------------------------------------------------------- running top-k

enum class DType { F32, F64, F16, BF16 };

DType parse_dtype(const std::string& name, const py::buffer_info& info) {
    DType d;
    size_t want;
    if (name == "float32") {
        d = DType::F32;
        want = 4;
    } else if (name == "float64") {
        d = DType::F64;
        want = 8;
    } else if (name == "float16") {
        d = DType::F16;
        want = 2;
    } else if (name == "bfloat16") {
        d = DType::BF16;
        want = 2;
    } else {
        checks::type_error(FN, "unsupported score dtype '" + name +
                               "' (expected float32, float64, float16 or bfloat16)");
    }
    if (size_t(info.itemsize) != want)
        checks::type_error(FN, "score buffer item size " + std::to_string(info.itemsize) +
                               " does not match dtype " + name);
    const std::string& f = info.format;
    bool ok;
    switch (d) {
        case DType::F32: ok = (f == "f"); break;
        case DType::F64: ok = (f == "d"); break;
        case DType::F16: ok = (f == "e"); break;
        default: ok = (f == "h" || f == "H" || f == "e"); break;  // bfloat16 travels as 16-bit ints
    }
    if (!ok) checks::type_error(FN, "score buffer format '" + f + "' does not match dtype " + name);
    return d;
}

// Run fn(ws, r0, r1) over [0, n_rows) in blocks of `grain` rows on up to n_threads threads; each
// thread builds one workspace ws = make_ws() and reuses it for all its blocks.
// With OpenMP (the default build) this uses the process's OpenMP pool: torch's CPU wheels load
// libgomp.so.1 first, so the extension binds to that same runtime and reuses torch's intra-op
// threads instead of competing with them (their spin-wait after a torch op would otherwise steal
// the cores from fresh threads). Without OpenMP: std::thread workers pulling blocks.
template <class MakeWs, class F>
void parallel_rows(int64_t n_rows, int n_threads, int64_t grain, MakeWs&& make_ws, F&& fn) {
    grain = std::max<int64_t>(grain, 1);
    const int64_t n_blocks = (n_rows + grain - 1) / grain;
    const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(n_threads, n_blocks));
    if (nt <= 1) {
        auto ws = make_ws();
        fn(ws, 0, n_rows);
        return;
    }
#if defined(_OPENMP)
#pragma omp parallel num_threads(int(nt))
    {
        auto ws = make_ws();
#pragma omp for schedule(dynamic, 1)
        for (int64_t blk = 0; blk < n_blocks; ++blk) fn(ws, blk * grain, std::min(n_rows, (blk + 1) * grain));
    }
#else
    std::atomic<int64_t> next{0};
    auto worker = [&]() {
        auto ws = make_ws();
        for (;;) {
            const int64_t r0 = next.fetch_add(grain);
            if (r0 >= n_rows) break;
            fn(ws, r0, std::min(n_rows, r0 + grain));
        }
    };
    std::vector<std::thread> threads;
    threads.reserve(size_t(nt - 1));
    for (int64_t t = 1; t < nt; ++t) threads.emplace_back(worker);
    worker();
    for (auto& th : threads) th.join();
#endif
}

// Per-thread scratch of `run`: uninitialised arrays (no zero-fill per block).
template <class C>
struct Workspace {
    std::unique_ptr<Entry<double>[]> scratch;
    std::vector<Entry<C>> gmax;
    std::vector<int64_t> sorted_seen;
    explicit Workspace(int64_t room) : scratch(new Entry<double>[size_t(room)]) {}
};

class State {
  public:
    State(int64_t n_rows, int64_t k, int64_t cap) : n_rows_(n_rows), k_(k), cap_(cap) {
        if (n_rows < 0) checks::value_error(FN, "n_rows must be >= 0");
        if (k <= 0) checks::value_error(FN, "k must be >= 1");
        if (cap < 0 || cap > k) checks::value_error(FN, "internal capacity out of range");
        room_ = cap + std::max<int64_t>(cap, 64);
        ent_.reset(new Entry<double>[size_t(n_rows * room_)]);  // uninitialised: rows start empty
        rows_.assign(size_t(n_rows), RowState{});
    }

    int64_t n_rows() const { return n_rows_; }
    int64_t k() const { return k_; }

    void push(const py::buffer& scores, const std::string& dtype, int64_t item_offset,
              const py::array_t<int64_t, py::array::c_style>& indptr,
              const py::array_t<int64_t, py::array::c_style>& indices, int n_threads, const py::object& bias) {
        py::buffer_info info = scores.request();
        const DType d = parse_dtype(dtype, info);
        if (info.ndim != 2)
            checks::value_error(FN, "scores must be 2-D, got " + std::to_string(info.ndim) + "-D");
        if (info.shape[0] != n_rows_)
            checks::value_error(FN, "scores have " + std::to_string(info.shape[0]) +
                                    " rows, expected " + std::to_string(n_rows_));
        if (item_offset < 0) checks::value_error(FN, "item_offset must be >= 0");
        const int64_t n_cols = info.shape[1];
        if (indptr.ndim() != 1 || indptr.shape(0) != n_rows_ + 1)
            checks::value_error(FN, "seen indptr must have n_rows + 1 = " + std::to_string(n_rows_ + 1) +
                                    " entries");
        if (indices.ndim() != 1) checks::value_error(FN, "seen indices must be 1-D");
        const int64_t* ip = indptr.data();
        const int64_t* ind = indices.data();
        const int64_t nnz = indices.shape(0);
        if (ip[0] < 0 || ip[n_rows_] > nnz)
            checks::value_error(FN, "seen indptr is inconsistent with its indices");
        for (int64_t r = 0; r < n_rows_; ++r)
            if (ip[r + 1] < ip[r]) checks::value_error(FN, "seen indptr must be non-decreasing");

        // bias: one value per column, added to its scores in the type they are compared in
        // (float64 for float64 scores, float32 otherwise).
        const void* bias_data = nullptr;
        py::array bias_array;
        if (!bias.is_none()) {
            bias_array = py::array::ensure(bias);
            const bool want_f64 = d == DType::F64;
            const bool ok_type = bias_array && (want_f64 ? bias_array.dtype().is(py::dtype::of<double>())
                                                         : bias_array.dtype().is(py::dtype::of<float>()));
            if (!ok_type)
                checks::type_error(FN, std::string("bias must be a ") + (want_f64 ? "float64" : "float32") +
                                       " array for " + dtype + " scores");
            if (bias_array.ndim() != 1 || bias_array.shape(0) != info.shape[1] ||
                !checks::is_c_contiguous(bias_array))
                checks::value_error(FN, "bias must be a contiguous 1-D array of " +
                                        std::to_string(info.shape[1]) + " values, one per score column");
            bias_data = bias_array.data();
        }

        const char* base = static_cast<const char*>(info.ptr);
        const int64_t rs = info.strides[0];
        const int64_t cs = info.strides[1];
        const int64_t isz = info.itemsize;
        const bool contig = (cs == isz) && (reinterpret_cast<uintptr_t>(base) % uintptr_t(isz) == 0) &&
                          (rs % isz == 0);
        if (n_cols == 0 || n_rows_ == 0 || cap_ == 0) return;

        py::gil_scoped_release release;
        std::lock_guard<std::mutex> lock(mu_);
        if (d == DType::F64) saw_f64_ = true;
        switch (d) {
            case DType::F32: run<F32>(base, rs, cs, n_cols, item_offset, ip, ind, n_threads, contig, bias_data); break;
            case DType::F64: run<F64>(base, rs, cs, n_cols, item_offset, ip, ind, n_threads, contig, bias_data); break;
            case DType::F16: run<F16>(base, rs, cs, n_cols, item_offset, ip, ind, n_threads, contig, bias_data); break;
            case DType::BF16: run<BF16>(base, rs, cs, n_cols, item_offset, ip, ind, n_threads, contig, bias_data); break;
        }
    }

    // (scores float64 [n_rows, k], indices int64 [n_rows, k]), best first, padded with -inf / -1.
    py::tuple result(int n_threads) {
        py::array_t<double> out_s({n_rows_, k_});
        py::array_t<int64_t> out_i({n_rows_, k_});
        double* os = out_s.mutable_data();
        int64_t* oi = out_i.mutable_data();
        {
            py::gil_scoped_release release;
            std::lock_guard<std::mutex> lock(mu_);
            const double ninf = -std::numeric_limits<double>::infinity();
            auto make_ws = [&]() { return std::unique_ptr<Entry<double>[]>(new Entry<double>[size_t(room_)]); };
            parallel_rows(n_rows_, n_threads, 64, make_ws, [&](auto& buf, int64_t r0, int64_t r1) {
                uint64_t* keys = reinterpret_cast<uint64_t*>(buf.get());  // 8 of the 16 bytes per entry
                std::vector<Entry<double>> no_groups;  // compact() does not use them
                for (int64_t r = r0; r < r1; ++r) {
                    Entry<double>* e = ent_.get() + r * room_;
                    Buf<double> b{e, buf.get(), no_groups, rows_[size_t(r)], cap_, room_, 0.0};
                    b.compact();  // the row's best cap (candidates may still be above them)
                    const int64_t c = b.row.c;
                    // Scores that are floats (float32/16/bfloat16 input), indices < 2^32 and no -0.0
                    // (whose sign the key would lose): sort 64-bit keys (float order, then index).
                    bool packed = !saw_f64_;
                    for (int64_t t = 0; packed && t < c; ++t)
                        packed = uint64_t(e[t].ix) <= 0xffffffffull && !(e[t].s == 0.0 && std::signbit(e[t].s));
                    if (packed) {
                        for (int64_t t = 0; t < c; ++t)
                            keys[t] = (uint64_t(float_order(float(e[t].s))) << 32) | (0xffffffffull - uint64_t(e[t].ix));
                        std::sort(keys, keys + c, std::greater<uint64_t>());
                        for (int64_t t = 0; t < c; ++t) {
                            os[r * k_ + t] = double(float_from_order(uint32_t(keys[t] >> 32)));
                            oi[r * k_ + t] = int64_t(0xffffffffull - (keys[t] & 0xffffffffull));
                        }
                    } else {
                        for (int64_t t = 0; t < c; ++t) buf[t] = e[t];
                        std::sort(buf.get(), buf.get() + c, [](const Entry<double>& a, const Entry<double>& b) {
                            return better(a.s, a.ix, b.s, b.ix);
                        });
                        for (int64_t t = 0; t < c; ++t) {
                            os[r * k_ + t] = buf[t].s;
                            oi[r * k_ + t] = buf[t].ix;
                        }
                    }
                    for (int64_t t = c; t < k_; ++t) {
                        os[r * k_ + t] = ninf;
                        oi[r * k_ + t] = -1;
                    }
                }
            });
        }
        return py::make_tuple(out_s, out_i);
    }

  private:
    template <class T>
    void run(const char* base, int64_t rs, int64_t cs, int64_t n_cols, int64_t gofs, const int64_t* ip,
             const int64_t* ind, int n_threads, bool contig, const void* bias_data) {
        using C = typename T::C;
        const C* bias = static_cast<const C*>(bias_data);
        const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(n_cols, 1));
        auto make_ws = [&]() { return Workspace<C>(room_); };
        parallel_rows(n_rows_, n_threads, grain, make_ws, [&](Workspace<C>& ws, int64_t r0, int64_t r1) {
            std::vector<int64_t>& sorted_seen = ws.sorted_seen;
            for (int64_t r = r0; r < r1; ++r) {
                RowState& row = rows_[size_t(r)];
                Buf<C> b{ent_.get() + r * room_, ws.scratch.get(), ws.gmax, row, cap_, room_,
                         round_down<C>(row.thr)};
                const int64_t* sp = ind + ip[r];
                const int64_t* se = ind + ip[r + 1];
                if (!std::is_sorted(sp, se)) {
                    sorted_seen.assign(sp, se);
                    std::sort(sorted_seen.begin(), sorted_seen.end());
                    sp = sorted_seen.data();
                    se = sp + sorted_seen.size();
                }
                const char* row_scores = base + r * rs;
                if (bias) {
                    if (contig)
                        scan_row<T, true, true>(row_scores, cs, n_cols, gofs, sp, se, bias, b);
                    else
                        scan_row<T, false, true>(row_scores, cs, n_cols, gofs, sp, se, bias, b);
                } else if (contig) {
                    scan_row<T, true, false>(row_scores, cs, n_cols, gofs, sp, se, nullptr, b);
                } else {
                    scan_row<T, false, false>(row_scores, cs, n_cols, gofs, sp, se, nullptr, b);
                }
            }
        });
    }

    int64_t n_rows_, k_, cap_, room_;
    std::unique_ptr<Entry<double>[]> ent_;  // n_rows × room: each row's entries (unordered)
    std::vector<RowState> rows_;
    bool saw_f64_ = false;  // some chunk was float64: kept scores may not be floats
    std::mutex mu_;
};

}  // namespace

PYBIND11_MODULE(_topk, m) {
    init_half_table();
    m.doc() = "Masked top-k over dense score rows (see recvae_fast.topk for the public API).";
    py::class_<State>(m, "State")
        .def(py::init<int64_t, int64_t, int64_t>(), py::arg("n_rows"), py::arg("k"), py::arg("capacity"))
        .def_property_readonly("n_rows", &State::n_rows)
        .def_property_readonly("k", &State::k)
        .def("push", &State::push, py::arg("scores"), py::arg("dtype"), py::arg("item_offset"), py::arg("indptr"),
             py::arg("indices"), py::arg("n_threads"), py::arg("bias") = py::none(),
             "Merge the masked top-k of a [n_rows, n_cols] score chunk whose column 0 is item item_offset; "
             "bias (optional, one per column) is added to each column's scores first.")
        .def("result", &State::result, py::arg("n_threads") = 1,
             "(scores float64 [n_rows, k], indices int64 [n_rows, k]), best first, padded with -inf / -1.");
}
